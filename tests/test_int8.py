"""`batchmask export` (fp32 and int8 ONNX files) and ``--precision int8`` on run, evaluate and job files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from batchmask.batch.runner import RunError, run
from batchmask.cli import main
from batchmask.inference import load_model, read_meta
from batchmask.inference.backends import file_sha256
from batchmask.inference.quantize import INT8_FILE, QuantizationError, calibration_names


def test_export_onnx_is_the_checked_network(tmp_path, tiny_model_dir, tiny_model):
    """The fp32 file a user takes elsewhere: input "image" NHWC 0..255, output the probability map."""
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["export", str(tiny_model_dir), "--format", "onnx", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["sha256"] == file_sha256(out) and rec["parity_max_abs_diff_vs_keras"] <= 1e-3
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "image" and sess.get_inputs()[0].shape[1:] == [64, 64, 3]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    got = sess.run(None, {"image": x})[0][..., 0]
    np.testing.assert_allclose(got, tiny_model.predict_batch(x), atol=1e-3)


def test_int8_export_records_calibration_and_validation(bright_int8_model):
    meta = read_meta(bright_int8_model)
    rec = meta["int8"]
    assert rec["sha256"] == file_sha256(bright_int8_model / INT8_FILE)
    assert rec["calibration"]["images"] == 8  # 12 training images - 4 validation images
    v = rec["validation"]
    assert v["images"] == 4 and 0.9 <= v["mask_agreement"] <= 1.0
    assert abs(v["dice_int8"] - v["dice_fp32"] - v["dice_diff"]) < 1e-3 and len(v["dice_diff_ci95"]) == 2


def test_calibration_never_uses_validation_images(bright_int8_model):
    src = read_meta(bright_int8_model)["data"]["sources"][0]["path"]
    val = set(read_meta(bright_int8_model)["data"]["split"]["val_names"])
    names = [n for n, _ in calibration_names([src], val)]
    assert len(names) == 8 and not set(names) & val


def test_int8_is_refused_without_its_file_before_anything_is_written(tmp_path, tiny_model_dir, demo_wider):
    out = tmp_path / "out"
    with pytest.raises(RunError, match="batchmask export .*--format onnx-int8"):
        run(str(demo_wider / "images"), str(out), str(tiny_model_dir), precision="int8", quiet=True)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ValueError, match="--runtime keras"):
        load_model(tiny_model_dir, runtime="keras", precision="int8")
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dir), "--data", str(demo_wider),
                                    "--precision", "int8", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 1 and "no int8 file" in res.output


def test_altered_int8_file_is_refused(tmp_path, bright_int8_model):
    model = shutil.copytree(bright_int8_model, tmp_path / "m")
    with open(model / INT8_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(QuantizationError, match="does not match the SHA-256"):
        load_model(model, runtime="auto", precision="int8")


def test_int8_file_of_a_replaced_model_is_refused(tmp_path, bright_int8_model, tiny_model_dir):
    """A new model.keras in the directory (a retrained default) makes the old int8 file unusable."""
    model = shutil.copytree(bright_int8_model, tmp_path / "m")
    shutil.copyfile(tiny_model_dir / "model.keras", model / "model.keras")
    with pytest.raises(QuantizationError, match="made from another model.keras"):
        load_model(model, runtime="auto", precision="int8")


def test_run_and_evaluate_with_int8(tmp_path, bright_int8_model, demo_wider):
    from batchmask.evaluation import evaluate

    out = tmp_path / "out"
    s = run(str(demo_wider / "images"), str(out), str(bright_int8_model), precision="int8", quiet=True)
    info = json.loads((out / "run.json").read_text())
    assert s.ok == 10 and info["options"]["precision"] == "int8"
    assert info["runtime"]["precision"] == "int8" and info["runtime"]["used"] == "onnx"
    assert info["runtime"]["int8"]["sha256"] == file_sha256(bright_int8_model / INT8_FILE)
    assert info["actors"][0]["precision"] == "int8"
    res = evaluate(str(bright_int8_model), str(demo_wider), precision="int8", runtime="auto", limit=2)
    assert res.info["precision"] == "int8" and res.info["runtime"] == "onnx"


def _with_recorded_loss(src, dest, dice_diff: float):
    model = shutil.copytree(src, dest)
    meta = read_meta(model)
    meta["int8"]["validation"]["dice_diff"] = dice_diff
    (model / "model.json").write_text(json.dumps(meta))
    return model


def test_auto_precision_follows_the_recorded_int8_loss(tmp_path, bright_int8_model, tiny_model_dir, demo_wider, caplog):
    """auto: int8 when the file's recorded validation loss is within 0.003 and ONNX Runtime runs on the
    CPU; fp32 otherwise (a bigger loss, Keras, no file; a damaged file with one warning)."""
    near = _with_recorded_loss(bright_int8_model, tmp_path / "near", -0.0029)
    far = _with_recorded_loss(bright_int8_model, tmp_path / "far", -0.0031)
    assert load_model(near, runtime="auto", precision="auto").precision == "int8"
    assert load_model(far, runtime="auto", precision="auto").precision == "fp32"
    assert load_model(near, runtime="keras", precision="auto").runtime == "keras"
    assert load_model(tiny_model_dir, runtime="auto", precision="auto").precision == "fp32"  # no int8 file
    s = run(str(demo_wider / "images"), str(tmp_path / "out"), str(near), quiet=True)  # the run's default
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert s.ok == 10 and info["options"]["precision"] == "auto" and info["runtime"]["precision"] == "int8"
    assert info["actors"][0]["precision"] == "int8"
    with open(near / INT8_FILE, "ab") as f:
        f.write(b"\0")
    with caplog.at_level("WARNING", logger="batchmask.inference.int8"):
        assert load_model(near, runtime="auto", precision="auto").precision == "fp32"
    assert any("does not match the SHA-256" in r.getMessage() for r in caplog.records)


def test_job_files_take_precision(tmp_path):
    from batchmask.jobs.spec import JobError, parse_job

    base = {"name": "n", "schedule": "0 2 * * *", "input": str(tmp_path / "i"), "output": str(tmp_path / "o")}
    assert parse_job({**base, "precision": "int8"}).runner_kwargs()["precision"] == "int8"
    assert parse_job(base).runner_kwargs()["precision"] == "auto"
    with pytest.raises(JobError, match="precision"):
        parse_job({**base, "precision": "fp16"})


def test_cli_has_precision_and_export():
    for cmd in ("run", "evaluate"):
        assert "--precision [auto|fp32|int8]" in CliRunner().invoke(main, [cmd, "--help"]).output
    assert "--format [onnx|onnx-int8]" in CliRunner().invoke(main, ["export", "--help"]).output
