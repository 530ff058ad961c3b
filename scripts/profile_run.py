"""Where the CPU of a ``batchmask run`` goes, per image and per stage, in one process (no Ray).

    python scripts/profile_run.py IMAGE_DIR [--model DIR] [--precision fp32 int8] [--limit 60]
                                  [--repeat 3] [--cprofile 25] [--out profile.json]

The machine may be shared: wall-clock rates move with other load, CPU time much less. So this
prints CPU milliseconds per image:

1. per stage, on this thread (``time.thread_time``), each stage alone, ``--repeat`` times over the
   images: read, decode for the network (JPEG draft mode, resize), the mask and its statistics
   (``measure``), the RLE and boxes for results.parquet, the PNG encode, the mask file write;
2. the network: process CPU (all of ONNX Runtime's threads) and wall per image, batches of 8,
   with ``--threads`` intra-op threads;
3. a whole in-process ``batchmask.run`` over the images: images/s and process CPU per image while
   its worker processes shards (model loading, listing and the final merge left out), and the
   cores it kept busy meanwhile (process CPU / wall; 2.0 = both cores of a 2-core machine).

With ``--cprofile N``, the top N functions of that run by internal time. The load average before
and after is printed (and written with ``--out``): say in any figure what else was running.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stage_cpu(files: list[Path], model, repeat: int) -> dict[str, float]:
    """Thread CPU ms per image of each non-network stage, with the model's real probabilities."""
    import numpy as np

    from batchmask.batch.tablerow import table_fields
    from batchmask.inference.pixels import decode_for_model, encode_png, measure

    size, thr, T = model.image_size, model.threshold, time.thread_time
    datas = [p.read_bytes() for p in files]
    dec = [decode_for_model(d, size, 10**9, p.name) for d, p in zip(datas, files, strict=True)]
    probs = np.concatenate([model.predict_batch(np.stack([x for x, _, _ in dec[i : i + 8]]))
                            for i in range(0, len(dec), 8)])
    acc = dict.fromkeys(("read", "decode", "measure", "rle_boxes", "png", "write"), 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeat):
            for p, d, (_, w, h), prob in zip(files, datas, dec, probs, strict=True):
                t = T()
                p.read_bytes()
                acc["read"] += T() - t
                t = T()
                decode_for_model(d, size, 10**9, p.name)
                acc["decode"] += T() - t
                t = T()
                r = measure(prob, w, h, thr, size)
                acc["measure"] += T() - t
                t = T()
                table_fields(r)
                acc["rle_boxes"] += T() - t
                t = T()
                png = encode_png(r.mask)
                acc["png"] += T() - t
                t = T()
                Path(tmp, "m.png").write_bytes(png)
                acc["write"] += T() - t
    n = repeat * len(files)
    out = {k: round(1000 * v / n, 2) for k, v in acc.items()}
    out["total"] = round(sum(out.values()), 2)
    return out


def network_cpu(files: list[Path], model, repeat: int) -> dict[str, float]:
    """Process CPU and wall ms per image of the network alone (pre-decoded batches of 8)."""
    import numpy as np

    from batchmask.inference.pixels import decode_for_model

    xs = np.stack([decode_for_model(p.read_bytes(), model.image_size, 10**9, p.name)[0] for p in files])
    model.predict_batch(xs[:8])
    c, w = time.process_time(), time.perf_counter()
    for _ in range(repeat):
        for i in range(0, len(xs), 8):
            model.predict_batch(xs[i : i + 8])
    c, w = time.process_time() - c, time.perf_counter() - w
    n = repeat * len(xs)
    return {"cpu_ms": round(1000 * c / n, 2), "wall_ms": round(1000 * w / n, 2), "images_per_s": round(n / w, 2)}


def whole_run(root: Path, model_dir: str, precision: str, top: int) -> dict:
    """An in-process run: wall and process CPU while its worker processes shards (model loading,
    listing and the final merge left out), and its steady images/s."""
    from batchmask import run
    from batchmask.batch.worker import MaskWorker

    spent = {"cpu": 0.0, "wall": 0.0}
    process = MaskWorker.process

    def timed(self, shard, items):
        c, w = time.process_time(), time.perf_counter()
        try:
            return process(self, shard, items)
        finally:
            spent["cpu"] += time.process_time() - c
            spent["wall"] += time.perf_counter() - w

    tmp = Path(tempfile.mkdtemp(prefix="profile-run-"))
    kw = {"runtime": "onnx", "precision": precision, "quiet": True, "in_process_max": 10**6}
    try:
        run(str(root), str(tmp / "warm"), model_dir, **kw)
        MaskWorker.process = timed
        prof = cProfile.Profile() if top else None
        if prof:
            prof.enable()
        s = run(str(root), str(tmp / "out"), model_dir, **kw)
        if prof:
            prof.disable()
    finally:
        MaskWorker.process = process
        shutil.rmtree(tmp, ignore_errors=True)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    n = s.ok + s.failed
    return {"images": n, "steady_images_per_s": s.run_json.get("throughput", {}).get("steady_images_per_s"),
            "processing_images_per_s": round(n / spent["wall"], 2),
            "cpu_ms_per_image": round(1000 * spent["cpu"] / n, 2),
            "cores_busy": round(spent["cpu"] / spent["wall"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cprofile", type=int, default=0, metavar="N")
    ap.add_argument("--no-run", action="store_true", help="skip the whole-run figure")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from bench_run import list_images

    from batchmask.inference import load_model, resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    files = list_images(args.images.resolve())[: args.limit]
    res: dict = {"images": len(files), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    root = Path(tempfile.mkdtemp(prefix="profile-images-"))
    for p in files:  # the same first N images bench_run.py --limit uses
        (root / p.name).symlink_to(p)
    try:
        for prec in args.precision:
            m = load_model(model_dir, runtime="onnx", precision=prec, threads=args.threads)
            r = {"stages_cpu_ms": stage_cpu(files, m, args.repeat), "network": network_cpu(files, m, args.repeat)}
            if not args.no_run:
                r["run"] = whole_run(root, model_dir, prec, args.cprofile)
            res[prec] = r
            print(prec, json.dumps(r), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    print("load average before", res["load_before"], "after", res["load_after"])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
