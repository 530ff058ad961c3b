"""Where the time of a ``batchmask run`` goes, in one process (no Ray): a figure for issue 11.

    python scripts/profile_run.py IMAGE_DIR [--runtime onnx|keras] [--top 25]

1. Runs ``batchmask.run`` once over IMAGE_DIR to warm up (model load, ONNX export cache), then
   again under cProfile, and prints the wall time, images/s and the top functions by cumulative
   time. Keep IMAGE_DIR at or under ``--in-process-max`` (40) images so the run stays in process.
2. Times the pipeline's own steps per image on one thread: decode for the network, the
   full-size mask and its statistics, the PNG encode.

Say in any figure what else was running on the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("--runtime", default="onnx", choices=("onnx", "keras"))
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    from batchmask import run
    from batchmask.batch.outputs import decode_for_model, encode_png, mask_stats
    from batchmask.inference import load_model

    with tempfile.TemporaryDirectory() as tmp:
        run(str(args.images), f"{tmp}/warm", runtime=args.runtime, quiet=True)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        s = run(str(args.images), f"{tmp}/out", runtime=args.runtime, quiet=True)
        prof.disable()
        print(f"run: {s.ok} images in {time.perf_counter() - t:.2f} s ({s.images_per_s:.2f} images/s), "
              f"peak RSS {s.run_json['actors'][0]['peak_rss_mb']:.0f} MB")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)

    files = sorted(p for p in args.images.iterdir() if p.is_file())
    model = load_model(None, runtime=args.runtime)
    size, thr = model.image_size, model.threshold
    steps = {"decode": 0.0, "mask": 0.0, "png": 0.0}
    decoded = [decode_for_model(p.read_bytes(), size, 50_000_000, p.name) for p in files[:1]]  # imports, once
    mask_stats(model.predict_proba([decoded[0][0]])[0], decoded[0][1], decoded[0][2], thr, size)
    for p in files:
        t = time.perf_counter()
        x, w, h = decode_for_model(p.read_bytes(), size, 50_000_000, p.name)
        steps["decode"] += time.perf_counter() - t
        prob = model.predict_proba([x])[0]
        t = time.perf_counter()
        m = mask_stats(prob, w, h, thr, size)[0]
        steps["mask"] += time.perf_counter() - t
        t = time.perf_counter()
        encode_png(m)
        steps["png"] += time.perf_counter() - t
    print("per image, one thread: " + ", ".join(f"{k} {1000 * v / len(files):.1f} ms" for k, v in steps.items()))


if __name__ == "__main__":
    main()
