"""Resumable training and fine-tuning from a trained model (slow tier: every test trains).

A killed training resumed with ``--resume`` must follow the uninterrupted training's schedule
(epochs, learning rate per epoch, losses); ``--init-from`` must start from the given model's
weights, keep its architecture, and record where it started with the start's validation figures.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import VENV_BIN, wait_until

from batchmask.checkpoint import RESUME_DIR, TEST_GATE_ENV
from batchmask.cli import main

pytestmark = pytest.mark.slow

SMALL = ["--backbone-weights", "none", "--image-size", "64", "--alpha", "0.25", "--decoder", "lean4",
         "--crop-size", "32", "--batch-size", "4", "--patience", "0", "--seed", "3", "--quiet"]


def _history(out) -> list[dict[str, str]]:
    with (out / "history.csv").open() as f:
        return list(csv.DictReader(f))


def _invoke(args: list[str]):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res


def test_a_killed_training_resumes_on_the_uninterrupted_schedule(tmp_path, demo_wider):
    args = ["train", "--data", str(demo_wider), "--epochs", "3", "--warmup-epochs", "1", *SMALL]
    _invoke([*args, "--out", str(tmp_path / "whole")])
    # The same training, killed (SIGKILL, no chance to clean up) while held after its second epoch,
    # in the fine-tuning phase: its optimizer state and schedule position must come back.
    gate = tmp_path / "gate"
    proc = subprocess.Popen([str(VENV_BIN / "batchmask"), *args, "--out", str(tmp_path / "cut")],
                            env={**os.environ, TEST_GATE_ENV: f"2:{gate}"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (gate.parent / "gate.reached").is_file(), "epoch 2 saved", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cut = tmp_path / "cut"
    assert not (cut / "model.keras").exists() and (cut / RESUME_DIR / "state.json").is_file()
    res = _invoke(["train", "--resume", str(cut)])
    assert "Saved" in res.output
    whole, resumed = _history(tmp_path / "whole"), _history(cut)
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"] and [r["phase"] for r in resumed] == [
        "decoder", "finetune", "finetune"]
    for a, b in zip(whole, resumed, strict=True):
        assert float(a["learning_rate"]) == pytest.approx(float(b["learning_rate"]), rel=1e-6)
        # oneDNN's multithreaded reductions are not bitwise repeatable: round-off, not a new schedule
        for key in ("loss", "val_loss", "val_dice"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=2e-3, abs=1e-4), (a["epoch"], key)
    assert float(resumed[2]["learning_rate"]) < float(resumed[1]["learning_rate"])  # still the cosine decay
    assert not (cut / RESUME_DIR).exists()  # finished: nothing left to resume
    meta = json.loads((cut / "model.json").read_text())
    assert meta["training"]["epochs_run"] == 3 and meta["training"]["wall_s"] > 0
    res = CliRunner().invoke(main, ["train", "--resume", str(cut)])
    assert res.exit_code != 0 and "nothing to resume" in res.output


def test_a_time_limited_training_keeps_its_state_and_says_how_to_resume(tmp_path, demo_wider, caplog):
    out = tmp_path / "m"
    res = _invoke(["train", "--data", str(demo_wider), "--epochs", "2", "--warmup-epochs", "1", *SMALL,
                   "--time-limit", "0.0001", "--out", str(out)])
    assert "best epoch 1/1" in res.output and (out / RESUME_DIR / "state.json").is_file()
    assert any(f"batchmask train --resume {out}" in r.getMessage() for r in caplog.records)
    _invoke(["train", "--resume", str(out)])
    assert [r["epoch"] for r in _history(out)] == ["1", "2"] and not (out / RESUME_DIR).exists()


def test_init_from_starts_from_the_model_keeps_its_recipe_and_records_the_start(tmp_path, trained_model,
                                                                                 demo_wider):
    from batchmask.inference import load_model
    from batchmask.runtime import file_sha256

    start = trained_model.out
    start_meta = json.loads((start / "model.json").read_text())
    out = tmp_path / "ft"
    res = _invoke(["train", "--init-from", str(start), "--data", str(demo_wider), "--data", str(trained_model.pool),
                   "--split", "stratified", "--seed", "7", "--epochs", "1", "--backbone-weights", "none",
                   "--out", str(out), "--quiet"])
    assert "(starting model: " in res.output
    meta = json.loads((out / "model.json").read_text())
    cfg = meta["training"]["config"]
    # the start's architecture and recipe (its 64 px input, 32 px crops, lean4, per-image Dice) without
    # being asked; no warm-up, the fine-tuning rate
    assert meta["model"]["image_size"] == 64 and meta["model"]["decoder_filters"] == [128, 64, 48]
    assert cfg["crop_size"] == 32 and cfg["dice_per_image"] is True and cfg["small_face_weight"] == 3.0
    assert cfg["warmup_epochs"] == 0 and cfg["learning_rate"] == 5e-4 and cfg["init_from"] == str(start)
    assert [r["phase"] for r in _history(out)] == ["finetune"]
    init = meta["training"]["init_from"]
    assert init["path"] == str(start) and init["model_sha256"] == file_sha256(start / "model.keras")
    # the start scored on the *new* validation images (the same here: same data, split and seed)
    assert init["validation"]["images"] == meta["data"]["val_images"]
    assert init["validation"]["dice"] == pytest.approx(start_meta["metrics"]["validation"]["dice"], abs=1e-6)
    assert json.loads((start / "model.json").read_text()) == start_meta  # the start is not modified
    # it started from the weights: one epoch at a low rate moves them only a little
    a, b = load_model(start).keras_model.get_weights(), load_model(out).keras_model.get_weights()
    rel = [np.abs(x - y).mean() / (np.abs(x).mean() + 1e-12) for x, y in zip(a, b, strict=True) if x.size > 100]
    assert np.median(rel) < 0.1
