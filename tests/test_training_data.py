"""What training feeds the network, without training (fast tier): crops, their seeding, validation pairs."""

from __future__ import annotations

import numpy as np
import pytest

from batchmask.augment import make_pair, make_weighted_pair
from batchmask.config import AugmentConfig, ModelConfig, TrainConfig
from batchmask.data import face_weights
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


def test_face_weights_by_hand():
    """Faces under 32x32 px weigh 32**2 / area, capped; large faces and background weigh 1."""
    boxes = np.array([[0, 0, 16, 16],      # 256 px: 1024 / 256 = 4
                      [20, 0, 28, 8],      # 64 px: 16, capped at 5
                      [0, 20, 40, 60]],    # 1600 px: large, 1
                     np.float32)
    w = face_weights(boxes, 64, 64, max_weight=5.0)
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert (w[0:16, 0:16] == 4.0).all() and (w[0:8, 20:28] == 5.0).all()
    assert (w[20:60, 0:40] == 1.0).all() and (w[:, 45:] == 1.0).all() and w[16:20].max() == 1.0
    # Overlaps keep the larger weight; a box cut by the image edge keeps its whole-box area.
    w2 = face_weights(np.array([[0, 0, 16, 16], [8, 8, 24, 16]], np.float32), 32, 32, max_weight=10.0)
    assert w2[10, 10] == 8.0 and w2[2, 2] == 4.0 and w2[10, 20] == 8.0
    cut = face_weights(np.array([[-40, -40, 8, 8]], np.float32), 32, 32, max_weight=10.0)
    assert cut.max() == 1.0  # a 48x48 face, mostly outside the crop
    assert (face_weights(boxes, 64, 64, max_weight=1.0) == 1.0).all()  # off


def test_weighted_pairs_are_the_same_pairs_plus_weights():
    """The weights follow the crop and flip of the very same draw (same rng, same x and y)."""
    images, boxes = _images(1)
    cfg = AugmentConfig(enabled=True)
    for seed in range(6):
        x, y = make_pair(images[0], boxes[0], 32, np.random.default_rng(seed), cfg)
        xw, yw, w = make_weighted_pair(images[0], boxes[0], 32, 4.0, np.random.default_rng(seed), cfg)
        assert np.array_equal(x, xw) and np.array_equal(y, yw)
        assert ((w > 1.0) <= y.astype(bool)).all()  # weights only inside faces
        assert w.max() <= 4.0


def test_training_batches_carry_weights_as_a_second_channel():
    images, boxes = _images()
    small = [np.array([[10, 10, 30, 30]], np.float32) for _ in images]  # 20 px faces at 64 px input
    cfg = TrainConfig(model=ModelConfig(image_size=64), batch_size=4, seed=5, small_face_weight=3.0,
                      augment=AugmentConfig(enabled=False))
    x, y = _make_sequence(images, small, cfg, workers=0)[0]
    assert x.shape == (4, 64, 64, 3) and y.shape == (4, 64, 64, 2)
    mask, w = y[..., 0], y[..., 1]
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert (w[mask == 1] > 1.0).all() and (w[mask == 0] == 1.0).all() and w.max() <= 3.0
    vx, vy = _fixed_pairs(images, small, 64, 4, small_face_weight=3.0)
    assert vy.shape == (4, 64, 64, 2) and (vy[..., 1][vy[..., 0] == 1] > 1.0).all()
    assert np.array_equal(vy[..., 0], _fixed_pairs(images, small, 64, 4)[1][..., 0])  # same masks as unweighted
    with pytest.raises(ValueError, match="small_face_weight"):
        TrainConfig(small_face_weight=0.5).validate()


def test_split_seed_keeps_the_validation_images_while_seed_changes(demo_wider):
    from batchmask.training import _load_split

    def val_names(**kw):
        _, val, split, _ = _load_split(str(demo_wider), None, TrainConfig(val_fraction=0.3, **kw), None)
        return [s.name for s in val], split["seed"]

    assert val_names(seed=8, split_seed=7) == val_names(seed=7)
    assert val_names(seed=8)[0] != val_names(seed=7)[0]  # the split does depend on its seed
    assert val_names(seed=8, split_seed=7)[1] == 7  # model.json records the split's seed


def test_init_from_refuses_another_architecture_before_loading_anything(tmp_path, tiny_model_dir, demo_wider):
    from click.testing import CliRunner

    from batchmask.cli import main

    res = CliRunner().invoke(main, ["train", "--init-from", str(tiny_model_dir), "--data", str(demo_wider),
                                    "--decoder", "unet", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "decoder_block='sepconv'" in res.output and "fine-tuning keeps the architecture" in res.output
    assert not (tmp_path / "x").exists()


def test_resume_refuses_options_it_would_ignore(tmp_path, demo_wider):
    from click.testing import CliRunner

    from batchmask.cli import main

    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path), "--epochs", "3", "--images", str(tmp_path)])
    assert res.exit_code == 2 and "only --time-limit and --quiet apply" in res.output
    assert "drop --images, --epochs" in res.output or "drop --epochs, --images" in res.output
