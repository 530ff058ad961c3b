"""The training's input pipeline: the images decoded once and downscaled (:func:`_cache_images`),
the augmented training batches as a Keras ``PyDataset`` seeded per (seed, epoch, batch)
(:func:`_make_sequence`), and the fixed validation pairs (:func:`_fixed_pairs`).

Apart from :mod:`batchmask.training` (loading, the phases, the model directory) because it is
the one part that turns samples into arrays, and tests drive it without a training. Importable
from :mod:`batchmask.training`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from .augment import downscale_sample, make_pair, make_weighted_pair
from .config import TrainConfig
from .data import Sample


def _cache_images(samples: Sequence[Sample], max_side: int, desc: str, progress: bool):
    images, boxes = [], []
    for s in tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False):
        im, b = downscale_sample(s, max_side)
        images.append(im)
        boxes.append(b)
    return images, boxes


def _make_sequence(images, boxes, cfg: TrainConfig, workers: int):
    """A keras.utils.PyDataset of augmented batches (built lazily so Keras loads on demand)."""
    import keras

    class AugmentedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False)
            self.set_epoch(0)

        def __len__(self) -> int:
            # Full batches only (the order is reshuffled every epoch): one batch shape means
            # one compiled training step under XLA/JAX instead of two.
            return max(1, len(images) // cfg.batch_size)

        def __getitem__(self, idx: int):
            # Seeded per (seed, epoch, batch): reproducible whatever the worker order.
            rng = np.random.default_rng([cfg.seed, self.epoch, idx])
            sel = self.order[idx * cfg.batch_size : (idx + 1) * cfg.batch_size]
            return _batch([images[i] for i in sel], [boxes[i] for i in sel], cfg.train_size, cfg.small_face_weight,
                          rng, cfg.augment)

        def on_epoch_end(self) -> None:
            self.set_epoch(self.epoch + 1)

        def set_epoch(self, epoch: int) -> None:
            """Where the next batches come from: epoch 0's order is seeded by the seed alone (as
            before), every later one by (seed, epoch), so a resumed training draws the same."""
            self.epoch = epoch
            rng = np.random.default_rng(cfg.seed if epoch == 0 else [cfg.seed, epoch])
            self.order = rng.permutation(len(images))

    return AugmentedBatches()


def _batch(images, boxes, size: int, small_face_weight: float = 1.0, rng=None, augment=None):
    """A batch (x, y): x (N,H,W,3); y (N,H,W,1), or (N,H,W,2) with the small-face loss weights as
    channel 1 when ``small_face_weight`` > 1 (what ``losses.get_loss(weighted=True)`` reads)."""
    if small_face_weight > 1.0:
        pairs = [make_weighted_pair(im, b, size, small_face_weight, rng, augment)
                 for im, b in zip(images, boxes, strict=True)]
    else:
        pairs = [make_pair(im, b, size, rng, augment) for im, b in zip(images, boxes, strict=True)]
    x = np.stack([p[0] for p in pairs]).astype(np.float32)
    y = np.stack([np.stack(p[1:], axis=-1) for p in pairs]).astype(np.float32)
    return x, y


def _fixed_pairs(images, boxes, size: int, batch_size: int, small_face_weight: float = 1.0):
    """Un-augmented validation pairs for per-epoch monitoring.

    Trimmed to a whole number of batches (one compiled shape); the final validation after
    training scores every image at its original size.
    """
    bs = min(batch_size, len(images))
    n = len(images) // bs * bs
    return _batch(images[:n], boxes[:n], size, small_face_weight)
