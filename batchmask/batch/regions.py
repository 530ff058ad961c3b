"""One image's mask and what the results table says about it: pure functions of a probability map.

:func:`measure` upsamples the network's probability map to the image's size once, thresholds it and
labels its connected face regions; everything per image derives from that one pass, so the
``faces`` count, the ``boxes`` (one per counted region) and the COCO RLE of the mask always agree.

Runs where the mask is (the worker): the RLE and boxes travel in the part files as two text
columns (:data:`TABLE_FIELDS`) and reach ``results.parquet`` only (``coverage.csv`` stays as it was).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..image import upsample_probs

#: A connected face region counts in ``faces`` when its area is at least this many network
#: output pixels, i.e. ``MIN_FACE_NET_PIXELS * width * height / image_size**2`` original pixels
#: (and at least ``MIN_FACE_PIXELS``).
MIN_FACE_NET_PIXELS = 4
MIN_FACE_PIXELS = 16
#: The part-file columns that go to results.parquet only: COCO RLE counts, and the boxes as JSON
#: ``[[x, y, w, h, score], ...]`` (compact: a part file is text).
TABLE_FIELDS = ("mask_rle", "boxes")


@dataclass
class Measured:
    """A full-size 0/255 mask and its statistics."""

    mask: np.ndarray  # (height, width) uint8, 255 = face
    face_pixels: int = 0
    faces: int = 0
    mean_conf: float | None = None
    #: One ``(x, y, w, h, score)`` per region counted in ``faces``: the region's bounding box in
    #: image pixels (COCO's bbox convention) and its mean face probability.
    boxes: list[tuple[int, int, int, int, float]] = field(default_factory=list)

    def rle(self) -> str:
        return rle_counts(self.mask)

    def table_fields(self) -> dict[str, str]:
        """The :data:`TABLE_FIELDS` of this image's row in a part file."""
        boxes = [[x, y, w, h, round(s, 4)] for x, y, w, h, s in self.boxes]
        return {"mask_rle": self.rle(), "boxes": json.dumps(boxes, separators=(",", ":"))}


def min_face_area(width: int, height: int, image_size: int) -> float:
    return max(MIN_FACE_PIXELS, MIN_FACE_NET_PIXELS * width * height / image_size**2)


def measure(prob_small: np.ndarray, width: int, height: int, threshold: float, image_size: int) -> Measured:
    """The full-size mask of a network probability map, its face pixels, regions and confidence."""
    from scipy import ndimage

    prob = upsample_probs(prob_small, width, height)
    face = prob >= threshold
    out = Measured(face.view(np.uint8) * np.uint8(255), int(np.count_nonzero(face)))
    if not out.face_pixels:
        return out
    out.mean_conf = float(prob[face].mean())
    rows, cols = np.flatnonzero(face.any(axis=1)), np.flatnonzero(face.any(axis=0))
    y0, x0 = int(rows[0]), int(cols[0])
    crop = face[y0 : rows[-1] + 1, x0 : cols[-1] + 1]  # label only the faces' bounding box
    labels, n = ndimage.label(crop, structure=np.ones((3, 3), bool))
    if not n:
        return out
    region = labels[crop]
    sizes = np.bincount(region, minlength=n + 1)
    counted = np.flatnonzero(sizes[1:] >= min_face_area(width, height, image_size)) + 1
    out.faces = int(counted.size)
    if counted.size:
        pcrop = prob[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
        sums = np.bincount(region, weights=pcrop[crop], minlength=n + 1)  # 20x faster than ndimage.mean
        slices = ndimage.find_objects(labels)
        for lab in counted:
            sy, sx = slices[lab - 1]
            score = float(sums[lab] / sizes[lab])
            out.boxes.append((x0 + sx.start, y0 + sy.start, sx.stop - sx.start, sy.stop - sy.start, score))
    return out


def rle_counts(mask: np.ndarray) -> str:
    """COCO's compressed RLE ``counts`` of a 2-D mask (nonzero = face), column-major as COCO:
    ``pycocotools.mask.decode({"size": [h, w], "counts": <this>})`` gives the mask back."""
    from pycocotools import mask as cocomask

    rle = cocomask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return rle["counts"].decode("ascii")


def parse_boxes(text: str | None) -> list[dict] | None:
    """The part file's ``boxes`` JSON as ``results.parquet``'s structs; None when not recorded."""
    if not text:
        return None
    return [{"x": x, "y": y, "w": w, "h": h, "score": s} for x, y, w, h, s in json.loads(text)]
