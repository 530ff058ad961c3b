#!/usr/bin/env python3
"""(Re)make a model directory's int8 file and its model.json record: run this after replacing the
shipped default model, so that ``--precision int8`` keeps working and its cost stays measured.

    python scripts/ship_int8.py                      # batchmask/default_model, its recorded training sources
    python scripts/ship_int8.py --model DIR --data ../shared/data/widerface-dev --data ../shared/data/widerface-pool

The same as ``batchmask export DIR --format onnx-int8 -o DIR/model.int8.onnx`` with the shipped
settings (:class:`batchmask.inference.quantize.QuantSettings`: 200 calibration images from the
training sources, never the validation images; min/max calibration; every convolution quantized
but the last, whose logits, upsampling and sigmoid stay float, with the logit shift fitted on the
calibration images), then prints the decision rule of docs/benchmarks.md:
int8 may become the default precision only if its mean per-image Dice on the model's validation
images is within ``--max-loss`` (0.003) of fp32's. Needs the validation images in ``--data``
(default: the sources recorded in model.json, resolved from the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from batchmask.inference.quantize import QuantSettings  # noqa: E402

QUANT_DEFAULTS = QuantSettings()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "batchmask" / "default_model"))
    ap.add_argument("--data", action="append", default=[], help="calibration and validation sources, repeatable")
    ap.add_argument("--images", type=int, default=QUANT_DEFAULTS.images, help="calibration images")
    ap.add_argument("--max-loss", type=float, default=0.003, help="largest Dice loss for int8 to be the default")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.inference.int8 import INT8_FILE
    from batchmask.inference.quantize import export_model

    model = Path(args.model)
    rec = export_model(model, "onnx-int8", model / INT8_FILE, args.data, QuantSettings(images=args.images))
    v = rec.get("validation")
    print(json.dumps({k: rec[k] for k in ("file", "sha256", "bytes", "keras_sha256")} | {"validation": v}, indent=2))
    if not v:
        print("no validation images found in the data: int8 stays opt-in (nothing measured)")
        return 1
    ok = -v["dice_diff"] <= args.max_loss
    print(f"int8 vs fp32 on {v['images']} validation images: Dice {v['dice_int8']:.5f} vs {v['dice_fp32']:.5f}, "
          f"difference {v['dice_diff']:+.5f} (95% paired bootstrap {v['dice_diff_ci95'][0]:+.5f}.."
          f"{v['dice_diff_ci95'][1]:+.5f}); mask pixels agree {v['mask_agreement']:.2%}")
    print(f"{'within' if ok else 'NOT within'} {args.max_loss} of fp32: int8 "
          f"{'may become the default precision' if ok else 'stays opt-in (--precision int8)'}; "
          f"update README.md ('What int8 costs') and docs/benchmarks.md with these figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
