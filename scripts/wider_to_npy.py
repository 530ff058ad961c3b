#!/usr/bin/env python3
"""Write a WIDER FACE folder (or a subset of it) in the exercise's exact images.npy format.

    python scripts/wider_to_npy.py demo/wider /tmp/images.npy
    python scripts/wider_to_npy.py ../shared/data/widerface-dev dev.npy --events 1--Handshaking,4--Dancing --limit 50

The result loads with `batchmask train --data dev.npy`, so both loaders can be checked on the
same images.
"""

from __future__ import annotations

import argparse
import logging
import sys

from batchmask.convert import write_npy
from batchmask.data import DataError, load_wider


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wider", help="WIDER folder (images/ + wider_face_*_bbx_gt.txt) or annotation file")
    ap.add_argument("out", help="output .npy file")
    ap.add_argument("--events", help="comma-separated event folders to keep (default: all)")
    ap.add_argument("--limit", type=int, help="keep at most N images (after --events)")
    ap.add_argument("--max-side", type=int, help="downscale images so the longer side is at most N px")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        samples = load_wider(args.wider)
    except DataError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if args.events:
        keep = set(args.events.split(","))
        samples = [s for s in samples if s.group in keep]
    samples = samples[: args.limit] if args.limit else samples
    if not samples:
        print("Error: no images selected", file=sys.stderr)
        return 1
    n = write_npy(samples, args.out, max_side=args.max_side)
    print(f"wrote {n} images with {sum(len(s.boxes) for s in samples)} faces to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
