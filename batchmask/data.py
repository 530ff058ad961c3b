"""Data loading: the exercise's ``images.npy`` and WIDER FACE's native layout.

Both loaders return a list of :class:`Sample` (an image, or a path to one, plus its face
boxes in pixels). :func:`load_dataset` picks the loader from the path. Turning samples into
(image, mask) pairs at the model's input size happens in :mod:`batchmask.augment`.

Bad data raises :class:`DataError` naming the file and the line or index at fault. Image
decoding (and :class:`DataError`) live in :mod:`batchmask.decode`, boxes to masks and loss
weights in :mod:`batchmask.masks`; all of it stays importable from here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import (  # noqa: F401  (defined there, part of this module's interface)
    DataError,
    decode_image,
    pil_rgb_image,
    pil_to_rgb,
    read_image,
    to_rgb_uint8,
)
from .masks import SMALL_FACE_PX, boxes_to_mask, face_weights  # noqa: F401  (defined there, part of this module's interface)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Sample:
    """One annotated image.

    ``boxes`` is a float32 array of shape (k, 4): ``x1, y1, x2, y2`` in pixels of the image
    (x2/y2 exclusive). ``group`` is the WIDER event folder (used for grouped splits).
    """

    name: str
    boxes: np.ndarray
    image: np.ndarray | None = None
    path: str | None = None
    group: str = ""

    def load_image(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        if self.path is None:
            raise DataError(f"{self.name}: sample has neither pixels nor a path")
        return read_image(self.path)


# --------------------------------------------------------------------------------------
# images.npy (the exercise's format)
# --------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, dtypes and plain containers."""

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only numpy arrays and plain containers are allowed"
        )


def load_npy_array(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.npy`` file whose object array is unpickled with a restricted unpickler."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _fortran, dtype = read_header(f, max_header_size=1 << 20)
        except Exception as exc:
            raise DataError(f"{path}: not a .npy file ({exc})") from exc
        if not dtype.hasobject:
            count = int(np.prod(shape)) if shape else 1
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape)
        try:
            arr = _RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise DataError(f"{path}: unsafe or corrupt pickle: {exc}") from exc
        except Exception as exc:
            raise DataError(f"{path}: corrupt object array ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected an array, found {type(arr).__name__}")
    return arr


def _npy_boxes(anns, h: int, w: int, where: str) -> np.ndarray:
    if anns is None:
        return np.zeros((0, 4), np.float32)
    if isinstance(anns, dict):
        anns = [anns]
    if not isinstance(anns, (list, tuple, np.ndarray)):
        raise DataError(f"{where}: annotations must be a list of dicts, found {type(anns).__name__}")
    boxes = []
    for j, ann in enumerate(anns):
        at = f"{where} annotation {j}"
        if not isinstance(ann, dict):
            raise DataError(f"{at}: expected a dict, found {type(ann).__name__}")
        pts = ann.get("points")
        try:
            (p1, p2) = pts
            xs = [float(p1["x"]), float(p2["x"])]
            ys = [float(p1["y"]), float(p2["y"])]
        except Exception as exc:
            raise DataError(f"{at}: 'points' must be two {{'x','y'}} dicts, found {pts!r}") from exc
        if not all(np.isfinite(xs + ys)):
            raise DataError(f"{at}: non-finite coordinates {pts!r}")
        if min(xs + ys) < -0.01 or max(xs + ys) > 1.01:
            raise DataError(f"{at}: points must be normalised to 0..1, found {pts!r}")
        boxes.append([min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h])
    return clip_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), h, w, where)


def load_npy(path: str | os.PathLike, limit: int | None = None) -> list[Sample]:
    """Load the exercise's ``images.npy``: an (N, 2) object array of (image, annotations).

    ``limit`` keeps the first N entries (before any conversion).
    """
    arr = load_npy_array(path)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise DataError(f"{path}: expected a non-empty array of shape (N, 2), found {arr.shape}")
    samples = []
    converted = 0
    for i in range(arr.shape[0] if limit is None else min(limit, arr.shape[0])):
        where = f"{path}[{i}]"
        raw = arr[i, 0]
        if not isinstance(raw, np.ndarray):
            raise DataError(f"{where}: column 0 must be an image array, found {type(raw).__name__}")
        image = to_rgb_uint8(raw, where)
        converted += raw.ndim != 3 or raw.shape[2] != 3
        h, w = image.shape[:2]
        boxes = _npy_boxes(arr[i, 1], h, w, where)
        samples.append(Sample(name=f"{Path(path).name}[{i}]", boxes=boxes, image=image))
    if converted:
        log.info("%s: converted %d grayscale/RGBA images to RGB", path, converted)
    return samples


def clip_boxes(boxes: np.ndarray, h: int, w: int, where: str) -> np.ndarray:
    """Clip boxes to the image; a box with no area inside the image is an error."""
    out = boxes.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    bad = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    if bad.any():
        j = int(np.argmax(bad))
        raise DataError(f"{where}: box {j} {boxes[j].tolist()} lies outside the {w}x{h} image or is empty")
    return out


# --------------------------------------------------------------------------------------
# WIDER FACE
# --------------------------------------------------------------------------------------


def find_wider_annotations(root: Path) -> tuple[Path, Path]:
    """Locate ``(annotation_file, images_dir)`` for a WIDER folder in its usual layouts."""
    if root.is_file():
        ann = root
        split = "val" if "_val_" in ann.name else "train"
        for images in (ann.parent / "images", ann.parent.parent / f"WIDER_{split}" / "images"):
            if images.is_dir():
                return ann, images
        raise DataError(f"{ann}: no images/ folder next to it or in ../WIDER_{split}/images")
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{root}: not a WIDER FACE folder (no images/ subfolder)")
    split = "val" if "val" in root.name.lower() else "train"
    candidates = []
    for d in (root, root / "wider_face_split", root.parent, root.parent / "wider_face_split"):
        candidates += [d / f"wider_face_{split}_bbx_gt.txt"]
        candidates += sorted(d.glob("wider_face_*_bbx_gt.txt")) if d.is_dir() else []
    for ann in candidates:
        if ann.is_file():
            return ann, images
    raise DataError(
        f"{root}: no wider_face_{{train,val}}_bbx_gt.txt found in it, its parent or wider_face_split/"
    )


def parse_wider_annotations(ann_path: Path) -> list[tuple[str, np.ndarray, int]]:
    """Parse WIDER's bbx_gt file into (relative image path, boxes x1y1x2y2, line number).

    Faces flagged invalid and boxes with no area are skipped; an image entry with ``0``
    faces is followed by one all-zero line in the official files, which is consumed.
    """
    try:
        lines = ann_path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{ann_path}: cannot read ({exc.strerror or exc})") from exc
    out = []
    i = 0
    skipped = 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        lineno = i + 1
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{ann_path}:{lineno}: expected an image path, found {name!r}")
        try:
            n = int(lines[i + 1].strip())
        except (IndexError, ValueError) as exc:
            raise DataError(f"{ann_path}:{lineno + 1}: expected a face count after {name!r}") from exc
        if n < 0:
            raise DataError(f"{ann_path}:{lineno + 1}: negative face count {n}")
        rows = max(n, 1) if n == 0 and i + 2 < len(lines) and _is_zero_row(lines[i + 2]) else n
        boxes = []
        for k in range(rows):
            ln = i + 2 + k
            if ln >= len(lines):
                raise DataError(f"{ann_path}:{ln + 1}: file ends inside the entry for {name!r}")
            parts = lines[ln].split()
            try:
                vals = [float(v) for v in parts]
            except ValueError as exc:
                raise DataError(f"{ann_path}:{ln + 1}: non-numeric box line {lines[ln]!r}") from exc
            if len(vals) < 4:
                raise DataError(f"{ann_path}:{ln + 1}: box line needs at least x y w h, found {lines[ln]!r}")
            if n == 0:
                continue
            x, y, w, h = vals[:4]
            invalid = len(vals) >= 8 and vals[7] == 1
            if invalid or w <= 0 or h <= 0:
                skipped += 1
                continue
            boxes.append([x, y, x + w, y + h])
        out.append((name, np.asarray(boxes, np.float32).reshape(-1, 4), lineno))
        i += 2 + rows
    if not out:
        raise DataError(f"{ann_path}: no image entries found")
    if skipped:
        log.info("%s: skipped %d faces flagged invalid or with no area", ann_path, skipped)
    return out


def _is_zero_row(line: str) -> bool:
    parts = line.split()
    return len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts) and not any(int(p) for p in parts[:4])


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image as the loaders see it (EXIF rotation applied), from its header;
    errors name ``where`` (the label file and line or entry)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
    except FileNotFoundError as exc:
        raise DataError(f"{where}: image {path} does not exist") from exc
    except Exception as exc:
        raise DataError(f"{where}: cannot read image {path} ({exc})") from exc
    return w, h


def load_wider(root: str | os.PathLike, limit: int | None = None) -> list[Sample]:
    """Load a WIDER FACE folder (``images/<event>/*.jpg`` and ``wider_face_*_bbx_gt.txt``).

    Images are read lazily; their size is read from the file header to check the boxes.
    """
    ann_path, images = find_wider_annotations(Path(root))
    samples = []
    for rel, boxes, lineno in parse_wider_annotations(ann_path)[:limit]:
        p = images / rel
        w, h = image_size(p, f"{ann_path}:{lineno}")
        if len(boxes):
            boxes = clip_boxes(boxes, h, w, f"{ann_path}:{lineno} ({rel})")
        samples.append(Sample(name=rel, boxes=boxes, path=str(p), group=rel.split("/")[0]))
    return samples


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------


DataSource = str | os.PathLike


def is_samples(data) -> bool:
    """True for a sequence of :class:`Sample` (in-memory data) rather than paths."""
    return not isinstance(data, (str, os.PathLike)) and isinstance(next(iter(data), None), Sample)


def as_sources(data: DataSource | Sequence[DataSource]) -> list[DataSource]:
    """One path or several, as a list (a string is one path, not a sequence of letters)."""
    if isinstance(data, (str, os.PathLike)):
        return [data]
    return list(data)


def fingerprint(samples: Sequence[Sample]) -> str:
    """A sha256 over sample names and boxes: identifies the training data in ``model.json``."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.boxes, np.float32).tobytes())
        if s.image is not None:
            h.update(hashlib.sha256(s.image.tobytes()).digest())
    return h.hexdigest()


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int, by: str = "random"
) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of sample indices.

    ``by="random"`` shuffles images with ``seed``; ``by="event"`` holds out whole groups
    (WIDER event folders), chosen with ``seed``, until ``val_fraction`` is reached;
    ``by="stratified"`` holds out ``val_fraction`` of every group's images (at least one of
    each group with two or more), so validation covers every kind of scene.
    """
    n = len(samples)
    if n < 2:
        raise DataError(f"need at least 2 images to split into train and validation, have {n}")
    rng = np.random.default_rng(seed)
    if by == "event":
        groups = sorted({s.group for s in samples})
        if len(groups) < 2:
            raise DataError("split by event needs at least two event folders")
        order = [groups[i] for i in rng.permutation(len(groups))]
        val_groups: set[str] = set()
        for g in order:
            if sum(s.group in val_groups for s in samples) >= val_fraction * n:
                break
            val_groups.add(g)
        val = [i for i, s in enumerate(samples) if s.group in val_groups]
    elif by == "stratified":
        by_group: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_group.setdefault(s.group, []).append(i)
        val = []
        for g in sorted(by_group):
            idx = by_group[g]
            k = min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
            val += [idx[j] for j in rng.permutation(len(idx))[:k]]
        val.sort()
        if not val:
            raise DataError("stratified split: no group has two or more images to hold one out")
    elif by == "random":
        k = min(max(1, round(val_fraction * n)), n - 1)
        val = sorted(rng.permutation(n)[:k].tolist())
    else:
        raise ValueError(f"unknown split {by!r} (use 'random', 'event' or 'stratified')")
    vs = set(val)
    return [i for i in range(n) if i not in vs], val
