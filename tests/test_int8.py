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


def _conv_weights_are_float(model, conv) -> bool:
    return conv.input[1] in {t.name for t in model.graph.initializer}


def test_int8_output_stays_float_with_its_fitted_shift(bright_int8_model):
    """The logits, their upsampling and the sigmoid are not rounded to 8 bits (quantized, the default
    model's probabilities took ~50 values near the threshold), and the fitted shift is recorded."""
    import onnx

    cal = read_meta(bright_int8_model)["int8"]["calibration"]
    model = onnx.load(str(bright_int8_model / INT8_FILE))
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert producer[model.graph.output[0].name].op_type != "DequantizeLinear"
    assert _conv_weights_are_float(model, convs[-1]) and not _conv_weights_are_float(model, convs[0])
    assert convs[-1].name in cal["float_nodes"] and any("Sigmoid" in n for n in cal["float_nodes"])
    assert isinstance(cal["output_shift"], float) and -2 <= cal["output_shift"] <= 2


def test_fitted_output_shift_undoes_a_known_shift(tmp_path, bright_int8_model):
    """shift_output moves every logit by exactly the shift; fit_output_shift finds a shift it is given back."""
    from batchmask.inference.backends import cached_onnx, make_session, run_session
    from batchmask.inference.quantize import fit_output_shift, shift_output

    fp32 = cached_onnx(bright_int8_model)[0]
    moved = tmp_path / "moved.onnx"
    shutil.copyfile(fp32, moved)
    shift_output(moved, -0.5)
    rng = np.random.default_rng(3)
    x = np.clip(np.kron(rng.uniform(60, 200, (16, 8, 8, 3)), np.ones((1, 8, 8, 1))), 0, 255).astype(np.float32)
    p, q = (run_session(make_session(str(f), 1), x)[..., 0].astype(np.float64) for f in (fp32, moved))
    mid = (p > 0.02) & (p < 0.98)
    assert mid.mean() > 0.1 and (p >= 0.5).any(axis=(1, 2)).all()  # a boundary in every image
    np.testing.assert_allclose((np.log(q / (1 - q)) - np.log(p / (1 - p)))[mid], -0.5, atol=1e-3)
    assert fit_output_shift(fp32, moved, x, 0.5) == 0.5
    assert fit_output_shift(fp32, fp32, x, 0.5) == 0.0


def test_export_keeps_the_named_nodes_float(tmp_path, bright_int8_model):
    """--float-node NAME: that node's weights stay float in the file, and the record lists it;
    --no-output-shift: no shift fitted."""
    import onnx

    convs = [n for n in onnx.load(str(bright_int8_model / INT8_FILE)).graph.node if n.op_type == "Conv"]
    name = convs[len(convs) // 2].name
    out = tmp_path / "x.onnx"
    res = CliRunner().invoke(main, ["export", str(bright_int8_model), "--format", "onnx-int8", "--float-node", name,
                                    "--no-output-shift", "--calibration-images", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(res.output)["calibration"]
    assert name in cal["float_nodes"] and cal["output_shift"] is None and cal["images"] == 4
    model = onnx.load(str(out))
    assert _conv_weights_are_float(model, next(n for n in model.graph.node if n.name == name))
    assert not _conv_weights_are_float(model, [n for n in model.graph.node if n.op_type == "Conv"][0])


def test_shipped_default_model_runs_int8_by_default():
    """The shipped int8 file is intact, made from the shipped model.keras, and its recorded validation
    loss is within the 0.003 that makes ``--precision auto`` choose it on CPU (fp32 on a GPU)."""
    from batchmask.inference import default_model_dir
    from batchmask.inference.int8 import MAX_INT8_LOSS, auto_precision

    meta = read_meta(default_model_dir())
    v = meta["int8"]["validation"]
    assert v["images"] == meta["data"]["val_images"] and -v["dice_diff"] <= MAX_INT8_LOSS
    assert auto_precision(default_model_dir(), meta, onnx_on_cpu=True) == "int8"
    assert auto_precision(default_model_dir(), meta, onnx_on_cpu=False) == "fp32"
