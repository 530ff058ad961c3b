"""README promises of `batchmask train` that no other test checked (issue 14).

The loss formulas are checked by hand in the fast tier. Two small CLI trainings (alpha 0.25,
32x32 input, a few 32x32 images, random weights) are slow: each covers several options at once,
checked in model.json, history.csv and the saved model's behaviour.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_wider

from batchmask.cli import main
from batchmask.losses import bce_logdice_loss, dice_loss, get_loss

T = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 1]]], np.float32)
P = np.array([[[0.9, 0.4], [0.2, 0.0]], [[0.1, 0.3], [0.5, 0.8]]], np.float32)


def _bce(t, p):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def _dice(t, p, per_image=False):
    if per_image:
        return float(np.mean([_dice(a, b) for a, b in zip(t, p, strict=True)]))
    return float((2 * (t * p).sum() + 1) / (t.sum() + p.sum() + 1))


@pytest.mark.parametrize("per_image", [False, True])
def test_dice_and_bce_logdice_losses_by_hand(per_image):
    # batch: inter 0.9 + 0.4 + 0.8 = 2.1, sums 3 + 3.2 -> (4.2 + 1) / (6.2 + 1)
    assert _dice(T, P) == pytest.approx(5.2 / 7.2)
    # per image: (2*1.3 + 1) / (2 + 1.5 + 1) = 0.8, (2*0.8 + 1) / (1 + 1.7 + 1) = 2.6/3.7
    assert _dice(T, P, per_image=True) == pytest.approx((3.6 / 4.5 + 2.6 / 3.7) / 2)
    d = _dice(T, P, per_image)
    assert float(dice_loss(T, P, per_image=per_image)) == pytest.approx(1 - d, rel=1e-5)
    assert float(get_loss("dice", per_image=per_image)(T, P)) == pytest.approx(1 - d, rel=1e-5)
    expected = _bce(T, P) - np.log(d)
    assert float(bce_logdice_loss(T, P, per_image=per_image)) == pytest.approx(expected, rel=1e-5)
    assert float(get_loss("bce_logdice", per_image=per_image)(T, P)) == pytest.approx(expected, rel=1e-5)


def _history(out):
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


SMALL = ["--backbone-weights", "none", "--alpha", "0.25", "--image-size", "32", "--quiet"]


@pytest.mark.slow
def test_train_npy_with_val_data_patience_tta_flip_and_force(tmp_path):
    """images.npy through the CLI, --val-data, --patience 1 ending fine-tuning early, --tta-flip,
    and --force replacing a model in --out."""
    from batchmask.convert import write_npy
    from batchmask.data import Sample
    from batchmask.inference import load_model

    rng = np.random.default_rng(0)

    def faceless(prefix, n):  # no faces: the network soon predicts none, and val_dice_t50 stays 1
        return [Sample(name=f"{prefix}{i}", boxes=np.zeros((0, 4), np.float32),
                       image=rng.integers(0, 255, (32, 32, 3), np.uint8)) for i in range(n)]

    write_npy(faceless("t", 8), tmp_path / "images.npy")
    write_npy(faceless("v", 4), tmp_path / "val.npy")
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.keras").write_bytes(b"an old model")
    args = ["train", "--data", str(tmp_path / "images.npy"), "--val-data", str(tmp_path / "val.npy"), "--out", str(out),
            *SMALL, "--epochs", "12", "--warmup-epochs", "2", "--batch-size", "4", "--learning-rate", "0.01",
            "--loss", "bce_logdice", "--patience", "1", "--tta-flip"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--force" in res.output  # an existing model is never replaced silently
    assert (out / "model.keras").read_bytes() == b"an old model"
    res = CliRunner().invoke(main, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert "Saved" in res.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["data"]["path"] == str(tmp_path / "images.npy") and meta["data"]["train_images"] == 8
    split = meta["data"]["split"]
    assert split["method"] == "separate" and split["val_data"] == str(tmp_path / "val.npy")
    assert meta["data"]["val_images"] == len(split["val_names"]) == 4 and split["val_sources"][0]["images"] == 4
    assert meta["training"]["config"]["loss"] == "bce_logdice" and meta["model"]["tta_flip"] is True
    # --patience 1: fine-tuning ended after one epoch without a better val_dice_t50, before epoch 12.
    rows = _history(out)
    tune = [float(r["val_dice_t50"]) for r in rows if r["phase"] == "finetune"]
    assert len(rows) == meta["training"]["epochs_run"] < 12, [r["val_dice_t50"] for r in rows]
    assert len(tune) >= 2 and tune[-1] <= max(tune[:-1])
    # --tta-flip: the stored model averages with the mirrored image, so mirroring the input mirrors
    # the output exactly (an untrained network without it is far from symmetric).
    m = load_model(out)
    x = rng.integers(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(m.predict_batch(x[:, :, ::-1]), m.predict_batch(x)[:, :, ::-1], atol=1e-6)
    plain = m.keras_model.predict(x, verbose=0)[..., 0]
    assert np.abs(plain[:, :, ::-1] - m.keras_model.predict(x[:, :, ::-1], verbose=0)[..., 0]).max() > 1e-4


@pytest.mark.slow
def test_train_split_event_time_limit_and_dice_loss(tmp_path):
    """--split event holds out whole events; --time-limit stops after the first epoch and keeps it;
    --loss dice: history's val_loss is 1 - soft Dice of the saved model on the validation pairs."""
    from batchmask.augment import make_pair
    from batchmask.data import load_wider
    from batchmask.inference import load_model

    data = synthetic_wider(tmp_path / "wider", {"1--A": 3, "2--B": 3, "3--C": 3, "4--D": 3})
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--out", str(out), *SMALL, "--split", "event",
                                    "--val-fraction", "0.5", "--epochs", "4", "--warmup-epochs", "2",
                                    "--batch-size", "8", "--loss", "dice", "--time-limit", "0.0001"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "model.json").read_text())
    val_names = meta["data"]["split"]["val_names"]
    samples = load_wider(data)
    val_events = {n.split("/")[0] for n in val_names}
    train_events = {s.group for s in samples if s.name not in val_names}
    assert meta["data"]["split"]["method"] == "event" and len(val_events) == 2
    assert not val_events & train_events and len(val_names) == 6  # whole events, every image of them
    # --time-limit: one epoch of the 4 planned, and that epoch's weights were kept
    rows = _history(out)
    assert len(rows) == 1 and meta["training"]["epochs_run"] == 1 and meta["training"]["best_epoch"] == 1
    # --loss dice: the logged validation loss (one batch of the 6 validation pairs) by hand
    val = [s for s in samples if s.name in val_names]
    pairs = [make_pair(s.load_image(), s.boxes, 32) for s in val]
    x = np.stack([p[0] for p in pairs]).astype(np.float32)
    t = np.stack([p[1] for p in pairs]).astype(np.float64)
    p = load_model(out).keras_model.predict(x, verbose=0)[..., 0].astype(np.float64)
    assert float(rows[0]["val_loss"]) == pytest.approx(1 - _dice(t, p), rel=1e-3)
    assert float(rows[0]["val_loss"]) != pytest.approx(_bce(t, p) + 1 - _dice(t, p), rel=1e-2)  # not bce_dice
