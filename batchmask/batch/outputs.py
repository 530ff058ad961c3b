"""What ``batchmask run`` reads and writes under ``--output``, and per-image work.

Layout (README.md, "Files written", describes every file and column)::

    masks/<relative path, extension .png>   8-bit single-channel PNG, 255 = face, 0 = not
    overlays/<mask path in masks/, extension .jpg> previews (only with --overlays)
    coverage.csv                            one row per input image, sorted by image
    results.parquet                         the same rows, typed, plus mask_rle and boxes (batch/table.py)
    run.json                                the latest run: model, versions, counts, throughput
    _parts/<run id>-<shard>.csv             per-shard rows not yet merged into coverage.csv

A shard's part file is written (atomically) only after all its masks are written, so a row
in a part file or in ``coverage.csv`` always has its mask. The driver merges part files into
``results.parquet`` and ``coverage.csv`` (one atomic write each, streamed: :mod:`.merge`) at the
end of a run, when interrupted, and at the start of the next run; a later row for the same image
replaces an earlier one. What is done, and the recorded mask paths, are read back row by row into
a compact :class:`~batchmask.batch.records.RecordIndex`.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..inference.pixels import (  # noqa: F401  (the pixel path; re-exported for older imports)
    MIN_FACE_NET_PIXELS,
    MIN_FACE_PIXELS,
    decode_for_model,
    encode_overlay,
    encode_png,
    mask_stats,
)
from .recordformat import (  # noqa: F401  (COLUMNS, UNREADABLE, csv_to_rows, overlay_of: part of this module's interface)
    COLUMNS,
    COVERAGE,
    LEGACY_STORAGE_ERROR,
    MASKS,
    PARTS,
    UNREADABLE,
    DamagedCsv,
    csv_to_rows,
    folder_mask,
    list_parts,
    overlay_of,
)
from .recordformat import clash_dirs as _clash_dirs
from .records import RecordIndex, Unsorted
from .storage import Storage
from .tablerow import TABLE_FIELDS

log = logging.getLogger(__name__)

RUN_JSON = "run.json"


def mask_rel(rel: str) -> str:
    return folder_mask(rel)


class MaskNames:
    """Mask paths for images in listing order, resolving collisions (``a.jpg`` and ``a.png``).

    ``recorded`` gives the mask paths already in ``coverage.csv`` (a dict of image to mask path,
    or the output's :class:`~batchmask.batch.records.RecordIndex`): such an image keeps
    its mask path, and no other image is given one of them (``a.png`` done as ``masks/a.png``,
    then ``a.jpg`` arrives: it gets ``masks/a.jpg.png``).

    Otherwise the first image takes ``masks/a.png``; a later one whose mask would collide takes
    ``masks/<its full name>.png`` (``masks/a.png.png``), then ``...-1.png`` and so on. A folder
    that would clash with another image's mask file (``q.png/r.jpg`` beside ``q.png``), or with its
    overlay file (``a.jpg/b.jpg`` beside ``a.png``: ``overlays/a.jpg``), takes ``.d``
    (``masks/q.png.d/r.png``): :func:`~batchmask.batch.recordformat.clash_dirs`. Memory
    stays small because images that can collide share the prefix ``<stem>.``, and such keys
    are contiguous in a sorted listing and in a folder-by-folder walk (SeaweedFS): a name is
    forgotten once the listing has moved past its prefix.
    """

    def __init__(self, recorded: dict[str, str] | RecordIndex | None = None) -> None:
        self._recorded = recorded if isinstance(recorded, RecordIndex) else _RecordedDict(recorded or {})
        self._reserves, self._rules_out = self._recorded.reserves, self._recorded.rules_out
        # mask path given out -> group prefix that may still collide; and the same for the mask
        # paths that the folders of those given out rule out (clash_dirs)
        self._taken: dict[str, str] = {}
        self._ruled_out: dict[str, str] = {}

    def assign(self, rel: str) -> str:
        old = self._recorded.get(rel)
        if old:
            return old
        if len(self._taken) + len(self._ruled_out) > 8:
            self._taken = {m: g for m, g in self._taken.items() if rel.startswith(g)}
            self._ruled_out = {m: g for m, g in self._ruled_out.items() if rel.startswith(g)}
        group = posixpath.splitext(rel)[0] + "."
        cand = mask_rel(rel)
        k = 0
        while True:
            dirs = _clash_dirs(cand)
            clash = next((d for d, m in dirs if m in self._taken or self._reserves(m)), None)
            if clash:  # that folder of this mask would clash with another image's mask or overlay file
                cand = clash + ".d" + cand[len(clash):]
                continue
            if not (cand in self._taken or cand in self._ruled_out or self._reserves(cand) or self._rules_out(cand)):
                break
            cand = MASKS + (rel if k == 0 else f"{rel}-{k}") + ".png"
            k += 1
        if ".png.d/" in cand or ".jpg.d/" in cand:
            # masks/q.png.d/ is shared by the literal folder "q.png.d/" and the moved "q.png/", which
            # sort apart: remember its names until the listing has left "q.png" behind
            i = min(j for j in (cand.find(".png.d/"), cand.find(".jpg.d/")) if j >= 0)
            group = cand[len(MASKS):i + len(".png")]
        self._taken[cand] = group
        for _, m in dirs:  # a later "q.tif" must not take "masks/q.png", a folder here
            self._ruled_out.setdefault(m, m[len(MASKS):-len(".png")] + ".")
        return cand


class _RecordedDict:
    """A dict of recorded mask paths as :class:`MaskNames` asks it (a small output, tests)."""

    def __init__(self, recorded: dict[str, str]):
        self.get = recorded.get
        self._reserved = set(recorded.values())
        self._ruled_out = {m for mask in self._reserved for _, m in _clash_dirs(mask)}

    def reserves(self, path: str) -> bool:
        return path in self._reserved

    def rules_out(self, path: str) -> bool:
        return path in self._ruled_out


def recorded_masks(records: dict[str, dict]) -> dict[str, str]:
    """{image: mask path} of the rows that name a mask."""
    return {k: r["mask"] for k, r in records.items() if r.get("mask")}


# ----------------------------------------------------------------------------- per image


@dataclass
class Decoded:
    rel: str
    mask: str
    x: np.ndarray | None = None  # network input (S, S, 3) uint8
    data: bytes | None = None  # the file's bytes, kept only for the overlay (read once)
    width: int = 0
    height: int = 0
    error: str = ""


def ok_row(rel: str, mask: str, width: int, height: int, face_pixels: int, faces: int, mean_conf) -> dict:
    return {
        "image": rel,
        "width": width,
        "height": height,
        "face_pixels": face_pixels,
        "coverage": f"{face_pixels / (width * height):.6f}",
        "faces": faces,
        "mean_confidence": "" if mean_conf is None else f"{mean_conf:.4f}",
        "mask": mask,
        "status": "ok",
        "error": "",
    }


_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def stable_text(text: str) -> str:
    """``text`` without per-process object addresses (``<_io.BytesIO object at 0x7f...>`` -> ``<_io.BytesIO>``),
    which PIL and others put in messages: an error row must read the same on every run."""
    return _ADDRESS.sub(r"<\1>", text)


def error_row(rel: str, error: str, width: int = 0, height: int = 0) -> dict:
    return {
        "image": rel,
        "width": width or "",
        "height": height or "",
        "face_pixels": "",
        "coverage": "",
        "faces": "",
        "mean_confidence": "",
        "mask": "",
        "status": "error",
        "error": " ".join(stable_text(str(error)).split())[:500],
    }


# ----------------------------------------------------------------------------- CSV


def rows_to_csv(rows) -> bytes:
    """CSV with ``\n`` line ends; a row with a carriage return in a field is written fully quoted.

    The csv module quotes a field only for the delimiter, the quote character or a character of
    the line terminator, so a bare ``\r`` in an image name would be written unquoted and make the
    file unreadable; such rows (rare) are written with every field quoted, which any CSV reader
    reads back exactly. Other rows keep the minimal quoting.

    Columns other than :data:`COLUMNS` (a user's ``note`` added to coverage.csv) are kept, after
    ours, in the order first seen; rows without them leave them empty.
    """
    rows = list(rows)
    extra: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in COLUMNS and isinstance(k, str):
                extra.setdefault(k)
    fields = COLUMNS + list(extra)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="", extrasaction="ignore")
    w_all = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="", extrasaction="ignore",
                           quoting=csv.QUOTE_ALL)
    w.writeheader()
    for r in rows:
        (w_all if any("\r" in str(v) for v in r.values()) else w).writerow(r)
    return buf.getvalue().encode("utf-8")


def part_name(run_id: str, shard: int) -> str:
    return f"{PARTS}{run_id}-{shard:07d}.csv"


def load_records(out: Storage) -> tuple[dict[str, dict], list[str]]:
    """Rows from ``coverage.csv`` plus unmerged part files (later part files win), all in memory:
    for inspection and tests; a run reads an output through :class:`RecordIndex` and merges it
    with :func:`merge_parts`, which hold neither."""
    from .merge import read_parts, set_aside_coverage

    records: dict[str, dict] = {}
    if out.exists(COVERAGE):
        try:
            rows = csv_to_rows(out.read_bytes(COVERAGE), COVERAGE)
        except DamagedCsv as exc:  # kept beside and deleted, as a merge does
            set_aside_coverage(out, exc)
            rows = []
        for r in rows:
            records[r["image"]] = r
    fresh, readable = read_parts(out, list_parts(out))
    for img, r in fresh.items():
        old = records.get(img)
        if old:  # a column of the user's (not ours) stays with the image when its row is replaced
            r.update({k: v for k, v in old.items() if k not in COLUMNS and k not in TABLE_FIELDS and k not in r})
        records[img] = r
    return records, readable


def merge_parts(out: Storage) -> None:
    """Fold part files into ``results.parquet`` and ``coverage.csv`` (one atomic write each, streamed:
    :mod:`batchmask.batch.merge`), then delete them. Callers hold the output lock."""
    from .merge import merge_parts as merge

    merge(out)


def done_set(out: Storage, records: dict[str, dict], retry_errors: bool = False, masks: bool = True) -> set[str]:
    """Images that need no work: ``ok`` rows whose mask exists, and ``error`` rows unless retried.
    (The rule; a run asks :class:`RecordIndex`, which answers the same without a set of names.)

    ``masks=False`` (``--no-masks``): every ``ok`` row is done, and ``masks/`` is not listed. With
    masks, an ``ok`` row without one (written with ``--no-masks``) is done again, to get its mask.
    """
    wanted = masks and any(r["status"] == "ok" for r in records.values())
    written = set(out.iter_files(MASKS)) if wanted else set()
    done = set()
    for k, r in records.items():
        if r["status"] == "ok" and (not masks or r["mask"] in written) or (
            r["status"] == "error" and not retry_errors and not r.get("error", "").startswith(LEGACY_STORAGE_ERROR)
        ):
            done.add(k)
    return done


def read_records(out: Storage, retry_errors: bool = False, masks: bool = True,
                 default_mask: Callable[[str], str] = folder_mask) -> RecordIndex:
    """What the output records, as a :class:`RecordIndex`: ``rel in index`` is ``rel in
    done_set(...)`` and ``MaskNames(index)`` keeps the recorded mask paths, in 32 bytes per image.
    A damaged coverage.csv is kept beside and rebuilt empty (its images are processed again), as
    :func:`load_records` does; one that is not sorted by image (edited) is written sorted first."""
    from .merge import set_aside_coverage, sort_coverage

    try:
        try:
            return RecordIndex.read(out, retry_errors, masks, default_mask)
        except Unsorted:  # edited by hand: sorted once (in memory), then read as usual
            sort_coverage(out)
            return RecordIndex.read(out, retry_errors, masks, default_mask)
    except DamagedCsv as exc:
        set_aside_coverage(out, exc)
        merge_parts(out)
        return RecordIndex.empty()
