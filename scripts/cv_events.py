#!/usr/bin/env python3
"""Leave-one-event-out cross-validation of a `batchmask train` configuration.

    python scripts/cv_events.py --data ../shared/data/widerface-dev --out /tmp/cv \
        [--events 4--Dancing,19--Couple] [--parallel 5] -- --epochs 40 --image-size 512 \
        --crop-size 256 --dice-per-image

For each WIDER event folder in --data, trains on all other events and validates on that one
(the issue's proxy for "held-out images from other WIDER events"), by running the real
`batchmask train` with `--data OUT/folds/E/train_bbx_gt.txt --val-data
OUT/folds/E/heldout_bbx_gt.txt`; everything after `--` is passed to it unchanged. Each fold's
model, `train.log` and `model.json` land in OUT/E/. The summary (per fold: held-out Dice and
IoU at the tuned threshold, at original image size; mean and standard deviation over folds)
is printed as a Markdown table and written to OUT/summary.json.

`--parallel N` runs N folds at once (useful on a GPU machine; on 2 CPU cores keep 1).
The threshold is tuned on the held-out event itself, so every figure is slightly optimistic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_folds(data: Path, out: Path, events: list[str] | None) -> dict[str, Path]:
    """Write OUT/folds/E/{train,heldout}_bbx_gt.txt with an images/ link to DATA/images."""
    from batchmask.convert import write_wider_annotations
    from batchmask.data import find_wider_annotations, load_wider

    _, images = find_wider_annotations(data)
    samples = load_wider(data)
    groups = sorted({s.group for s in samples})
    unknown = set(events or []) - set(groups)
    if unknown:
        raise SystemExit(f"unknown event(s) {sorted(unknown)}; --data has {groups}")
    folds = {}
    for ev in events or groups:
        d = out / "folds" / ev
        d.mkdir(parents=True, exist_ok=True)
        link = d / "images"
        if not link.exists():
            link.symlink_to(images.resolve(), target_is_directory=True)
        write_wider_annotations(((s.name, s.boxes) for s in samples if s.group != ev), d / "train_bbx_gt.txt")
        write_wider_annotations(((s.name, s.boxes) for s in samples if s.group == ev), d / "heldout_bbx_gt.txt")
        folds[ev] = d
    return folds


def run_fold(ev: str, fold: Path, out: Path, train_args: list[str]) -> dict:
    model_dir = out / ev
    model_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "batchmask", "-v", "train", "--data", str(fold / "train_bbx_gt.txt"),
           "--val-data", str(fold / "heldout_bbx_gt.txt"), "--out", str(model_dir), "--quiet", "--force", *train_args]
    t = time.time()
    with open(model_dir / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    row = {"event": ev, "rc": rc, "wall_s": round(time.time() - t, 1)}
    meta_path = model_dir / "model.json"
    if rc == 0 and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        v = meta["metrics"]["validation"]
        row.update(dice=v["dice"], iou=v["iou"], threshold=v["threshold"], images=v["images"],
                   best_epoch=meta["training"]["best_epoch"], epochs_run=meta["training"]["epochs_run"])
    print(f"{ev}: " + (f"Dice {row['dice']:.3f}" if "dice" in row else f"failed (rc {rc}), see {model_dir}/train.log"),
          flush=True)
    return row


def main() -> int:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="WIDER FACE folder with several event folders")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--events", help="comma-separated events to hold out (default: every one)")
    ap.add_argument("--parallel", type=int, default=1, help="folds trained at once")
    args = ap.parse_args(own)
    folds = make_folds(args.data, args.out, args.events.split(",") if args.events else None)
    print(f"{len(folds)} folds; batchmask train {' '.join(train_args)}", flush=True)
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda kv: run_fold(kv[0], kv[1], args.out, train_args), folds.items()))
    ok = [r for r in rows if "dice" in r]
    summary = {"train_args": train_args, "folds": rows}
    if ok:
        dice = [r["dice"] for r in ok]
        summary["mean_dice"] = statistics.fmean(dice)
        summary["std_dice"] = statistics.stdev(dice) if len(dice) > 1 else 0.0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n| held-out event | images | Dice | IoU | threshold | best epoch / run | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "dice" in r:
            print(f"| {r['event']} | {r['images']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['threshold']:.2f} "
                  f"| {r['best_epoch']} / {r['epochs_run']} | {r['wall_s'] / 60:.1f} min |")
        else:
            print(f"| {r['event']} | failed (rc {r['rc']}) | | | | | |")
    if ok:
        print(f"| **mean ± sd over {len(ok)} folds** | | **{summary['mean_dice']:.3f}** ± {summary['std_dice']:.3f} | "
              f"{statistics.fmean(r['iou'] for r in ok):.3f} | | | |")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
