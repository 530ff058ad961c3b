"""Image decoding: encoded bytes, files, PIL images or arrays to contiguous HxWx3 uint8 RGB with
the EXIF orientation applied, and :class:`DataError`, which they raise for data that cannot be
used.

Apart from :mod:`batchmask.data` (the loaders) because the inference pixel path decodes with the
same functions and has no use for the loaders; nothing here knows about samples or labels. All of
it is importable from :mod:`batchmask.data`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class DataError(ValueError):
    """Training or evaluation data that cannot be used; the message names file and position."""


def to_rgb_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Convert grayscale (HxW, HxWx1), RGB or RGBA arrays to contiguous HxWx3 uint8."""
    arr = np.asarray(arr)
    if arr.size == 0:
        raise DataError(f"{where}: empty image array (shape {arr.shape})")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = np.round(arr * 255.0)
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{where}: pixel values outside 0..255 (dtype {arr.dtype})")
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise DataError(f"{where}: unsupported image shape {arr.shape} (want HxW, HxWx3 or HxWx4)")
    return np.ascontiguousarray(arr)


def pil_to_rgb(im: Image.Image, where: str = "image") -> np.ndarray:
    """Convert any PIL image (first frame) to HxWx3 uint8 with EXIF orientation applied.

    Handles palette, grayscale, LA/RGBA (alpha dropped), CMYK and 16/32-bit modes.
    """
    rgb = pil_rgb_image(im, where)
    return to_rgb_uint8(np.asarray(rgb), where)


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: EXIF orientations that ImageOps.exif_transpose turns (1 and unknown values: none).
_TRANSPOSED = (2, 3, 4, 5, 6, 7, 8)


def pil_rgb_image(im: Image.Image, where: str = "image") -> Image.Image:
    """:func:`pil_to_rgb`, but kept as a PIL RGB image (a resize can follow without a copy)."""
    if im.getexif().get(0x0112, 1) in _TRANSPOSED:  # else exif_transpose only copies (1 ms for a 1024-px photo)
        im = ImageOps.exif_transpose(im) or im
    if im.mode in _WIDE_MODES:
        a = np.asarray(im, dtype=np.float64)
        if a.ndim == 3:
            a = a[..., 0]
        top = 65535.0 if (im.mode.startswith("I;16") or a.max() > 255) else 255.0
        return Image.fromarray(to_rgb_uint8(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), where))
    if im.mode == "P" or im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Decode encoded image bytes to HxWx3 uint8 with EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return pil_to_rgb(im, where)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for bad files
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def read_image(path: str | os.PathLike) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from exc
    return decode_image(data, str(path))
