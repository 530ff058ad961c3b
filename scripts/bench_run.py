#!/usr/bin/env python
"""Throughput of `batchmask run` against the model-only limit, on one machine, in one go.

Figures (issue 3):
  (a) model-only: the same model predicting pre-decoded, pre-resized batches in this process
      with all cores, images/s;
  (b) `run()` end to end (decode, predict, write masks and CSV) at --workers 1 and 2:
      steady-state images/s (after every actor has loaded the model) plus start-up time;
  (c) (b) / (a);
  (d) peak RSS per actor for N images and for 3 x N images (the folder linked three times).
Plus per-image CPU costs of the non-model stages, and the end-to-end rate without JPEG draft
decoding, to show where the time goes.

With ``--runtime keras onnx`` (issue 11) (a) and (b) are measured for each runtime in the same
run, interleaved, (b) through Ray (``in_process_max=0``); ``--small 10`` adds the wall time of
the ``batchmask run`` command for 10 new images: Keras through Ray (before issue 11) and the
default (ONNX Runtime, in process). ``--limit N`` uses the first N images only. ``--rounds N``
repeats model-only then `run` per runtime N times (each ratio to its own round's model-only rate,
then min/median/max); ``--quiet-load 0.5`` waits for a quiet machine before each round:

    python scripts/bench_run.py --model batchmask/default_model --runtime int8 onnx --limit 300 \
        --workers 1 --rounds 3 --quiet-load 0.5 --out bench.json

    .venv/bin/python scripts/bench_run.py --images ../shared/data/widerface-dev/images \
        [--model DIR] [--out bench_run.json]

Without --model a real-size network (ModelConfig defaults, random weights) is built: speed
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def build_model(out: Path) -> Path:
    from batchmask.config import ModelConfig
    from batchmask.inference import base_meta, save_model
    from batchmask.model import build_unet

    cfg = ModelConfig()
    save_model(build_unet(cfg, backbone_weights=None), out, base_meta(cfg) | {"note": "untrained, for speed only"})
    return out


def list_images(root: Path) -> list[Path]:
    from batchmask.batch.runner import RUN_EXTENSIONS
    from batchmask.batch.storage import StorageSpec, matches

    st = StorageSpec(str(root)).open()
    return [root / r for r in st.iter_files() if matches(r, RUN_EXTENSIONS, None)]


def _runtime_precision(runtime: str) -> tuple[str, str]:
    """"int8" is the model's int8 ONNX file (runtime onnx, precision int8)."""
    return ("onnx", "int8") if runtime == "int8" else (runtime, "fp32")


def model_only(model_dir: Path, files: list[Path], batch_size: int, runtime: str = "keras") -> dict:
    import numpy as np

    from batchmask.data import read_image
    from batchmask.inference import load_model

    rt, precision = _runtime_precision(runtime)
    m = load_model(model_dir, runtime=rt, precision=precision)
    assert m.runtime == rt, f"asked for {runtime}, got {m.runtime}"
    xs = np.stack([m.preprocess(read_image(p)) for p in files])
    m.predict_batch(xs[:batch_size])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(xs), batch_size):
        m.predict_batch(xs[i : i + batch_size])
    dt = time.perf_counter() - t
    res = {"runtime": runtime, "images": len(xs), "seconds": round(dt, 2), "images_per_s": round(len(xs) / dt, 2),
           "ms_per_image": round(1000 * dt / len(xs), 2), "image_size": m.image_size}
    if rt == "onnx" and (os.cpu_count() or 1) >= 2:  # as `run` predicts on the CPU: two 1-thread streams
        res["two_streams_images_per_s"] = two_streams(model_dir, xs, batch_size, precision)
    return res


def two_streams(model_dir: Path, xs, batch_size: int, precision: str) -> float:
    """Model-only images/s with two threads each predicting half-batches on a 1-thread session
    (how `run` predicts with 2+ CPUs, batchmask.batch.worker.onnx_streams)."""
    from concurrent.futures import ThreadPoolExecutor

    from batchmask.inference import load_model

    m = load_model(model_dir, runtime="onnx", precision=precision, threads=max(1, (os.cpu_count() or 2) // 2))
    half = max(1, batch_size // 2)
    chunks = [xs[i : i + half] for i in range(0, len(xs), half)]
    m.predict_batch(chunks[0])
    with ThreadPoolExecutor(2) as pool:
        t = time.perf_counter()
        list(pool.map(m.predict_batch, chunks))
        dt = time.perf_counter() - t
    return round(len(xs) / dt, 2)


def stage_costs(files: list[Path], size: int, n: int = 100) -> dict:
    """Single-thread ms per image for each non-model stage, on the first n images."""
    import numpy as np

    from batchmask.batch.outputs import decode_for_model, encode_png, mask_stats

    datas = [p.read_bytes() for p in files[:n]]
    out = {}
    for draft in (False, True):
        t = time.perf_counter()
        dec = [decode_for_model(d, size, 10**9, "x", draft=draft) for d in datas]
        out["decode_resize_ms" + ("_draft" if draft else "_full")] = round(1000 * (time.perf_counter() - t) / n, 2)
    rng = np.random.default_rng(0)
    prob = np.clip(rng.normal(0.2, 0.1, (size, size)), 0, 1).astype(np.float32)
    prob[40:80, 60:90] = 0.9
    t = time.perf_counter()
    masks = [mask_stats(prob, w, h, 0.5, size)[0] for _, w, h in dec]
    out["upsample_threshold_label_ms"] = round(1000 * (time.perf_counter() - t) / n, 2)
    t = time.perf_counter()
    for m in masks:
        encode_png(m)
    out["png_encode_ms"] = round(1000 * (time.perf_counter() - t) / n, 2)
    return out


def end_to_end(inp: Path, model_dir: Path, workers: int, batch_size: int, draft: bool = True,
               runtime: str = "keras", in_process_max: int = 0) -> dict:
    from batchmask.batch.runner import run

    out = Path(tempfile.mkdtemp(prefix=f"bench-run-w{workers}-"))
    try:
        rt, precision = _runtime_precision(runtime)
        s = run(str(inp), str(out), str(model_dir), workers=workers, batch_size=batch_size, quiet=True,
                draft=draft, runtime=rt, precision=precision, in_process_max=in_process_max)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tp = s.run_json.get("throughput", {})
    return {"runtime": runtime, "mode": s.run_json.get("plan", {}).get("mode"), "workers": workers, "draft": draft,
            "images": s.ok + s.failed, "failed": s.failed,
            "wall_s": s.wall_s, "startup_s": tp.get("startup_s"), "steady_images_per_s": tp.get("steady_images_per_s"),
            "overall_images_per_s": s.images_per_s,
            "actors": [{k: a.get(k) for k in ("images", "peak_rss_mb", "busy_s", "startup_s")}
                       for a in s.run_json.get("actors", [])]}


def small_run(files: list[Path], model_dir: Path, n: int, extra: list[str]) -> float:
    """Wall time of the `batchmask run` command (a new process, as cron starts it) for n new images."""
    import subprocess
    import sys

    d = Path(tempfile.mkdtemp(prefix="bench-small-"))
    try:
        (d / "in").mkdir()
        for p in files[:n]:
            os.symlink(p, d / "in" / p.name)
        exe = str(Path(sys.executable).parent / "batchmask")
        t = time.perf_counter()
        subprocess.run([exe, "run", "-i", str(d / "in"), "-o", str(d / "out"), "-m", str(model_dir), "-q", *extra],
                       check=True)
        return round(time.perf_counter() - t, 2)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_quiet(load: float | None, timeout_s: float = 600.0) -> float:
    """Wait (at most ``timeout_s``) until the 1-minute load average is under ``load``; returns it."""
    t0 = time.time()
    while load is not None and os.getloadavg()[0] >= load and time.time() - t0 < timeout_s:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def compare_runtimes(root: Path, model_dir: Path, files: list[Path], args) -> dict:
    """(a) and (b) for each runtime, interleaved so that other load hits them alike.

    With ``--rounds N`` each round measures, per runtime, model-only and then ``run`` right
    after it, and each run's ratio is to the model-only rate of its own round (the machine's
    speed moves between rounds; ``--quiet-load`` waits for a low load average first).
    """
    from batchmask.inference.backends import cached_onnx

    if "onnx" in args.runtime:
        cached_onnx(model_dir)  # export once, outside the timings (as a cron run finds it cached)
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "images": len(files),
                 "batch_size": args.batch_size, "model": str(model_dir), "model_only": {}, "end_to_end": [],
                 "rounds": args.rounds, "quiet_load": args.quiet_load}
    for rnd in range(1, args.rounds + 1):
        for r in args.runtime:
            load = wait_quiet(args.quiet_load)
            mo = res["model_only"][r] = model_only(model_dir, files, args.batch_size, r) | {"round": rnd, "load": load}
            print("(a)", mo, flush=True)
            for w in args.workers:
                e = end_to_end(root, model_dir, w, args.batch_size, runtime=r,
                               in_process_max=len(files) if args.in_process else 0)
                steady = e["steady_images_per_s"] or 0
                e |= {"round": rnd, "ratio_to_model_only": round(steady / mo["images_per_s"], 3)}
                if mo.get("two_streams_images_per_s"):
                    e["ratio_to_two_streams"] = round(steady / mo["two_streams_images_per_s"], 3)
                res["end_to_end"].append(e)
                print("(b)", {k: v for k, v in e.items() if k != "actors"}, [a["images"] for a in e["actors"]],
                      flush=True)
    res["summary"] = summarize(res["end_to_end"])
    for row in res["summary"]:
        print("summary", row, flush=True)
    if args.small:
        res["small"] = {"images": args.small,
                        "before_keras_ray_s": small_run(files, model_dir, args.small,
                                                        ["--runtime", "keras", "--in-process-max", "0"]),
                        "onnx_ray_s": small_run(files, model_dir, args.small, ["--in-process-max", "0"]),
                        "after_default_s": small_run(files, model_dir, args.small, [])}
        print("small", res["small"], flush=True)
    return res


def summarize(runs: list[dict]) -> list[dict]:
    """Per runtime and worker count: the runs' steady images/s and ratios, min, median and max."""
    import statistics

    out = []
    for key in dict.fromkeys((e["runtime"], e["workers"]) for e in runs):
        sel = [e for e in runs if (e["runtime"], e["workers"]) == key]
        row: dict = {"runtime": key[0], "workers": key[1], "runs": len(sel)}
        for f in ("steady_images_per_s", "ratio_to_model_only", "ratio_to_two_streams"):
            v = [e[f] for e in sel if e.get(f) is not None]
            if v:
                row[f] = {"min": min(v), "median": round(statistics.median(v), 3), "max": max(v)}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/data/widerface-dev/images")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench_run.json")
    ap.add_argument("--skip-x3", action="store_true", help="skip the 3 x N images RSS run")
    ap.add_argument("--runtime", nargs="+", default=None, choices=["keras", "onnx", "int8"],
                    help="compare these runtimes (a, b) in one run; skips the draft, x3 and stage figures "
                         "(int8: the model's int8 ONNX file)")
    ap.add_argument("--in-process", action="store_true",
                    help="with --runtime: (b) in this process (as small runs are done), not through Ray")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--small", type=int, default=0, help="also time `batchmask run` for this many new images")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --runtime: repeat (a) then (b) per runtime this many times; ratios per round")
    ap.add_argument("--quiet-load", type=float, default=None, metavar="L",
                    help="with --runtime: before each round's model-only figure, wait (up to 10 min) until "
                         "the 1-minute load average is under L")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.images).resolve()
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder")
    tmp = Path(tempfile.mkdtemp(prefix="bench-run-"))
    model_dir = Path(args.model) if args.model else build_model(tmp / "model")
    files = list_images(root)
    if args.limit:
        files = files[: args.limit]
        root = tmp / "limited"
        for p in files:
            (root / p.name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, root / p.name)
    if args.runtime:
        res = compare_runtimes(root, model_dir, files, args)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                 "images": len(files), "batch_size": args.batch_size, "model": str(model_dir)}
    print(f"{len(files)} images under {root}; model {model_dir}", flush=True)
    res["a_model_only"] = model_only(model_dir, files, args.batch_size)
    print("(a)", res["a_model_only"], flush=True)
    res["stage_costs_ms"] = stage_costs(files, res["a_model_only"]["image_size"])
    print("stages", res["stage_costs_ms"], flush=True)
    res["b_end_to_end"] = []
    for w in args.workers:
        r = end_to_end(root, model_dir, w, args.batch_size)
        r["c_ratio"] = round((r["steady_images_per_s"] or 0) / res["a_model_only"]["images_per_s"], 3)
        res["b_end_to_end"].append(r)
        print("(b)", r, flush=True)
    w = max(args.workers)
    r = end_to_end(root, model_dir, w, args.batch_size, draft=False)
    r["c_ratio"] = round((r["steady_images_per_s"] or 0) / res["a_model_only"]["images_per_s"], 3)
    res["b_without_draft"] = r
    print("(b, no draft)", r, flush=True)
    if not args.skip_x3:
        x3 = tmp / "x3"
        x3.mkdir()
        for k in range(3):
            os.symlink(root, x3 / f"copy{k}")
        r3 = end_to_end(x3, model_dir, w, args.batch_size)
        res["d_rss"] = {"workers": w,
                        "n_images": [a["peak_rss_mb"] for a in res["b_end_to_end"][-1]["actors"]],
                        "3n_images": [a["peak_rss_mb"] for a in r3["actors"]], "run_3n": r3}
        print("(d)", res["d_rss"], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
