"""Writing samples as ``images.npy`` (scripts/wider_to_npy.py) or as a WIDER bbx_gt file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .augment import downscale_sample
from .data import Sample


def sample_to_record(image: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """Annotations of one image as the exercise stores them (points normalised to 0..1)."""
    h, w = image.shape[:2]
    return [
        {
            "label": ["Face"],
            "notes": "",
            "points": [{"x": float(x1) / w, "y": float(y1) / h}, {"x": float(x2) / w, "y": float(y2) / h}],
            "imageWidth": int(w),
            "imageHeight": int(h),
        }
        for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4)
    ]


def write_npy(samples: Sequence[Sample], path: str | os.PathLike, max_side: int | None = None) -> int:
    """Write ``samples`` as an (N, 2) object array: image (HxWx3 uint8), list of box dicts."""
    arr = np.empty((len(samples), 2), dtype=object)
    for i, s in enumerate(samples):
        if max_side:
            image, boxes = downscale_sample(s, max_side)
        else:
            image, boxes = s.load_image(), s.boxes
        arr[i, 0] = image
        arr[i, 1] = sample_to_record(image, boxes)
    np.save(path, arr, allow_pickle=True)
    return len(samples)


def write_wider_annotations(entries: Iterable[tuple[str, np.ndarray]], path: str | os.PathLike) -> int:
    """Write ``(relative image path, boxes x1y1x2y2)`` pairs as a WIDER ``bbx_gt`` file.

    Boxes become ``x y w h`` with the six attribute columns at 0 (valid, not occluded); an
    image without faces gets the official all-zero line. ``load_wider`` reads it back.
    """
    lines: list[str] = []
    for name, boxes in entries:
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        lines += [name, str(len(boxes))]
        lines += [f"{x1:.2f} {y1:.2f} {x2 - x1:.2f} {y2 - y1:.2f} 0 0 0 0 0 0" for x1, y1, x2, y2 in boxes]
        if not len(boxes):
            lines.append("0 0 0 0 0 0 0 0 0 0")
    Path(path).write_text("\n".join(lines) + "\n")
    return len(lines)
