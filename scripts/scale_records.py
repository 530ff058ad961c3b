#!/usr/bin/env python
"""Time and peak memory of an output's bookkeeping at N recorded images, the model replaced by a stub.

For each N it builds (not timed) an input folder of N empty ``.jpg`` files, 1,000 per folder, and
an output that already records all of them: an empty mask per image, ``coverage.csv`` (1 % error
rows, without masks) and ``results.parquet``. Then each stage runs in a fresh Python process, so
that its peak memory is its own (``VmHWM``: resident memory, NumPy's and Arrow's buffers too):

    listing   list the input folder (the runner's sorted walk)
    done      merge leftovers (none) and read the records: the done set and the recorded mask names
    rerun     ``batchmask.batch.runner.run()`` with nothing new (what a nightly job does): the lock,
              the done set, the listing with a done check per image; no model is loaded
    merge     fold one part file of ``--new`` rows (what a stub worker writes) into
              coverage.csv and results.parquet
    table     rebuild results.parquet (deleted) from coverage.csv, as after an upgrade from a
              version without it (coverage.csv is rewritten too)

``--records-only`` skips the files (no input, no mask files: the rows name masks that are not
there, so only the error rows are done) and runs ``done``, ``merge`` and ``table``: for sizes
whose files would not fit the disk's inodes (10 M images need 20 M files). The index is built
as with the files; only the time of listing ``masks/`` is missing.

It works with any version of batchmask: the one before the record index (``merge_parts``
returning every row, ``done_set``) or after (``read_records``). ``--code LABEL=PATH`` (repeatable)
runs each stage with ``PYTHONPATH=PATH`` for each, on the same built output (a checkout of the
previous version: ``git archive main | tar -x -C /tmp/main``); without it, the ``batchmask`` that
this Python imports. ``merge`` adds ``--new`` images per version (named after the label).

    PYTHONPATH=. .venv/bin/python scripts/scale_records.py --sizes 10000 100000 1000000 \\
        --work /tmp/scale --code before=/tmp/main --code after=. --out scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("listing", "done", "rerun", "merge", "table")
RECORDS_ONLY = ("done", "merge", "table")
PER_FOLDER = 1000


def name(i: int) -> str:
    return f"f{i // PER_FOLDER:05d}/i{i:07d}"


def build(root: Path, n: int, files: bool) -> dict:
    """The input and the output for ``n`` recorded images; returns what it took (time, bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchmask.batch.outputs import COLUMNS
    from batchmask.batch.table import SCHEMA

    t0 = time.time()
    inp, out = root / "in", root / "out"
    inp.mkdir(parents=True)
    (out / "masks").mkdir(parents=True)
    if files:
        for i in range(n):
            if i % PER_FOLDER == 0:
                (inp / name(i)).parent.mkdir()
                (out / "masks" / name(i)).parent.mkdir()
            os.close(os.open(inp / f"{name(i)}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
            if i % 100 != 7:
                os.close(os.open(out / "masks" / f"{name(i)}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    def mask_of(i: int) -> str:
        return f"masks/{name(i)}.png"

    with open(out / "coverage.csv", "w", newline="") as f:
        f.write(",".join(COLUMNS) + "\n")
        for i in range(n):
            if i % 100 == 7:
                f.write(f"{name(i)}.jpg,640,480,,,,,,error,{name(i)}.jpg: cannot decode image\n")
            else:
                f.write(f"{name(i)}.jpg,640,480,{i % 3000},{i % 3000 / 307200:.6f},1,0.9000,{mask_of(i)},ok,\n")
    with pq.ParquetWriter(out / "results.parquet", SCHEMA, compression="zstd") as w:
        for lo in range(0, n, 1_000_000):
            ids = range(lo, min(n, lo + 1_000_000))
            ok = [i % 100 != 7 for i in ids]
            cols = {
                "image": [f"{name(i)}.jpg" for i in ids],
                "mask": [mask_of(i) if k else "" for i, k in zip(ids, ok, strict=True)],
                "width": [640] * len(ids), "height": [480] * len(ids),
                "face_pixels": [i % 3000 if k else None for i, k in zip(ids, ok, strict=True)],
                "coverage": [i % 3000 / 307200 if k else None for i, k in zip(ids, ok, strict=True)],
                "faces": [1 if k else None for k in ok], "mean_confidence": [0.9 if k else None for k in ok],
                "status": ["ok" if k else "error" for k in ok],
                "error": ["" if k else f"{name(i)}.jpg: cannot decode image" for i, k in zip(ids, ok, strict=True)],
                "mask_rle": ["PQ2g0" if k else None for k in ok],
                "boxes": [[{"x": 1, "y": 2, "w": 3, "h": 4, "score": 0.9}] if k else None for k in ok],
            }
            w.write_table(pa.Table.from_pydict(cols, schema=SCHEMA))
    return {"build_s": round(time.time() - t0, 1), "output_mb": round(_du(out) / 2**20, 1),
            "files": 2 * n if files else 0}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage(name_: str, root: Path, new: int, records_only: bool, label: str) -> dict:
    """Run one stage here (a fresh process); its time and this process's peak RSS."""
    import logging

    from batchmask.batch import outputs
    from batchmask.batch.storage import StorageSpec

    logging.basicConfig(level=logging.WARNING)
    inp = StorageSpec(str(root / "in")).open()
    out = StorageSpec(str(root / "out")).open()
    base = _rss_mb()
    t0 = time.time()
    info: dict = {}
    if name_ == "listing":
        info["listed"] = sum(1 for _ in inp.iter_files())
    elif name_ == "done":
        if hasattr(outputs, "read_records"):  # the record index
            outputs.merge_parts(out)
            done = outputs.read_records(out)
            names = outputs.MaskNames(done)
            info["index_mb"] = round(done.nbytes / 2**20, 1)
        else:  # before: every row in a dict, a set of names, every mask path
            records = outputs.merge_parts(out)
            done = outputs.done_set(out, records)
            names = outputs.MaskNames(outputs.recorded_masks(records))
        info["done"] = len(done)
        del names
    elif name_ == "rerun":
        from batchmask.batch.runner import run

        s = run(str(root / "in"), str(root / "out"), str(Path(outputs.__file__).parents[1] / "default_model"),
                quiet=True)
        info.update(skipped=s.skipped, ok=s.ok, failed=s.failed)
    elif name_ == "merge":
        from batchmask.batch.tablerow import TABLE_FIELDS

        rows = []
        for i in range(new):  # what a stub worker writes: its masks, then its part file
            rel = f"new-{label}/{name(i)}"
            if not records_only:
                out.write_bytes(f"masks/{rel}.png", b"")
            r = outputs.ok_row(f"{rel}.jpg", f"masks/{rel}.png", 640, 480, 100, 1, 0.8)
            rows.append(r | dict.fromkeys(TABLE_FIELDS, "") | {"mask_rle": "PQ2g0", "boxes": "[[1,2,3,4,0.9]]"})
        out.write_bytes(outputs.part_name("20990101T000000Z000000-stub00", 0), outputs.rows_to_csv(rows))
        del rows  # the stub's copy: not the merge's memory
        t0 = time.time()
        outputs.merge_parts(out)
    elif name_ == "table":
        out.delete("results.parquet")
        outputs.merge_parts(out)
    info.update(stage=name_, time_s=round(time.time() - t0, 2), peak_mb=round(_rss_mb(peak=True), 1),
                base_mb=round(base, 1))
    return info


def _rss_mb(peak: bool = False) -> float:
    """Resident MB now, or the peak. Linux's VmHWM: ``ru_maxrss`` would be no lower than the
    parent's resident size when it forked (Linux keeps it across exec)."""
    want = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(want)) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_stage(s: str, root: Path, args: argparse.Namespace, label: str, path: str) -> dict:
    cmd = [sys.executable, __file__, "--stage", s, "--work", str(root), "--new", str(args.new), "--label", label]
    if args.records_only:
        cmd.append("--records-only")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path) if path else "")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"stage {s} ({label}) at N={root.name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (deleted per size)")
    ap.add_argument("--new", type=int, default=1000, help="rows of the merged part file")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--records-only", action="store_true", help="no image or mask files (see above)")
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                    help="run the stages with this batchmask checkout on PYTHONPATH (repeatable)")
    ap.add_argument("--label", default="this", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.work, args.new, args.records_only, args.label)))
        return
    stages = [s for s in args.stages if s in RECORDS_ONLY] if args.records_only else args.stages
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("this", os.environ.get("PYTHONPATH", ""))]
    results = []
    for n in args.sizes:
        root = args.work / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        made = build(root, n, not args.records_only)
        print(f"N={n:,}: built in {made['build_s']} s, output {made['output_mb']} MB, {made['files']:,} files",
              flush=True)
        for s in stages:
            for label, path in codes:
                r = _run_stage(s, root, args, label, path) | {"n": n, "code": label}
                results.append(r | made)
                extra = {k: v for k, v in r.items() if k not in ("stage", "time_s", "peak_mb", "base_mb", "n", "code")}
                print(f"  {s:8s} {label:8s} {r['time_s']:8.2f} s  peak {r['peak_mb']:8.1f} MB  "
                      f"(after imports {r['base_mb']} MB)  {json.dumps(extra)}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
