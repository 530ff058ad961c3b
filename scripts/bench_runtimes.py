#!/usr/bin/env python3
"""Model-only predict speed of trained models under Keras and ONNX Runtime (fp32, and int8 when the model has its int8 file), interleaved, one process.

    python scripts/bench_runtimes.py --model old=/tmp/old_default --model new=batchmask/default_model

For each model and runtime: images/s over ``--rounds`` rounds of ``--batches`` batches of 8
random 0..255 images at the model's input size (after a warm-up batch), rounds interleaved so
that a change in machine load hits every entry alike; the median round is reported. Also the
largest probability difference between the runtimes on those inputs. Loads the ONNX file from
batchmask's export cache (exported on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.inference import load_model

    entries = []
    for spec in args.model:
        label, path = spec.split("=", 1) if "=" in spec else (spec, spec)
        from batchmask.inference.int8 import INT8_FILE

        kinds = [("keras", "fp32"), ("onnx", "fp32")] + ([("onnx", "int8")] if os.path.exists(os.path.join(path, INT8_FILE)) else [])
        for runtime, precision in kinds:
            m = load_model(path, runtime=runtime, precision=precision)
            runtime = runtime if precision == "fp32" else "int8"
            x = np.random.default_rng(0).uniform(0, 255, (args.batch_size, m.image_size, m.image_size, 3))
            x = x.astype(np.float32)
            m.predict_batch(x)  # warm-up
            entries.append({"label": label, "runtime": runtime, "model": m, "x": x, "rates": []})
    for _ in range(args.rounds):
        for e in entries:
            t = time.perf_counter()
            for _ in range(args.batches):
                e["model"].predict_batch(e["x"])
            e["rates"].append(args.batches * args.batch_size / (time.perf_counter() - t))
    for e in entries:
        e["rate"] = statistics.median(e["rates"])
    for label in dict.fromkeys(e["label"] for e in entries):
        k, o = (next(e for e in entries if e["label"] == label and e["runtime"] == r) for r in ("keras", "onnx"))
        diff = float(np.abs(k["model"].predict_batch(k["x"]) - o["model"].predict_batch(o["x"])).max())
        print(f"{label:<8} keras {k['rate']:6.2f} img/s  onnx {o['rate']:6.2f} img/s  ratio {o['rate'] / k['rate']:.2f}  "
              f"max |p_onnx - p_keras| {diff:.1e}  (rounds: keras {[round(r, 1) for r in k['rates']]}, "
              f"onnx {[round(r, 1) for r in o['rates']]})", flush=True)
        q = next((e for e in entries if e["label"] == label and e["runtime"] == "int8"), None)
        if q is not None:
            agree = float(np.mean((q["model"].predict_batch(q["x"]) >= 0.5) == (o["model"].predict_batch(o["x"]) >= 0.5)))
            print(f"{label:<8} int8 {q['rate']:6.2f} img/s  int8 / onnx {q['rate'] / o['rate']:.2f}  "
                  f"(rounds {[round(r, 1) for r in q['rates']]}; mask agreement on these random inputs {agree:.4f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
