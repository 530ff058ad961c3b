"""Evaluation metrics, the threshold sweep and evaluate()'s outputs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from batchmask.data import Sample, boxes_to_mask
from batchmask.evaluation import (
    DEFAULT_THRESHOLDS,
    EvaluationError,
    evaluate,
    format_table,
    score,
    sweep_thresholds,
)


def _synthetic() -> tuple[list[Sample], list[np.ndarray]]:
    """Three 10x10 images with hand-countable predictions (see test_metrics_by_hand)."""
    p1 = np.zeros((10, 10), np.float32)
    p1[0:5, 0:2] = 0.9  # 10 px inside the 4x5 true box (20 px)
    p1[8:10, 8:10] = 0.7  # 4 px outside it
    p2 = np.full((10, 10), 0.1, np.float32)  # no face, nothing above 0.5
    p3 = np.zeros((10, 10), np.float32)
    p3[3, 3] = 0.6  # no face, one false pixel
    img = np.zeros((10, 10, 3), np.uint8)
    samples = [
        Sample("one", np.array([[0, 0, 4, 5]], np.float32), image=img),
        Sample("empty", np.zeros((0, 4), np.float32), image=img),
        Sample("false", np.zeros((0, 4), np.float32), image=img),
    ]
    return samples, [p1, p2, p3]


def test_metrics_by_hand():
    samples, probs = _synthetic()
    it = iter(probs)
    scores = score(lambda ims: [next(it) for _ in ims], samples, [0.05, 0.5], batch_size=2)
    j = scores.edge_index(0.5)
    m = scores.metrics(j)
    assert m["dice"] == pytest.approx((20 / 34 + 1 + 0) / 3)
    assert m["iou"] == pytest.approx((10 / 24 + 1 + 0) / 3)
    assert m["soft_dice_global"] == pytest.approx((2 * 9 + 1) / (20 + 22.4 + 1))
    assert m["precision"] == pytest.approx(10 / 15)
    assert m["recall"] == pytest.approx(10 / 20)
    assert m["face_coverage"] == pytest.approx(0.5)
    assert (m["images"], m["images_with_faces"], m["faces"], m["truth_px"], m["pred_px"]) == (3, 1, 1, 20, 15)
    rows = scores.rows(j)
    assert [r["dice"] for r in rows] == pytest.approx([20 / 34, 1.0, 0.0], abs=1e-6)
    assert (rows[0]["tp_px"], rows[0]["fp_px"], rows[0]["fn_px"]) == (10, 4, 10)
    assert rows[0]["median_face_px"] == pytest.approx(np.sqrt(20), abs=0.05)
    assert rows[0]["size_bucket"] == "small" and rows[1]["size_bucket"] == "none"
    # at 0.05 the empty image's 0.1 background becomes 100 false pixels: Dice 0
    assert scores.rows(scores.edge_index(0.05))[1]["dice"] == 0.0

    # the global soft Dice is the exercise's (batch) Dice of batchmask.losses
    from batchmask.losses import dice_coefficient

    truths = np.stack([boxes_to_mask(s.boxes, 10, 10) for s in samples])
    keras_dice = float(np.asarray(dice_coefficient(truths, np.stack(probs), per_image=False)))
    assert m["soft_dice_global"] == pytest.approx(keras_dice, rel=1e-5)


def test_sweep_matches_direct_computation():
    rng = np.random.default_rng(1)
    pairs = []
    for h, w in [(37, 53), (64, 20), (15, 15), (40, 41)]:
        p = rng.random((h, w), dtype=np.float32) ** 2
        p.flat[:4] = np.float32([0.35, 0.1, 0.5, 0.95])  # values exactly at thresholds
        t = np.zeros((h, w), np.uint8)
        if h != 15:  # one image without faces
            t[h // 4 : h // 2, w // 3 : w - 2] = 1
        pairs.append((p, t))
    thresholds = [0.1, 0.2, 0.35, 0.5, 0.95]
    swept = sweep_thresholds(iter(pairs), thresholds)

    def dice(p, t, thr):
        pred = p >= thr
        denom = pred.sum() + t.sum()
        return 1.0 if denom == 0 else 2 * (pred & (t > 0)).sum() / denom

    for thr in thresholds:
        assert swept[thr] == pytest.approx(np.mean([dice(p, t, thr) for p, t in pairs]), abs=1e-12)


def test_evaluate_outputs(tiny_model_dir, demo_wider, tmp_path):
    res = evaluate(str(tiny_model_dir), str(demo_wider), out_dir=str(tmp_path / "out"), grid_images=4)
    out = tmp_path / "out"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["metrics"]["images"] == 10 and doc["metrics"]["faces"] == res.metrics["faces"] > 0
    # The metrics by hand, from the model's own probabilities and the boxes (a range check such as
    # 0 <= dice <= 1 cannot tell a right metric from a wrong one).
    from batchmask.data import load_wider
    from batchmask.inference import load_model

    samples = load_wider(demo_wider)
    probs = load_model(tiny_model_dir, runtime="onnx").predict_proba([s.load_image() for s in samples])
    hand, inter, t_sum, p_sum = [], 0.0, 0.0, 0.0
    for s, p in zip(samples, probs, strict=True):
        t = boxes_to_mask(s.boxes, p.shape[0], p.shape[1]).astype(bool)
        pred = p >= 0.5
        tp, fp, fn = (pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()
        hand.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        inter, t_sum, p_sum = inter + float((p * t).sum()), t_sum + float(t.sum()), p_sum + float(p.sum())
    # The untrained model's probabilities are all within 1e-4 of 0.5: a pixel or two may fall on
    # the other side of the threshold in another batch, hence the tolerance.
    assert doc["metrics"]["dice"] == pytest.approx(np.mean(hand), abs=2e-3)
    assert doc["metrics"]["soft_dice_global"] == pytest.approx((2 * inter + 1) / (t_sum + p_sum + 1), rel=1e-4)
    assert doc["threshold"] == pytest.approx(0.5) and len(doc["threshold_table"]) == len(DEFAULT_THRESHOLDS)
    assert [b["bucket"] for b in doc["by_face_size"]] == ["small", "medium", "large"]
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {"name", "dice", "iou", "soft_dice", "face_coverage", "size_bucket"} <= set(rows[0])
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(res.metrics["dice"], abs=1e-5)
    assert sum(int(r["faces"]) for r in rows) == res.metrics["faces"]
    for r, s in zip(rows, samples, strict=True):  # each row's counts, and its Dice and IoU from them
        assert r["name"] == s.name
        tp, fp, fn = (int(r[k]) for k in ("tp_px", "fp_px", "fn_px"))
        assert int(r["truth_px"]) == tp + fn == int(boxes_to_mask(s.boxes, int(r["height"]), int(r["width"])).sum())
        assert int(r["pred_px"]) == tp + fp
        assert float(r["dice"]) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
        assert float(r["iou"]) == pytest.approx(tp / (tp + fp + fn), abs=1e-6)
    with Image.open(out / "predictions.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200
    assert "mean Dice (per image)" in format_table(res)


def test_tune_threshold_writes_model_json(tiny_model_dir, demo_wider, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    res = evaluate(str(model), str(demo_wider), tune_threshold=True, thresholds=(0.3, 0.5, 0.7), limit=4)
    meta = json.loads((model / "model.json").read_text())
    table = meta["threshold_tuning"]["table"]
    assert meta["model"]["threshold"] == res.best_threshold == res.threshold
    assert meta["threshold_tuning"]["previous"] == 0.5 and meta["threshold_tuning"]["images"] == 4
    assert max(r["dice"] for r in table) == pytest.approx(next(r["dice"] for r in table if r["threshold"] == res.best_threshold))
    assert res.metrics["dice"] == pytest.approx(max(r["dice"] for r in res.threshold_table))
    # the default (packaged) model is never modified
    with pytest.raises(EvaluationError, match="copy it"):
        evaluate(None, str(demo_wider), tune_threshold=True)


def test_subset_val(tiny_model_dir, demo_wider, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with pytest.raises(EvaluationError, match="val_names"):
        evaluate(str(model), str(demo_wider), subset="val")
    meta = json.loads((model / "model.json").read_text())
    names = ["19--Couple/19_Couple_Couple_19_133.jpg", "4--Dancing/4_Dancing_Dancing_4_787.jpg"]
    meta["data"] = {"split": {"val_names": names}}
    (model / "model.json").write_text(json.dumps(meta))
    res = evaluate(str(model), str(demo_wider), subset="val")
    assert sorted(r["name"] for r in res.rows) == names


def test_both_formats_score_the_same(tiny_model_dir, demo_wider, tmp_path):
    from batchmask.convert import write_npy
    from batchmask.data import load_wider

    samples = load_wider(demo_wider, limit=3)
    write_npy(samples, tmp_path / "images.npy")
    a = evaluate(str(tiny_model_dir), str(demo_wider), limit=3)
    b = evaluate(str(tiny_model_dir), str(tmp_path / "images.npy"))
    assert b.metrics["images"] == 3
    # The folder's JPEGs are decoded as `run` decodes them (draft mode: these are 1024 px wide, the
    # input 64 px); images.npy holds decoded pixels, resized in full. Same images, near-same scores.
    assert [r["dice"] for r in a.rows] == pytest.approx([r["dice"] for r in b.rows], abs=0.01)
    assert a.metrics["soft_dice_global"] == pytest.approx(b.metrics["soft_dice_global"], abs=0.01)


def test_tune_threshold_refuses_the_shipped_model_by_path(demo_wider):
    from batchmask.evaluation import EvaluationError, evaluate
    from batchmask.inference import default_model_dir

    with pytest.raises(EvaluationError, match="model shipped inside the package"):
        evaluate(str(default_model_dir()), str(demo_wider), tune_threshold=True, limit=1)


def test_shipped_default_model_loads_and_finds_the_demo_faces(demo_wider):
    """The model in the package: loads, predicts, and scores far above what a broken model can."""
    from batchmask.inference import default_model_dir, load_model, read_meta
    from batchmask.model import count_macs

    model = load_model()  # no path: the shipped default, loaded once for both checks
    assert model.path == default_model_dir()
    res = evaluate(model, str(demo_wider))
    assert res.metrics["images"] == 10 and res.metrics["dice"] > 0.7  # an untrained network scores about 0.05
    meta = read_meta(default_model_dir())
    assert res.threshold == meta["model"]["threshold"] and 0.3 <= res.threshold <= 0.8
    assert meta["cost"]["multiply_adds"] == count_macs(model.keras_model)


def test_compare_models_paired_difference():
    """scripts/compare_models.py: the paired bootstrap says when two models' scores cannot be told apart."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from compare_models import paired_difference

    rng = np.random.default_rng(1)
    ref = rng.uniform(0.3, 0.9, 300)
    better = paired_difference(ref, ref + 0.02)
    assert better["mean"] == pytest.approx(0.02) and better["low"] == pytest.approx(0.02)
    assert (better["better"], better["worse"], better["images"]) == (300, 0, 300)
    noise = ref + rng.normal(0, 0.1, 300)  # no real difference: the interval spans 0
    d = paired_difference(ref, noise)
    assert d["low"] < 0 < d["high"] and d["high"] - d["low"] < 0.05
    assert paired_difference(ref, noise) == d  # seeded
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(ref, ref[:-1])
