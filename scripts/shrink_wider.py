#!/usr/bin/env python3
"""Copy a WIDER FACE folder with images downscaled (longer side <= --max-side), boxes scaled.

Training never uses more than 2x the input size (see batchmask.augment.downscale_sample), so a
copy at 768 px loses nothing for input sizes up to 384 and is a fraction of the size: handy
for moving data to a GPU machine.

    python scripts/shrink_wider.py ../shared/data/widerface-dev /tmp/widerface-768 --max-side 768
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from batchmask.augment import downscale_sample
from batchmask.convert import write_wider_annotations
from batchmask.data import find_wider_annotations, load_wider


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wider")
    ap.add_argument("out")
    ap.add_argument("--max-side", type=int, default=768)
    ap.add_argument("--quality", type=int, default=92)
    args = ap.parse_args(argv)
    ann, _ = find_wider_annotations(Path(args.wider))
    out = Path(args.out)
    entries = []
    for s in tqdm(load_wider(args.wider), unit="img"):
        image, boxes = downscale_sample(s, args.max_side)
        dst = out / "images" / s.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(dst, quality=args.quality)
        entries.append((s.name, boxes))
    write_wider_annotations(entries, out / ann.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
