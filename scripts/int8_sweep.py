#!/usr/bin/env python3
"""Try int8 quantization settings on a model: each one's validation Dice against fp32, and its speed.

    python scripts/int8_sweep.py --data ../shared/data/widerface-dev --data ../shared/data/widerface-pool \
        --try base='{}' --try head='{"float_nodes": ["Conv__503", "Resize__335"]}' --json sweep.json
    python scripts/int8_sweep.py --data ... --debug head='{"float_nodes": [...]}'   # where the error arises

Each ``--try LABEL=JSON`` is a :class:`batchmask.inference.quantize.QuantSettings` (its fields as
JSON): the model's cached fp32 ONNX file is quantized exactly as ``batchmask export --format
onnx-int8`` does, then scored against fp32 as ``scripts/ship_int8.py`` does (mean per-image Dice on
the model's validation images found in ``--data``, at fp32's threshold, 95% paired bootstrap;
mask agreement), and timed model-only against fp32, interleaved (batches of 8 random images,
2 threads unless ``--threads``). The validation images are decoded once for all tries;
calibration images come from ``--data`` minus the validation images.

``--debug LABEL=JSON`` instead quantizes once and prints, per activation tensor of the int8 file,
how far its values are from fp32's on a few calibration images (ONNX Runtime's
``qdq_loss_debug``: signal-to-quantization-noise ratio in dB, lowest first: against fp32's same
tensor, errors of all earlier layers included; and of its own rounding alone), to find the nodes
worth keeping in float.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def rate(model, x: np.ndarray, batches: int) -> float:
    t = time.perf_counter()
    for _ in range(batches):
        model.predict_batch(x)
    return batches * len(x) / (time.perf_counter() - t)


def parse(spec: str) -> tuple[str, dict]:
    label, _, js = spec.partition("=")
    return label, json.loads(js or "{}")


def debug(fp32_path: str, int8_path: str, inputs: np.ndarray, top: int) -> list[dict]:
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name
    feeds = [{name: inputs[i : i + 1]} for i in range(len(inputs))]
    with tempfile.TemporaryDirectory() as d:
        pre, fa, qa = Path(d, "pre.onnx"), Path(d, "f.onnx"), Path(d, "q.onnx")
        quant_pre_process(fp32_path, str(pre), skip_symbolic_shape=True)  # the graph quantize_file quantizes
        modify_model_output_intermediate_tensors(str(pre), str(fa))
        modify_model_output_intermediate_tensors(int8_path, str(qa))
        f_act = collect_activations(str(fa), feeds)
        q_act = collect_activations(str(qa), feeds)
    err = compute_activation_error(create_activation_matching(q_act, f_act))
    rows = [{"tensor": k, "qdq_vs_float_db": round(float(v["xmodel_err"]), 2),
             "own_rounding_db": round(float(v["qdq_err"]), 2) if "qdq_err" in v else None}
            for k, v in err.items() if "xmodel_err" in v]
    return sorted(rows, key=lambda r: r["qdq_vs_float_db"])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "batchmask" / "default_model"))
    ap.add_argument("--data", action="append", required=True, help="calibration and validation sources")
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="LABEL=JSON")
    ap.add_argument("--debug", metavar="LABEL=JSON", help="per-tensor error of one setting (see above)")
    ap.add_argument("--debug-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-batches", type=int, default=4, help="batches of 8 per speed round (0: no speed)")
    ap.add_argument("--keep", help="keep each try's int8 file in this folder")
    ap.add_argument("--json", help="append one line of figures per try to this file")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.config import ModelConfig
    from batchmask.evaluation import load_samples
    from batchmask.inference import FaceMaskModel, load_model, read_meta
    from batchmask.inference.backends import cached_onnx, make_session
    from batchmask.inference.quantize import (
        QuantSettings,
        calibration_inputs,
        calibration_names,
        compare_precisions,
        quantize_file,
    )
    from batchmask.results import paired_difference

    meta = read_meta(args.model)
    threshold = ModelConfig.from_dict(meta.get("model", {})).threshold
    fp32_path = str(cached_onnx(Path(args.model))[0])
    val_names = set(meta["data"]["split"]["val_names"])
    pool = calibration_names(args.data, val_names)
    size = int(meta["model"]["image_size"])
    calib: dict[tuple[int, int], np.ndarray] = {}
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="int8-sweep-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    def make(label: str, kw: dict) -> tuple[QuantSettings, Path, dict]:
        s = QuantSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
        if (s.images, s.seed) not in calib:
            calib[(s.images, s.seed)] = calibration_inputs(pool, size, s.images, s.seed)[0]
        dest = out_dir / f"{label}.onnx"
        return s, dest, quantize_file(fp32_path, dest, calib[(s.images, s.seed)], s, threshold)

    if args.debug:
        label, kw = parse(args.debug)
        s, dest, _ = make(label, kw)
        x = calibration_inputs(pool, size, args.debug_images, s.seed + 1)[0]
        for r in debug(fp32_path, str(dest), x, 40):
            print(f"{r['qdq_vs_float_db']:8.2f} dB vs fp32, {r['own_rounding_db'] or float('nan'):6.2f} dB own rounding  "
                  f"{r['tensor']}")
        return 0

    fp32 = load_model(args.model, runtime="onnx", threads=args.threads)
    samples, where = load_samples(args.data, "val", fp32, None)
    samples = [dataclasses.replace(sm, image=sm.load_image()) for sm in samples]
    print(f"{len(samples)} validation images from {where}; {len(pool)} calibration candidates", flush=True)
    x = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    for spec in args.tries:
        label, kw = parse(spec)
        s, dest, rec = make(label, kw)
        int8 = FaceMaskModel(None, meta, Path(args.model), make_session(str(dest), args.threads))
        c = compare_precisions(fp32, int8, samples)
        d = paired_difference(c.pop("per_image_fp32"), c.pop("per_image_int8"))
        row = {"label": label, "settings": dataclasses.asdict(s), "float_nodes": rec["calibration"]["float_nodes"],
               **c, "ci95": [round(d["low"], 5), round(d["high"], 5)], "better": d["better"], "worse": d["worse"],
               "output_shift": rec["calibration"]["output_shift"], "quantize_s": rec["quantize_s"], "bytes": rec["bytes"]}
        if args.speed_batches:
            int8.predict_batch(x)
            rounds = [(rate(fp32, x, args.speed_batches), rate(int8, x, args.speed_batches)) for _ in range(3)]
            row["img_s_fp32"] = [round(a, 1) for a, _ in rounds]
            row["img_s_int8"] = [round(b, 1) for _, b in rounds]
        print(f"[{label}] shift {row['output_shift']}, Dice {c['dice_int8']:.5f} vs fp32 {c['dice_fp32']:.5f}: {c['dice_diff']:+.5f} "
              f"({d['low']:+.5f}..{d['high']:+.5f}), better {d['better']} worse {d['worse']}, agree "
              f"{c['mask_agreement']:.4%}; img/s int8 {row.get('img_s_int8')} fp32 {row.get('img_s_fp32')}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
