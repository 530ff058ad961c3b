"""Training: the outputs a user relies on (one model trained by the real CLI, shared), and the mechanics.

Every test here trains (seconds to tens of seconds each): the slow tier.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from batchmask.config import AugmentConfig, ModelConfig, TrainConfig
from batchmask.training import OutputExistsError, train

pytestmark = pytest.mark.slow  # every test trains


def small_model(**changes) -> ModelConfig:
    """Full 3x3 decoder convolutions (the "unet" block): the mechanics tests below were calibrated
    with it. A new object per call: no test can change another's configuration (a module-level
    instance was shared by every TrainConfig built from it)."""
    return ModelConfig(**{**dict(alpha=0.25, image_size=64, decoder_block="conv", decoder_projection=0,
                                 decoder_filters=(16, 16, 8, 8, 8), trainable_blocks=2), **changes})


def test_train_writes_model_directory(trained_model, demo_wider):
    out = trained_model.out  # conftest: `batchmask train` on two sources, stratified, seed 7, 4 epochs (1 warm-up)
    assert {p.name for p in out.iterdir()} >= {"model.keras", "model.json", "history.csv", "learning_curves.png"}
    assert not (out / ".best.weights.h5").exists() and not (out / ".resume").exists()
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"]["image_size"] == 64 and meta["model"]["alpha"] == 0.25
    # --crop-size 32: trained on 32x32 crops (test_training_sequence_gives_crops...), saved, validated
    # and run at the 64x64 inference size
    tc = meta["training"]["config"]
    assert tc["crop_size"] == 32 and tc["dice_per_image"] is True and tc["small_face_weight"] == 3.0
    from batchmask.inference import load_model

    assert load_model(out).keras_model.input_shape[1:3] == (64, 64)
    n_train, n_val = meta["data"]["train_images"], meta["data"]["val_images"]
    assert n_train + n_val == 15 and 0 < n_val < n_train
    assert len(meta["data"]["split"]["val_names"]) == n_val and meta["data"]["split"]["seed"] == 7
    assert len(meta["data"]["fingerprint"]) == 64
    assert meta["training"]["epochs_run"] == 4 and 1 <= meta["training"]["best_epoch"] <= 4
    assert meta["keras_version"] and meta["batchmask_version"]
    v = meta["metrics"]["validation"]
    thr = meta["model"]["threshold"]
    assert 0.0 < thr < 1.0 and v["threshold"] == thr and v["images"] == n_val
    # The stored validation figures, by hand: the saved model on the validation images at their
    # original size, at the stored threshold (a range check cannot tell a wrong figure).
    from batchmask.data import boxes_to_mask
    from batchmask.inference import load_model
    from batchmask.training import _load_split

    cfg = TrainConfig(val_fraction=meta["training"]["config"]["val_fraction"], seed=7, split="stratified")
    _, val, _, _ = _load_split([str(demo_wider), str(trained_model.pool)], None, cfg, None)
    assert [s.name for s in val] == meta["data"]["split"]["val_names"]
    dice, iou = [], []
    for s, p in zip(val, load_model(out).predict_proba([s.load_image() for s in val]), strict=True):
        t, pred = boxes_to_mask(s.boxes, *p.shape).astype(bool), p >= thr
        tp, fp, fn = (pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
    assert v["dice"] == pytest.approx(np.mean(dice), abs=2e-3) and v["iou"] == pytest.approx(np.mean(iou), abs=2e-3)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["phase"] for r in rows] == ["decoder", "finetune", "finetune", "finetune"]
    assert {"loss", "dice", "val_loss", "val_dice"} <= set(rows[0])
    # The kept epoch is the one with the best per-image validation Dice (the metric's kin).
    scores = [float(r["val_dice_t50"]) for r in rows]
    assert scores[meta["training"]["best_epoch"] - 1] == max(scores)


def test_split_is_seeded(trained_model, demo_wider):
    """The validation images recorded are the ones the same split of the same data gives again."""
    from batchmask.training import _load_split

    meta = json.loads((trained_model.out / "model.json").read_text())
    cfg = TrainConfig(val_fraction=meta["training"]["config"]["val_fraction"], seed=7, split="stratified")
    _, val, _, _ = _load_split([str(demo_wider), str(trained_model.pool)], None, cfg, None)
    assert meta["data"]["split"]["val_names"] == [s.name for s in val]
    _, other, _, _ = _load_split([str(demo_wider), str(trained_model.pool)], None,
                                 dataclasses.replace(cfg, seed=8), None)
    assert [s.name for s in other] != [s.name for s in val]  # (the seed matters: the check is not vacuous)


def test_refuses_to_overwrite(trained_model, demo_wider):
    out = trained_model.out
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--force"):
        train(str(demo_wider), out, TrainConfig(model=small_model(), backbone_weights="none", epochs=1))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_learning_happens_on_a_trivial_task(tmp_path):
    """Bright squares on dark noise: a few epochs must beat the untrained Dice clearly."""
    from batchmask.data import Sample
    from batchmask.evaluation import evaluate

    rng = np.random.default_rng(0)
    samples = []
    for i in range(48):
        img = rng.integers(0, 60, (96, 96, 3), dtype=np.uint8)
        x, y = rng.integers(5, 50, 2)
        img[y : y + 40, x : x + 40] = 230
        samples.append(Sample(name=f"s{i}", boxes=np.array([[x, y, x + 40, y + 40]], np.float32), image=img))
    cfg = TrainConfig(model=small_model(trainable_blocks=13),
                      augment=AugmentConfig(enabled=False), backbone_weights="none",
                      epochs=10, warmup_epochs=0, batch_size=4, learning_rate=3e-3, val_fraction=0.25, seed=1)
    train(samples, tmp_path / "m", cfg, progress=False)
    res = evaluate(str(tmp_path / "m"), samples[:6])
    assert res.metrics["dice"] > 0.6
