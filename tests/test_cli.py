"""The CLI: help texts, version, and clean error exits (one line, documented exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from batchmask.cli import main


@pytest.mark.parametrize("cmd", [[], ["train"], ["evaluate"], ["run"], ["jobs"]])
def test_help(cmd):
    res = CliRunner().invoke(main, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage: " in res.output


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "batchmask", "--version"], capture_output=True, text=True, check=True)
    assert "batchmask, version" in out.stdout


def test_train_missing_data_is_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2
    assert "does not exist" in res.output


def test_train_bad_data_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    res = CliRunner().invoke(main, ["train", "--data", str(bad), "--out", str(tmp_path / "m"), "--backbone-weights", "none"])
    assert res.exit_code == 1
    assert "Error: " in res.output and "bad.npy: not a .npy file" in res.output
    assert "Traceback" not in res.output


def test_train_bad_image_size(tmp_path, demo_wider):
    res = CliRunner().invoke(main, ["train", "--data", str(demo_wider), "--out", str(tmp_path / "m"), "--image-size", "100"])
    assert res.exit_code == 2
    assert "multiple of 32" in res.output


@pytest.mark.slow  # the session's training (conftest.trained_model, about 15 s)
def test_train_cli_end_to_end(trained_model, demo_wider):
    """Two sources (the second with WIDER's *val* annotation file), a split that holds out every event."""
    out, args, pool = trained_model.out, trained_model.args, trained_model.pool
    assert (out / "model.keras").is_file()
    meta = json.loads((out / "model.json").read_text())
    # --patience 0: no early stopping, every epoch runs (the best one is still the one kept).
    assert meta["training"]["config"]["patience"] == 0 and meta["training"]["epochs_run"] == 4
    assert meta["data"]["path"] == [str(demo_wider), str(pool)]
    assert [s["images"] for s in meta["data"]["sources"]] == [10, 5]
    val_events = {name.split("/")[0] for name in meta["data"]["split"]["val_names"]}
    assert meta["data"]["split"]["method"] == "stratified" and len(val_events) == 7  # 5 demo + 2 pool events
    assert {g["group"] for g in meta["metrics"]["validation_by_group"]} == val_events
    assert [b["bucket"] for b in meta["metrics"]["validation_by_face_size"]] == ["small", "medium", "large"]
    assert meta["model"]["decoder_filters"] == [128, 64, 48] and meta["model"]["decoder_block"] == "sepconv"
    assert meta["training"]["config"]["augment"]["crop_scale"] == [0.4, 1.0]
    from batchmask.inference import load_model
    from batchmask.model import count_macs

    net = load_model(out).keras_model
    assert meta["cost"] == {"multiply_adds": count_macs(net), "decoder_multiply_adds": count_macs(net, "decoder"),
                            "parameters": net.count_params()}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "--force" in again.output
