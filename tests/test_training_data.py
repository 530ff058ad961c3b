"""What training feeds the network, without training (fast tier): crops, their seeding, validation pairs."""

from __future__ import annotations

import numpy as np
import pytest

from batchmask.config import AugmentConfig, ModelConfig, TrainConfig
from batchmask.training import _fixed_pairs, _make_sequence, train


def _images(n: int = 6):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (90 + 7 * i, 120, 3), np.uint8) for i in range(n)]
    boxes = [np.array([[10, 10, 50, 60]], np.float32) for _ in range(n)]
    return images, boxes


def test_training_sequence_gives_crops_and_validation_gives_the_input_size():
    """--crop-size 32 with a 64 px model: batches of 32x32 crops; validation pairs at 64x64."""
    images, boxes = _images()
    cfg = TrainConfig(model=ModelConfig(image_size=64), crop_size=32, batch_size=4, seed=5,
                      augment=AugmentConfig(enabled=True))
    seq = _make_sequence(images, boxes, cfg, workers=0)
    assert len(seq) == 1  # full batches only: 6 images, batch 4
    x, y = seq[0]
    assert x.shape == (4, 32, 32, 3) and y.shape == (4, 32, 32, 1)
    assert x.dtype == y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0} and y.any()
    x2, _ = _make_sequence(images, boxes, cfg, workers=0)[0]
    assert np.array_equal(x, x2)  # seeded per (seed, epoch, batch)
    seq.on_epoch_end()
    assert not np.array_equal(seq[0][0], x)  # a new epoch: new crops
    vx, vy = _fixed_pairs(images, boxes, cfg.model.image_size, cfg.batch_size)
    assert vx.shape == (4, 64, 64, 3) and vy.shape == (4, 64, 64, 1)
    # without --crop-size the network trains at its input size
    full = _make_sequence(images, boxes, TrainConfig(model=ModelConfig(image_size=64), batch_size=4), workers=0)
    assert full[0][0].shape == (4, 64, 64, 3)


def test_crop_size_must_be_a_multiple_of_32(tmp_path, demo_wider):
    with pytest.raises(ValueError, match="crop_size"):
        train(str(demo_wider), tmp_path / "bad", TrainConfig(model=ModelConfig(image_size=64), crop_size=48),
              progress=False)
    assert not (tmp_path / "bad").exists()
