"""Folding part files into ``coverage.csv`` and ``results.parquet`` without holding the output.

The part files' rows (this run's, or an interrupted run's: few, next to what an output records)
are read into memory and sorted; the old ``coverage.csv`` (written sorted by image) is read row
by row and merge-joined with them, and each output is written in pieces, published atomically
(:meth:`~batchmask.batch.storage.Storage.open_write`): first ``results.parquet`` (row group by
row group, the previous table read batch by batch for the columns only it has), then
``coverage.csv``; the part files are deleted only after both. A coverage.csv that is not sorted
(edited by hand) is merged in memory, as before, and written sorted.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator

from .recordformat import (
    COLUMNS,
    COVERAGE,
    UNREADABLE,
    CsvRows,
    DamagedCsv,
    copy_file,
    csv_to_rows,
    free_name,
    list_parts,
)
from .records import Unsorted
from .storage import Storage
from .table import RESULTS, PreviousTable, new_table
from .tablerow import TABLE_FIELDS

log = logging.getLogger(__name__)

#: Rows per row group of results.parquet (and per batch converted to Arrow).
BATCH = 16_384


def merge_parts(out: Storage) -> None:
    """Fold part files into ``results.parquet`` and ``coverage.csv``, then delete them.

    Read-modify-write: callers hold the output lock (:mod:`batchmask.batch.lock`), so two merges
    never run at once on one output.
    """
    parts = list_parts(out)
    if not parts and out.exists(RESULTS) and _header_readable(out):
        return
    fresh, readable = read_parts(out, parts)
    try:
        try:
            _merge(out, fresh, lambda: _sorted_rows(out))
        except Unsorted:
            _merge_unsorted(out, fresh)
    except DamagedCsv as exc:  # also found after the order broke: the in-memory read finds it too
        set_aside_coverage(out, exc)
        _merge(out, fresh, lambda: iter(()))
    for p in readable:  # only now: if the merge stops before this, the next one redoes it
        out.delete(p)


def _merge_unsorted(out: Storage, fresh: dict[str, dict]) -> None:
    """The merge of a coverage.csv that is not in image order (edited by hand): in memory, as
    before, and written sorted, so that the next merges and record reads stream again."""
    log.warning("%s is not sorted by image (edited?): merged in memory and written sorted", COVERAGE)
    old = _rows_in_memory(out)
    _merge(out, fresh, lambda: iter(old))


def sort_coverage(out: Storage) -> None:
    """Write coverage.csv (and results.parquet) sorted by image; callers hold the output lock."""
    _merge_unsorted(out, {})


def _header_readable(out: Storage) -> bool:
    """coverage.csv exists and has our header (a file damaged further on is found by the reader of
    the records, :func:`batchmask.batch.outputs.read_records`, which every run calls next)."""
    if not out.exists(COVERAGE):
        return False
    try:
        CsvRows.open(out, COVERAGE).close()
    except DamagedCsv:
        return False
    return True


def read_parts(out: Storage, parts: list[str]) -> tuple[dict[str, dict], list[str]]:
    """{image: row} of the part files (later files and rows win), and the files that were readable;
    an unreadable one is kept as ``<name>.unreadable`` (its images are processed again)."""
    fresh: dict[str, dict] = {}
    readable = []
    for p in parts:  # run ids sort chronologically
        data = out.read_bytes(p)
        try:
            rows = csv_to_rows(data, p)
        except DamagedCsv as exc:
            # Never deleted: its masks exist and its rows may be recoverable by hand.
            log.warning("%s; kept as %s%s, its images will be processed again", exc, p, UNREADABLE)
            out.write_bytes(p + UNREADABLE, data)
            out.delete(p)
            continue
        readable.append(p)
        for r in rows:
            for k in TABLE_FIELDS:  # marks the row as fresh for results.parquet (older part files lack them)
                r.setdefault(k, "")
            old = fresh.get(r["image"])
            if old:
                r.update({k: v for k, v in old.items() if k not in COLUMNS and k not in TABLE_FIELDS and k not in r})
            fresh[r["image"]] = r
    return fresh, readable


def set_aside_coverage(out: Storage, exc: Exception) -> None:
    """Keep a damaged coverage.csv beside, never overwritten (rows may be recoverable by hand), and
    delete it: the merge writes a new one; its images are processed again."""
    keep = free_name(out, COVERAGE + UNREADABLE)
    log.warning("%s; kept as %s, rebuilt from this run on (its images are processed again)", exc, keep)
    copy_file(out, COVERAGE, keep)
    out.delete(COVERAGE)


def _sorted_rows(out: Storage) -> Iterator[dict]:
    """coverage.csv's rows as dicts, in order, one per image (the last of repeated ones);
    :class:`Unsorted` when they are out of order, :class:`DamagedCsv` when unreadable."""
    if not out.exists(COVERAGE):
        return
    with CsvRows.open(out, COVERAGE) as rows:
        prev = None
        for r in rows.dicts():
            if prev is not None:
                if r["image"] < prev["image"]:
                    raise Unsorted(COVERAGE)
                if r["image"] != prev["image"]:
                    yield prev
            prev = r
        if prev is not None:
            yield prev


def _rows_in_memory(out: Storage) -> list[dict]:
    with CsvRows.open(out, COVERAGE) as rows:
        records = {r["image"]: r for r in rows.dicts()}
    return [records[k] for k in sorted(records)]


def _merged(old: Iterator[dict], fresh: dict[str, dict]) -> Iterator[tuple[dict, bool]]:
    """(row, from a part file) in image order: ``old`` (sorted) merge-joined with ``fresh``; a
    column of the user's (not ours) stays with the image when its row is replaced."""
    new = sorted(fresh)
    j, n = 0, len(new)
    for r in old:
        img = r["image"]
        while j < n and new[j] < img:
            yield fresh[new[j]], True
            j += 1
        if j < n and new[j] == img:
            row = fresh[img]
            kept = {k: v for k, v in r.items() if k not in row and k not in COLUMNS and k not in TABLE_FIELDS}
            yield ({**row, **kept} if kept else row), True
            j += 1
        else:
            yield r, False
    for k in new[j:]:
        yield fresh[k], True


def _merge(out: Storage, fresh: dict[str, dict], old: Callable[[], Iterator[dict]]) -> None:
    """Write results.parquet and coverage.csv from one pass over ``old()`` and ``fresh`` (coverage.csv
    read once: at millions of rows each read is minutes). The table is published first, then the
    CSV; the part files are deleted only after both, so a merge stopped between them is redone."""
    fields = _coverage_fields(out, fresh)
    with out.open_write(COVERAGE) as f, PreviousTable(out) as previous, new_table(out) as table:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=False)
        w = csv.DictWriter(text, fieldnames=fields, lineterminator="\n", restval="", extrasaction="ignore")
        w_all = csv.DictWriter(text, fieldnames=fields, lineterminator="\n", restval="", extrasaction="ignore",
                               quoting=csv.QUOTE_ALL)  # a row with a carriage return, fully quoted
        w.writeheader()
        rows: list[dict] = []
        flags: list[bool] = []
        for r, is_fresh in _merged(old(), fresh):
            rows.append(r)
            flags.append(is_fresh)
            (w_all if any("\r" in str(v) for v in r.values()) else w).writerow(r)
            if len(rows) >= BATCH:
                table.write(rows, flags, previous)
                rows, flags = [], []
        table.write(rows, flags, previous)
        text.flush()
        text.detach()


def _coverage_fields(out: Storage, fresh: dict[str, dict]) -> list[str]:
    """coverage.csv's columns as :func:`~batchmask.batch.outputs.rows_to_csv` writes them: ours,
    then the user's in the order first seen (the old file's header, then the new rows')."""
    extra: dict[str, None] = {}
    if out.exists(COVERAGE):
        try:
            with CsvRows.open(out, COVERAGE) as rows:
                names = rows.fieldnames
        except DamagedCsv:
            names = []
        for k in names:
            if k not in COLUMNS and k not in TABLE_FIELDS:
                extra.setdefault(k)
    for r in fresh.values():
        for k in r:
            if k not in COLUMNS and k not in TABLE_FIELDS and isinstance(k, str):
                extra.setdefault(k)
    return COLUMNS + list(extra)
