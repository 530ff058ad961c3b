#!/usr/bin/env python3
"""Score several models on the same images: overall, by face size, by event; cost and speed.

    python scripts/compare_models.py --split-of /tmp/new --data ../shared/data/widerface-dev \
        --data ../shared/data/widerface-pool --model old=batchmask/default_model --model new=/tmp/new \
        --json /tmp/compare.json
    python scripts/compare_models.py --split-of batchmask/default_model --data ... \
        --model fp32=batchmask/default_model --model int8=batchmask/default_model@int8 --no-speed

The images are the validation split recorded in the model given by ``--split-of`` (its
``model.json``), restricted to the ``--data`` sources given; without ``--split-of`` every image
of ``--data``. ``DIR@int8`` scores the model's int8 file (``DIR@fp32`` its ONNX fp32 export), else
Keras runs it. Each model is scored at its own stored threshold, at original image size, as
``batchmask evaluate`` does. Also printed: multiply-adds per image at the model's input size
(``batchmask.model.count_macs``) and model-only predict speed on this machine (images/s,
batches of 8 after a warm-up batch; say what else was running when you quote it). Every model
after the first is also compared with the first image by image: the mean Dice difference with a
95% paired-bootstrap interval, and on how many images it is better or worse. An interval that
spans 0 means these images cannot tell the two models apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
from size_sweep import predict_speed  # scripts/ is on sys.path when this script runs

from batchmask.results import paired_difference

PRECISIONS = ("@fp32", "@int8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=DIR",
                    help="a model to score, repeatable (LABEL= is optional)")
    ap.add_argument("--data", action="append", required=True, help="data source, repeatable")
    ap.add_argument("--split-of", help="score the validation images recorded in this model's model.json")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--worst", type=int, default=5, help="list the N events with the lowest Dice per model")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed figure (e.g. while the machine is busy)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.evaluation import evaluate, load_samples
    from batchmask.inference import load_model
    from batchmask.model import count_macs

    models = [(m.split("=", 1) if "=" in m else (m, m)) for m in args.model]
    models = [(label, *(path.rsplit("@", 1) if path.endswith(PRECISIONS) else (path, None))) for label, path in models]
    ref = load_model(args.split_of) if args.split_of else None
    samples, where = load_samples(args.data, "val" if ref else None, ref, args.limit)
    samples = [dataclasses.replace(s, image=s.load_image()) for s in samples]  # decode once for all models
    groups = sorted({s.group for s in samples})
    print(f"{len(samples)} images, {sum(len(s.boxes) for s in samples)} faces, {len(groups)} events, from {where}"
          + (f" (validation split of {args.split_of})" if ref else ""))
    rows = []
    for label, path, precision in models:
        # DIR@int8: the model's int8 file under ONNX Runtime (DIR@fp32: its ONNX fp32 export); else Keras
        m = load_model(path, runtime="onnx", precision=precision) if precision else load_model(path)
        keras = m.keras_model if m.keras_model is not None else load_model(path).keras_model
        res = evaluate(m, samples)
        by_size = {b["bucket"]: b for b in res.by_face_size}
        by_group = {g["group"]: g for g in res.by_group}
        row = {
            "label": label, "model": path, "image_size": m.image_size, "threshold": m.threshold,
            "decoder": f"{m.config.decoder_block} {list(m.config.decoder_filters)} proj {m.config.decoder_projection}",
            "precision": precision or "fp32 (Keras)",
            "gmacs": round(count_macs(keras) / 1e9, 2), "params_m": round(keras.count_params() / 1e6, 2),
            "dice": round(res.metrics["dice"], 4), "iou": round(res.metrics["iou"], 4),
            "face_coverage": res.metrics["face_coverage"],
            "event_mean_dice": round(float(np.mean([g["dice"] for g in res.by_group])), 4),
            "by_face_size": res.by_face_size, "by_group": res.by_group,
            "images_per_s": None if args.no_speed else round(predict_speed(m), 1),
            "per_image_dice": [r["dice"] for r in res.rows],
        }
        if rows:
            row["vs_first"] = paired_difference(rows[0]["per_image_dice"], row["per_image_dice"])
        rows.append(row)
        print(f"\n[{label}] {path}: {row['decoder']}, {row['image_size']}², threshold {row['threshold']:.2f}, "
              f"{row['gmacs']:.2f} G MACs, {row['params_m']:.2f} M params, "
              f"{row['images_per_s'] or float('nan'):.1f} img/s model-only")
        print(f"  Dice {row['dice']:.3f}  IoU {row['iou']:.3f}  mean over events {row['event_mean_dice']:.3f}  "
              f"face coverage {row['face_coverage']:.3f}")
        for name in ("small", "medium", "large"):
            b = by_size[name]
            print(f"  {name:<6}: {b['faces']:>5} faces, coverage {_f(b['face_coverage'])}; "
                  f"{b['images']:>4} images by median face, Dice {_f(b['dice'])}")
        if "vs_first" in row:
            d = row["vs_first"]
            print(f"  vs {rows[0]['label']}: Dice {d['mean']:+.4f} (95% paired bootstrap {d['low']:+.4f}..{d['high']:+.4f}), "
                  f"better on {d['better']}, worse on {d['worse']} of {d['images']} images")
        worst = sorted(by_group.values(), key=lambda g: g["dice"])[: args.worst]
        print("  lowest events: " + ", ".join(f"{g['group']} {g['dice']:.2f} ({g['images']})" for g in worst))
    if len(rows) > 1:
        print("\nper event, Dice: " + " | ".join(r["label"] for r in rows))
        for g in groups:
            vals = [next(x["dice"] for x in r["by_group"] if x["group"] == g) for r in rows]
            print(f"  {g:<32} " + "  ".join(f"{v:.3f}" for v in vals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": where, "split_of": args.split_of, "images": len(samples), "cpus": os.cpu_count(),
                       "rows": rows}, f, indent=2)
    return 0


def _f(v) -> str:
    return "  -  " if v is None else f"{v:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
