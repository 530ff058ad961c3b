"""The pixel path from encoded bytes to mask, shared by ``run``, ``evaluate``, ``predict`` and training.

* :func:`decode_for_model` - file bytes to the network's input and the image's (EXIF-oriented)
  size, with JPEG draft mode: what ``run`` and ``evaluate`` decode with.
* :func:`resize_rgb` - an HxWx3 uint8 image to the network's input size (and augmentation);
  :func:`resize_pil` the same from a PIL image.
* :func:`upsample_probs` - a probability map back to the image's own size.
* :func:`measure` - the full-size 0/255 mask and its statistics (face pixels, faces, confidence,
  one box per face region); :func:`mask_stats` the same as a tuple, without the boxes.
* :func:`rle_counts` - a mask as COCO compressed RLE (``results.parquet``, ``export-coco``).
* :func:`encode_png` / :func:`encode_overlay` - the files ``run`` writes.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..data import DataError, pil_rgb_image, pil_to_rgb
from .png import encode_gray_png

#: A connected face region counts in ``faces`` when its area is at least this many network
#: output pixels, i.e. ``MIN_FACE_NET_PIXELS * width * height / image_size**2`` original pixels
#: (and at least ``MIN_FACE_PIXELS``).
MIN_FACE_NET_PIXELS = 4
MIN_FACE_PIXELS = 16


def resize_rgb(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an HxWx3 uint8 image."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return resize_pil(Image.fromarray(image), width, height)


def resize_pil(im: Image.Image, width: int, height: int) -> np.ndarray:
    """:func:`resize_rgb` of a PIL RGB image (the batch run's decode: no full-size array first)."""
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    return np.asarray(im)


def upsample_probs(prob: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float32 probability map to ``height x width``."""
    if prob.shape == (height, width):
        return prob.astype(np.float32, copy=False)
    im = Image.fromarray(np.ascontiguousarray(prob, np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.BILINEAR), np.float32)


def decode_for_model(data: bytes, size: int, max_pixels: int, where: str, draft: bool = True):
    """Decode to the network's input and read the original (EXIF-oriented) size.

    JPEGs are decoded in draft mode at the smallest power-of-two reduction that is still at
    least ``size`` pixels on both sides; the mask is still written at the header's size.
    Returns ``(x, width, height)``; raises :class:`DataError` for anything unusable.
    """
    if not data:
        raise DataError(f"{where}: empty file (0 bytes)")
    header_size = None  # (width, height) once the header is read: error rows carry it (README)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as exc:  # over 2 x Image.MAX_IMAGE_PIXELS
                n = re.search(r"\((\d+) pixels\)", str(exc))
                raise DataError(f"{where}: {n.group(1) + ' pixels' if n else 'image size'} exceeds the limit of "
                                f"{max_pixels} (--max-pixels)") from exc
        with im:
            w0, h0 = im.size
            header_size = (w0, h0)
            if w0 * h0 > max_pixels:
                raise DataError(f"{where}: {w0}x{h0} = {w0 * h0} pixels exceeds the limit of {max_pixels} (--max-pixels)")
            orient = im.getexif().get(0x0112, 1)
            w, h = (h0, w0) if orient in (5, 6, 7, 8) else (w0, h0)
            header_size = (w, h)
            if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, (size, size))
            # the same pixels as resize_rgb(pil_to_rgb(im)), without two full-size numpy copies
            x = resize_pil(pil_rgb_image(im, where), size, size)
    except DataError as exc:
        exc.size = header_size
        raise
    except Exception as exc:  # PIL raises many types for bad files
        err = DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})")
        err.size = header_size
        raise err from exc
    return x, w, h


@dataclass
class Measured:
    """A full-size 0/255 mask and its statistics (:func:`measure`)."""

    mask: np.ndarray  # (height, width) uint8, 255 = face
    face_pixels: int = 0
    faces: int = 0
    mean_conf: float | None = None
    #: One ``(x, y, w, h, score)`` per region counted in ``faces``: the region's bounding box in
    #: image pixels (COCO's bbox convention) and its mean face probability.
    boxes: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    #: The face pixels' bounding box as ``(y, x, bool crop)``: all of the mask outside it is 0
    #: (None: not known, ``rle()`` reads the whole mask).
    face_box: tuple[int, int, np.ndarray] | None = None

    def rle(self) -> str:
        if self.face_box is None:
            return rle_counts(self.mask)
        from pycocotools import mask as cocomask

        # Column-major (COCO's order) written straight from the face box: no full-size transpose
        y, x, crop = self.face_box
        fortran = np.zeros(self.mask.shape, np.uint8, order="F")
        fortran[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        return cocomask.encode(fortran)["counts"].decode("ascii")


def min_face_area(width: int, height: int, image_size: int) -> float:
    return max(MIN_FACE_PIXELS, MIN_FACE_NET_PIXELS * width * height / image_size**2)


def _reach(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int, int, int]:
    """For one axis of a bilinear resize ``n_in -> n_out`` (PIL's filter): the outputs ``[o0, o1)``
    whose filter window can touch the inputs ``[lo, hi]``, and the inputs ``[i0, i1)`` those
    outputs read. Both are supersets (one extra input pixel each side): only these matter."""
    scale = n_in / n_out
    reach = max(scale, 1.0) + 1.0  # PIL's window is the filter support (scale when shrinking) + 1/2 pixel
    o0 = max(0, math.floor((lo - reach) / scale - 0.5))
    o1 = min(n_out, math.ceil((hi + 1 + reach) / scale - 0.5) + 1)
    i0 = max(0, math.floor((o0 + 0.5) * scale - reach))
    i1 = min(n_in, math.ceil((o1 - 0.5) * scale + reach) + 1)
    return o0, o1, i0, i1


def upsample_where(prob: np.ndarray, width: int, height: int, threshold: float):
    """The part of ``upsample_probs(prob, width, height)`` that can be ``>= threshold``, exactly.

    Returns ``(box, y, x)``, ``box`` being ``upsample_probs(...)[y : y + h, x : x + w]``, bit for
    bit, and every pixel outside it ``< threshold``; None when no pixel reaches the threshold.
    Why it is exact: a bilinear output is a convex combination of the inputs in its window (PIL's
    weights are >= 0 and sum to 1, each pass rounds once to float32), so it cannot exceed their
    maximum; outputs whose windows hold no input ``>= threshold`` stay below it. Inside the box PIL
    does the arithmetic: its resize is two passes (horizontal, then vertical, for growing images),
    each line of a pass computed alone with coefficients that depend only on the sizes, so the
    input rows the box needs, resized horizontally at full width, then the box's columns (padded
    to full height) resized vertically, are the same numbers. PIL >= 11 runs the vertical pass
    first when the height shrinks much more than the width; then the whole map is resized.
    ``tests/test_pixels_fast.py`` checks it against the full resize.
    """
    hot = prob >= threshold
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    if not rows.size:
        return None
    ih, iw = prob.shape
    y0, y1, r0, r1 = _reach(int(rows[0]), int(rows[-1]), ih, height)
    x0, x1, _, _ = _reach(int(cols[0]), int(cols[-1]), iw, width)
    if ih - height > 0 and ih - height > 2 * (iw - width):  # PIL's vertical-first case
        return upsample_probs(prob, width, height)[y0:y1, x0:x1], y0, x0
    band = np.ascontiguousarray(prob[r0:r1], np.float32)
    if width != iw:
        band = np.asarray(Image.fromarray(band, "F").resize((width, r1 - r0), Image.BILINEAR), np.float32)
    if height == ih:
        return band[y0 - r0 : y1 - r0, x0:x1], y0, x0
    cols_full = np.zeros((ih, x1 - x0), np.float32)  # rows outside [r0, r1) reach no output in the box
    cols_full[r0:r1] = band[:, x0:x1]
    up = Image.fromarray(cols_full, "F").resize((x1 - x0, height), Image.BILINEAR)
    return np.asarray(up.crop((0, y0, x1 - x0, y1)), np.float32), y0, x0


def measure(prob_small: np.ndarray, width: int, height: int, threshold: float, image_size: int) -> Measured:
    """The full-size mask of a network probability map, its face pixels, regions and confidence.

    One pass: the probabilities are upsampled once, only where they can reach the threshold
    (:func:`upsample_where`; the same numbers as upsampling all of it), thresholded and the face
    regions labelled (8-connectivity, only within the faces' bounding box), so ``faces``, the
    ``boxes`` (one per counted region) and the mask always agree.
    """
    from scipy import ndimage

    out = Measured(np.zeros((height, width), np.uint8), face_box=(0, 0, np.zeros((0, 0), bool)))
    found = upsample_where(prob_small, width, height, threshold)
    if found is None:
        return out
    prob, by, bx = found
    face = prob >= threshold
    out.face_pixels = int(np.count_nonzero(face))
    if not out.face_pixels:
        return out
    rows, cols = np.flatnonzero(face.any(axis=1)), np.flatnonzero(face.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = face[y0:y1, x0:x1]  # label only the faces' bounding box
    by, bx = by + y0, bx + x0
    out.face_box = (by, bx, crop)
    out.mask[by : by + crop.shape[0], bx : bx + crop.shape[1]] = crop.view(np.uint8) * np.uint8(255)
    values = prob[y0:y1, x0:x1][crop]  # the face pixels' probabilities, in the mask's row order
    out.mean_conf = float(values.mean())
    labels, n = ndimage.label(crop, structure=np.ones((3, 3), bool))
    region = labels[crop]
    sizes = np.bincount(region, minlength=n + 1)
    counted = np.flatnonzero(sizes[1:] >= min_face_area(width, height, image_size)) + 1
    out.faces = int(counted.size)
    if counted.size:
        sums = np.bincount(region, weights=values, minlength=n + 1)  # 20x faster than ndimage.mean
        slices = ndimage.find_objects(labels)
        for lab in counted:
            sy, sx = slices[lab - 1]
            score = float(sums[lab] / sizes[lab])
            out.boxes.append((bx + sx.start, by + sy.start, sx.stop - sx.start, sy.stop - sy.start, score))
    return out


def mask_stats(prob_small: np.ndarray, width: int, height: int, threshold: float, image_size: int):
    """Full-size 0/255 mask and its statistics from a network probability map (:func:`measure`)."""
    m = measure(prob_small, width, height, threshold, image_size)
    return m.mask, m.face_pixels, m.faces, m.mean_conf


def rle_counts(mask: np.ndarray) -> str:
    """COCO's compressed RLE ``counts`` of a 2-D mask (nonzero = face), column-major as COCO:
    ``pycocotools.mask.decode({"size": [h, w], "counts": <this>})`` gives the mask back."""
    from pycocotools import mask as cocomask

    rle = cocomask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return rle["counts"].decode("ascii")


def encode_png(mask_u8: np.ndarray) -> bytes:
    """The mask file: 8-bit grayscale PNG, 0/255 (:func:`~batchmask.inference.png.encode_gray_png`)."""
    return encode_gray_png(mask_u8)


def encode_overlay(data: bytes, mask_u8: np.ndarray, where: str) -> bytes:
    """A JPEG preview: the image with face pixels tinted red."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = pil_to_rgb(im, where).astype(np.float32)
    sel = mask_u8 > 0
    rgb[sel] = 0.5 * rgb[sel] + 0.5 * np.array([255.0, 0.0, 0.0], np.float32)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()
