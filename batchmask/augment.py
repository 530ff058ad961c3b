"""(image, mask) pairs at the model's input size, with box-consistent augmentation.

The geometry (crop, scale, flip) is applied to the image *and* to the boxes; the mask is
rasterised from the transformed boxes, so image and mask can never drift apart.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config import AugmentConfig
from .data import Sample, boxes_to_mask, face_weights
from .inference.pixels import resize_rgb


def downscale_sample(sample: Sample, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a sample and shrink it so its longer side is at most ``max_side``.

    Training keeps these in memory instead of the full-size originals.
    """
    image = sample.load_image()
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = resize_rgb(image, nw, nh)
        boxes = sample.boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    else:
        boxes = sample.boxes.copy()
    return image, boxes


def make_pair(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator | None = None,
    cfg: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)``: x is size x size x 3 uint8, y is size x size uint8 of 0/1.

    Without ``rng``/``cfg`` (or with ``cfg.enabled`` false) the whole image is resized,
    which is exactly what inference does.
    """
    x, sb = transform(image, boxes, size, rng, cfg)
    return x, boxes_to_mask(np.clip(sb, 0, size), size, size)


def make_weighted_pair(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    max_weight: float,
    rng: np.random.Generator | None = None,
    cfg: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_pair` plus the per-pixel loss weights of :func:`data.face_weights`.

    The same ``rng`` draws give the same ``(x, y)`` as :func:`make_pair`.
    """
    x, sb = transform(image, boxes, size, rng, cfg)
    return x, boxes_to_mask(np.clip(sb, 0, size), size, size), face_weights(sb, size, size, max_weight)


def transform(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    rng: np.random.Generator | None = None,
    cfg: AugmentConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The augmented image (size x size x 3 uint8) and the boxes in its pixels, not clipped."""
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0, y0, cw, ch = 0.0, 0.0, float(w), float(h)
    augment = rng is not None and cfg is not None and cfg.enabled
    if augment:
        s = rng.uniform(*cfg.crop_scale)
        a = np.exp(rng.uniform(np.log(cfg.crop_aspect[0]), np.log(cfg.crop_aspect[1])))
        cw = min(w, max(8.0, w * s * np.sqrt(a)))
        ch = min(h, max(8.0, h * s / np.sqrt(a)))
        x0 = rng.uniform(0, w - cw)
        y0 = rng.uniform(0, h - ch)
    crop = Image.fromarray(image).resize(
        (size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )
    x = np.asarray(crop)
    sb = (boxes - np.array([x0, y0, x0, y0], np.float32)) * np.array(
        [size / cw, size / ch, size / cw, size / ch], np.float32
    )
    if augment and cfg.hflip and rng.random() < 0.5:
        x = x[:, ::-1]
        sb = np.stack([size - sb[:, 2], sb[:, 1], size - sb[:, 0], sb[:, 3]], axis=1)
    if augment:
        x = color_jitter(x, rng, cfg)
    return np.ascontiguousarray(x), sb


def color_jitter(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Random brightness, contrast and saturation (each a factor in 1 +/- the setting)."""
    f = x.astype(np.float32)
    if cfg.brightness:
        f *= rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    if cfg.contrast:
        m = f.mean()
        f = (f - m) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + m
    if cfg.saturation:
        g = f.mean(axis=2, keepdims=True)
        f = (f - g) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + g
    return np.clip(f, 0, 255).astype(np.uint8)
