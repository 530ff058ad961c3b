"""Boxes to pixels: the 0/1 face mask a model learns (:func:`boxes_to_mask`) and the per-pixel
loss weights that raise small faces (:func:`face_weights`).

Apart from :mod:`batchmask.data` (the loaders) because they are pure numpy on boxes in pixels,
used by the augmentation, the scoring and the baseline, not by loading. Importable from
:mod:`batchmask.data`.
"""

from __future__ import annotations

import numpy as np


def boxes_to_mask(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Rasterise boxes (x1, y1, x2, y2 in pixels) into an HxW uint8 mask of 0/1.

    A pixel belongs to a box when its centre lies inside it, so masks are consistent at any
    scale.
    """
    mask = np.zeros((h, w), np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, c1 = int(np.ceil(x1 - 0.5)), int(np.ceil(x2 - 0.5))
        r0, r1 = int(np.ceil(y1 - 0.5)), int(np.ceil(y2 - 0.5))
        mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = 1
    return mask


#: Side (pixels of the network's input) under which ``face_weights`` raises a face's weight.
SMALL_FACE_PX = 32


def face_weights(boxes: np.ndarray, h: int, w: int, max_weight: float, ref: float = SMALL_FACE_PX) -> np.ndarray:
    """Per-pixel loss weights (HxW float32): 1, and ``clip(ref**2 / area, 1, max_weight)`` inside a face.

    A face smaller than ``ref`` x ``ref`` pixels gets its pixels weighted up in inverse
    proportion to its area (capped at ``max_weight``), so a few small faces are not drowned
    by one large face in the image's Dice. The area is the whole box's, also where it is cut
    by the crop: a large face half outside the crop is still a large face. Where faces
    overlap, the larger weight counts. Pixels are those of :func:`boxes_to_mask`.
    """
    weights = np.ones((h, w), np.float32)
    if max_weight <= 1.0:
        return weights
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        area = max((x2 - x1) * (y2 - y1), 1e-6)
        wt = np.float32(min(max(ref * ref / area, 1.0), max_weight))
        c0, c1 = max(int(np.ceil(x1 - 0.5)), 0), max(int(np.ceil(x2 - 0.5)), 0)
        r0, r1 = max(int(np.ceil(y1 - 0.5)), 0), max(int(np.ceil(y2 - 0.5)), 0)
        region = weights[r0:r1, c0:c1]
        np.maximum(region, wt, out=region)
    return weights
