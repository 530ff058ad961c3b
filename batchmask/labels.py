"""Face boxes in the label formats labelling tools export: COCO instances JSON and YOLO folders.

Both loaders return :class:`~batchmask.data.Sample` lists like the WIDER and ``images.npy``
loaders, so every source can be mixed in one training. Images are read lazily; only their
header is opened, for the size (after EXIF rotation, as the pixels are used) that boxes are
checked against. Malformed labels raise :class:`~batchmask.data.DataError` naming the file and
the line (YOLO) or the JSON entry (COCO).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .config import LabelOptions
from .data import IMAGE_EXTENSIONS, DataError, Sample, clip_boxes, image_size

log = logging.getLogger(__name__)

__all__ = ["LabelOptions", "load_coco", "load_yolo", "parse_yolo_labels"]


def _group(name: str) -> str:
    """The first folder of a relative image name: its scene for stratified or event splits."""
    parts = Path(name).parts
    return parts[0] if len(parts) > 1 else ""


# ----------------------------------------------------------------------------------- COCO
def is_coco(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _read_coco(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(doc.get(key, []), list):
            raise DataError(f"{path}: '{key}' must be a list")
    return doc


def _coco_category(path: Path, doc: dict, name: str) -> set:
    cats = doc.get("categories", [])
    ids = {c.get("id") for c in cats if isinstance(c, dict) and str(c.get("name", "")).lower() == name.lower()}
    if not ids:
        names = sorted({str(c.get("name")) for c in cats if isinstance(c, dict)})
        raise DataError(f"{path}: no category named {name!r} (categories: {', '.join(names) or 'none'}); "
                        "choose one with --category")
    return ids


def _coco_images_dir(path: Path, doc: dict, images: str | None) -> Path:
    if images:
        return Path(images)
    first = next((im.get("file_name") for im in doc["images"] if isinstance(im, dict)), None)
    for d in (path.parent, path.parent / "images", path.parent.parent / "images", path.parent.parent):
        if first is None or (d / str(first)).is_file():
            return d
    raise DataError(f"{path}: image {first!r} is neither beside the JSON nor in an images/ folder near it; "
                    "pass --images DIR")


def _coco_boxes(path: Path, doc: dict, cat_ids: set) -> tuple[dict, int]:
    """image id -> list of [x1, y1, x2, y2]; and the number of boxes skipped for having no area."""
    boxes: dict = {}
    skipped = 0
    for i, ann in enumerate(doc.get("annotations", [])):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{where}: an annotation needs an image_id")
        if ann.get("category_id") not in cat_ids:
            continue
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)):
            raise DataError(f"{where} (id {ann.get('id')}): bbox must be 4 numbers [x, y, w, h], found {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            skipped += 1
            continue
        boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    return boxes, skipped


def load_coco(path: str | Path, options: LabelOptions | None = None, limit: int | None = None) -> list[Sample]:
    """Face boxes of ``options.category`` from a COCO instances JSON; every listed image is a
    sample (one without such boxes is a negative)."""
    opts = options or LabelOptions()
    path = Path(path)
    doc = _read_coco(path)
    cat_ids = _coco_category(path, doc, opts.category)
    root = _coco_images_dir(path, doc, opts.images)
    boxes, skipped = _coco_boxes(path, doc, cat_ids)
    known = set()
    samples = []
    for i, im in enumerate(doc["images"][:limit]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{where}: an image needs an id and a file_name")
        known.add(im["id"])
        name = im["file_name"]
        w, h = image_size(root / name, where)
        b = np.asarray(boxes.get(im["id"], []), np.float32).reshape(-1, 4)
        if len(b):
            b = clip_boxes(b, h, w, f"{where} ({name})")
        samples.append(Sample(name=name, boxes=b, path=str(root / name), group=_group(name)))
    if limit is None and (orphans := set(boxes) - known):
        raise DataError(f"{path}: annotations refer to image ids not in 'images': {sorted(orphans, key=str)[:5]}")
    if skipped:
        log.info("%s: skipped %d boxes with no area", path, skipped)
    if not samples:
        raise DataError(f"{path}: no images listed")
    return samples


# ----------------------------------------------------------------------------------- YOLO
def is_yolo(path: Path) -> bool:
    return path.is_dir() and (path / "images").is_dir() and (path / "labels").is_dir()


def parse_yolo_labels(path: Path, class_id: int, w: int, h: int) -> np.ndarray:
    """The boxes of ``class_id`` in one YOLO label file, in pixels (x1, y1, x2, y2)."""
    boxes = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, vals = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError as exc:
            raise DataError(f"{path}:{n}: expected 'class cx cy w h' numbers, found {line.strip()!r}") from exc
        if len(vals) != 4:
            raise DataError(f"{path}:{n}: expected 'class cx cy w h' (5 values), found {len(parts)} values "
                            "(segmentation polygons are not read)")
        if not all(-1e-6 <= v <= 1 + 1e-6 for v in vals):
            raise DataError(f"{path}:{n}: coordinates must be normalised to 0..1, found {line.strip()!r}")
        if cls != class_id or vals[2] <= 0 or vals[3] <= 0:
            continue
        cx, cy, bw, bh = vals
        boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    out = np.asarray(boxes, np.float32).reshape(-1, 4)
    return clip_boxes(out, h, w, str(path)) if len(out) else out


def load_yolo(root: str | Path, options: LabelOptions | None = None, limit: int | None = None) -> list[Sample]:
    """A YOLO folder: ``images/**/x.jpg`` with ``labels/**/x.txt`` (the same relative path); an image
    without a label file has no faces, as in YOLO."""
    opts = options or LabelOptions()
    root = Path(root)
    images = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DataError(f"{root}: no images under images/")
    samples = []
    for p in images[:limit]:
        rel = p.relative_to(root / "images")
        w, h = image_size(p, str(root))
        label = (root / "labels" / rel).with_suffix(".txt")
        boxes = parse_yolo_labels(label, opts.class_id, w, h) if label.is_file() else np.zeros((0, 4), np.float32)
        name = rel.as_posix()
        samples.append(Sample(name=name, boxes=boxes, path=str(p), group=_group(name)))
    return samples
