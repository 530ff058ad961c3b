"""Pixel-array helpers shared by training, inference and the batch run (no model, no data format).

* :func:`resize_rgb` - an HxWx3 uint8 image to the network's input size (and augmentation);
  :func:`resize_pil` the same from a PIL image.
* :func:`upsample_probs` - a probability map back to the image's own size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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
