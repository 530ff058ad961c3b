"""Which loader reads a ``--data`` path, and loading one or several sources.

Apart from :mod:`batchmask.data` (images.npy, WIDER, images) and :mod:`batchmask.labels` (COCO,
YOLO) because it picks between the two.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .data import DataError, DataSource, Sample, as_sources, fingerprint, load_npy, load_wider
from .labels import is_coco, is_yolo, load_coco, load_yolo


def data_format(path: str | os.PathLike) -> str:
    """Which loader reads ``path``: "npy", "coco" (a .json file), "yolo" (a folder with images/ and
    labels/) or "wider" (anything else: a WIDER folder or annotation file)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npy":
        return "npy"
    if is_coco(p):
        return "coco"
    return "yolo" if is_yolo(p) else "wider"


def load_dataset(path: str | os.PathLike, limit: int | None = None, labels=None) -> list[Sample]:
    """Load ``images.npy``, a COCO instances JSON, a YOLO folder or a WIDER FACE folder/annotation
    file, chosen by the path; ``labels`` (a :class:`~batchmask.labels.LabelOptions`) picks the
    faces' category (COCO) or class (YOLO)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    fmt = data_format(p)
    if fmt == "npy":
        return load_npy(p, limit=limit)
    if fmt == "coco":
        return load_coco(p, labels, limit=limit)
    if fmt == "yolo":
        return load_yolo(p, labels, limit=limit)
    return load_wider(p, limit=limit)


def load_datasets(paths: DataSource | Sequence[DataSource], limit: int | None = None, labels=None
                  ) -> tuple[list[Sample], list[dict]]:
    """Load and concatenate several sources (``images.npy`` files, WIDER folders, COCO JSON files,
    YOLO folders; ``labels``: see :func:`load_dataset`).

    Returns the samples and, per source, ``{"path", "images", "faces", "fingerprint"}`` for
    model.json. ``limit`` applies to each source. Sample names must be unique across
    sources, since validation splits are recorded by name.
    """
    samples: list[Sample] = []
    sources: list[dict] = []
    seen: dict[str, str] = {}
    for path in as_sources(paths):
        part = load_dataset(path, limit=limit, labels=labels)
        for s in part:
            if s.name in seen:
                raise DataError(f"{path}: image {s.name!r} is also in {seen[s.name]}; sources must not overlap")
            seen[s.name] = str(path)
        sources.append({"path": str(path), "format": data_format(path), "images": len(part), "faces": int(sum(len(s.boxes) for s in part)),
                        "fingerprint": fingerprint(part)})
        samples += part
    if not sources:
        raise DataError("no data sources given")
    return samples, sources
