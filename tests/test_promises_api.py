"""README "Python API": the names `from batchmask import ...` gives, and the README's example (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import batchmask


def test_public_names_are_the_stage_functions():
    from batchmask import evaluate, load_model, predict, run, train
    from batchmask.batch.runner import run as runner_run
    from batchmask.evaluation import evaluate as evaluation_evaluate
    from batchmask.inference import load_model as inference_load_model
    from batchmask.inference import predict as inference_predict
    from batchmask.training import train as training_train

    assert (train, evaluate, load_model, predict, run) == (
        training_train, evaluation_evaluate, inference_load_model, inference_predict, runner_run)
    assert set(batchmask.__all__) == {"__version__", "train", "evaluate", "load_model", "predict", "run"}
    assert batchmask.__version__.count(".") == 2
    with pytest.raises(AttributeError):
        batchmask.no_such_function  # noqa: B018


def test_readme_python_example(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (20, 30, 3), np.uint8), rng.integers(0, 255, (41, 17, 3), np.uint8)]
    model = batchmask.load_model(tiny_model_dir)
    masks = model.predict(images)  # boolean HxW masks at each image's size
    probs = model.predict_proba(images)  # float32 probabilities
    assert [m.shape for m in masks] == [p.shape for p in probs] == [(20, 30), (41, 17)]
    assert all(m.dtype == bool for m in masks) and all(p.dtype == np.float32 for p in probs)
    for m, p in zip(masks, probs, strict=True):
        assert np.array_equal(m, p >= model.threshold)
    assert [m.shape for m in batchmask.predict(images, model)] == [(20, 30), (41, 17)]
    fast = model.variant(image_size=32)  # same weights, smaller input
    assert fast.image_size == 32 and model.image_size == 64
    assert [p.shape for p in fast.predict_proba(images)] == [(20, 30), (41, 17)]
    onnx = batchmask.load_model(tiny_model_dir, runtime="onnx")
    assert onnx.runtime == "onnx"
    for a, b in zip(onnx.predict_proba(images), probs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)

    inp = tmp_path / "photos"
    inp.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(inp / f"{i}.png")
    summary = batchmask.run(str(inp), str(tmp_path / "out"), str(tiny_model_dir), workers=4, quiet=True)
    assert (summary.total, summary.ok, summary.failed, summary.skipped, summary.exit_code) == (2, 2, 0, 0, 0)
    with Image.open(tmp_path / "out" / "masks" / "1.png") as m:
        assert m.size == (17, 41)
