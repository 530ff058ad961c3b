#!/usr/bin/env python3
"""Model-only predict speed (images/s) for MobileNet alphas, decoders and input sizes on this machine.

    python scripts/bench_predict.py --alphas 1.0,0.25 --sizes 224,320,384 --decoders lean,unet --batches 10

Speed does not depend on the weights, so untrained networks of each shape are timed
(one process, all cores, batches of pre-resized images, after a warm-up batch).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", default="1.0,0.25")
    ap.add_argument("--sizes", default="224,320,384")
    ap.add_argument("--decoders", default="lean", help="names from batchmask.config.DECODERS, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from batchmask.config import ModelConfig
    from batchmask.model import build_unet, count_macs

    rows = []
    combos = [(float(a), int(s), d) for a in args.alphas.split(",") for s in args.sizes.split(",")
              for d in args.decoders.split(",")]
    for alpha, size, decoder in combos:
        net = build_unet(ModelConfig.with_decoder(decoder, alpha=alpha, image_size=size), backbone_weights=None)
        x = np.random.default_rng(0).uniform(0, 255, (args.batch_size, size, size, 3)).astype(np.float32)
        net.predict_on_batch(x)
        t = time.perf_counter()
        for _ in range(args.batches):
            net.predict_on_batch(x)
        dt = time.perf_counter() - t
        ips = args.batches * args.batch_size / dt
        gmacs = count_macs(net) / 1e9
        rows.append({"alpha": alpha, "image_size": size, "decoder": decoder, "gmacs": round(gmacs, 2),
                     "params": net.count_params(), "images_per_s": round(ips, 1)})
        print(f"alpha {alpha:<4} size {size:<4} decoder {decoder:<6} {gmacs:6.2f} G MACs "
              f"params {net.count_params():>9,}  {ips:6.1f} img/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "batch_size": args.batch_size, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
