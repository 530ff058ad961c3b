"""The masks `run` writes are the masks `predict` returns, and what `evaluate` scores.

The model is conftest's brightness model (face probability = local brightness), so a mask
that is flipped, transposed, shifted or wrongly rotated against its image fails: each test
also checks the mask against the bright areas of the image as it is shown (EXIF applied).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchmask.batch.runner import run
from batchmask.data import Sample, read_image
from batchmask.inference import load_model


def asymmetric_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Dark, with a bright L in the top-left quarter and a bright block near the bottom-right
    corner (no flip, transpose or rotation maps it onto itself), plus noise around the edges."""
    rng = np.random.default_rng(seed)
    im = np.full((height, width), 40.0)
    h4, w4 = height // 4, width // 4
    im[h4 // 2 : 2 * h4, w4 // 2 : w4] = 220  # the L's upright
    im[int(1.6 * h4) : 2 * h4, w4 // 2 : 2 * w4] = 220  # its foot
    im[3 * h4 : int(3.6 * h4), int(3.2 * w4) : int(3.7 * w4)] = 220
    im += rng.normal(0, 30, im.shape)
    return np.repeat(np.clip(im, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def save_jpeg(path: Path, shown: np.ndarray, orientation: int = 1) -> None:
    """Save so that a viewer applying the EXIF ``orientation`` shows ``shown`` (1, 6 or 8)."""
    stored = {1: shown, 6: np.rot90(shown, 1), 8: np.rot90(shown, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(stored)).save(path, "JPEG", quality=95, exif=exif.tobytes())


def run_masks(inp: Path, out: Path, model: Path, **kw) -> dict[str, tuple[dict, np.ndarray]]:
    summary = run(str(inp), str(out), str(model), quiet=True, **kw)
    assert summary.failed == 0
    with open(out / "coverage.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["image"]: (r, np.asarray(read_image(out / r["mask"]))[..., 0] > 127) for r in rows}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def backends() -> list[tuple[str, str]]:
    return [("keras", "fp32"), ("onnx", "fp32"), ("onnx", "int8")]


@pytest.mark.parametrize("runtime,precision", backends())
def test_run_masks_equal_predict_on_exif_rotated_image(tmp_path, bright_int8_model, runtime, precision):
    shown = asymmetric_image(96, 64)  # shown 96 wide, 64 high; stored rotated (EXIF 6)
    save_jpeg(tmp_path / "in" / "rot.jpg", shown, orientation=6)
    assert Image.open(tmp_path / "in" / "rot.jpg").size == (64, 96)  # stored the other way round
    row, mask = run_masks(tmp_path / "in", tmp_path / "out", bright_int8_model, runtime=runtime,
                          precision=precision)["rot.jpg"]
    m = load_model(bright_int8_model, runtime=runtime, precision=precision)
    assert (m.runtime, m.precision) == (runtime, precision)
    image = read_image(tmp_path / "in" / "rot.jpg")
    want = m.predict([image])[0]
    assert image.shape[:2] == (64, 96) and mask.shape == want.shape == (64, 96)
    assert (int(row["width"]), int(row["height"])) == (96, 64)
    assert np.array_equal(mask, want), f"{np.mean(mask != want):.4%} of pixels differ"
    # the mask follows the shown image's bright areas, and no flip/transpose of it does
    bright = image[..., 0] > 128
    assert iou(mask, bright) > 0.6
    for wrong in (mask[::-1], mask[:, ::-1], np.roll(mask, 8, axis=1)):
        assert iou(wrong, bright) < 0.5


def test_int8_masks_agree_with_fp32_on_the_brightness_model(bright_int8_model):
    from batchmask.inference.quantize import compare_precisions

    samples = [Sample(f"s{i}", np.zeros((0, 4), np.float32), image=asymmetric_image(80, 64, seed=i)) for i in range(6)]
    fp32 = load_model(bright_int8_model, runtime="onnx")
    int8 = load_model(bright_int8_model, runtime="onnx", precision="int8")
    c = compare_precisions(fp32, int8, samples)
    print(f"brightness model, 6 images: int8 vs fp32 mask agreement {c['mask_agreement']:.4f}")
    assert c["mask_agreement"] >= 0.97 and c["images"] == 6
    # really quantized (not the fp32 file under another name): QDQ nodes, and probabilities that differ
    import onnx

    ops = {n.op_type for n in onnx.load(str(bright_int8_model / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = np.stack([fp32.preprocess(s.image) for s in samples])
    assert 0 < float(np.max(np.abs(int8.predict_batch(x) - fp32.predict_batch(x)))) < 0.1


def test_evaluate_scores_exactly_the_mask_run_writes_for_a_large_jpeg(tmp_path, bright_model_dir):
    """A 2400x1600 JPEG: run decodes it in JPEG draft mode (at 1/16 scale for a 64 px input);
    evaluate must decode it the same way, so its predicted pixels are run's face pixels."""
    from batchmask.batch.outputs import decode_for_model
    from batchmask.evaluation import evaluate

    path = tmp_path / "in" / "big.jpg"
    save_jpeg(path, asymmetric_image(2400, 1600, seed=3))
    data = path.read_bytes()
    draft, no_draft = decode_for_model(data, 64, 10**9, "big", True)[0], decode_for_model(data, 64, 10**9, "big", False)[0]
    assert not np.array_equal(draft, no_draft)  # draft mode applies and changes the input
    row, mask = run_masks(tmp_path / "in", tmp_path / "out", bright_model_dir, runtime="keras")["big.jpg"]
    res = evaluate(str(bright_model_dir), [Sample("big.jpg", np.array([[100, 100, 600, 500]], np.float32), path=str(path))])
    assert res.rows[0]["pred_px"] == int(row["face_pixels"]) == int(mask.sum())
    assert (res.rows[0]["width"], res.rows[0]["height"]) == (2400, 1600)


def test_asymmetric_image_is_asymmetric():
    im = asymmetric_image(96, 64)[..., 0] > 128
    for other in (im[::-1], im[:, ::-1], im[::-1, ::-1]):
        assert iou(im, other) < 0.5
