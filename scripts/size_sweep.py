#!/usr/bin/env python3
"""Score one trained model at several input sizes, with and without test-time flip.

    python scripts/size_sweep.py --model /tmp/proxy --data ../shared/data/widerface-dev \
        --subset val --sizes 320,384,448,512 --json /tmp/sweep.json

The network is fully convolutional, so the same weights run at any multiple of 32. For each
(size, flip) this prints mean per-image Dice at the model's stored threshold and at the best
threshold on these images (optimistic), both at original image size, and model-only predict
speed on this machine (images/s, batches of 8, after a warm-up batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np


def predict_speed(model, batches: int = 5, batch_size: int = 8) -> float:
    s = model.image_size
    x = np.random.default_rng(0).uniform(0, 255, (batch_size, s, s, 3)).astype(np.float32)
    model.predict_batch(x)
    t = time.perf_counter()
    for _ in range(batches):
        model.predict_batch(x)
    return batches * batch_size / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", action="append", required=True, help="data source, repeatable")
    ap.add_argument("--subset", choices=["val"], help="only the model's validation images")
    ap.add_argument("--sizes", default="320,384,448,512")
    ap.add_argument("--flip", choices=["both", "on", "off"], default="both")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--no-speed", action="store_true", help="skip the speed figure (e.g. while the machine is busy)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.evaluation import evaluate, load_samples
    from batchmask.inference import load_model

    base = load_model(args.model)
    samples, where = load_samples(args.data, args.subset, base, args.limit)
    # Decode once: every (size, flip) variant scores the same images.
    samples = [dataclasses.replace(s, image=s.load_image()) for s in samples]
    flips = {"both": (False, True), "on": (True,), "off": (False,)}[args.flip]
    rows = []
    print(f"{len(samples)} images from {where}; stored threshold {base.threshold:.2f}")
    for size in (int(s) for s in args.sizes.split(",")):
        for flip in flips:
            m = base.variant(image_size=size, tta_flip=flip)
            res = evaluate(m, samples)
            table = res.threshold_table
            best = max(table, key=lambda r: r["dice"])
            row = {
                "image_size": size, "tta_flip": flip, "images": len(samples),
                "threshold": base.threshold, "dice": round(res.metrics["dice"], 4), "iou": round(res.metrics["iou"], 4),
                "best_threshold": best["threshold"], "best_dice": round(best["dice"], 4),
                "predict_images_per_s": None if args.no_speed else round(predict_speed(m), 1),
            }
            rows.append(row)
            print(f"size {size:<4} flip {'on ' if flip else 'off'}  Dice {row['dice']:.3f} (t={base.threshold:.2f})  "
                  f"best {row['best_dice']:.3f} (t={row['best_threshold']:.2f})  IoU {row['iou']:.3f}  "
                  f"{row['predict_images_per_s'] or float('nan'):5.1f} img/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "data": where, "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
