"""``results.parquet``: the run's results as one typed table, written beside ``coverage.csv``.

It holds the same images as ``coverage.csv`` and is written by the same merge
(:func:`batchmask.batch.outputs.merge_parts`) from the same part files, after them and before
they are deleted, so an interrupted merge is redone whole by the next run. The columns that only
the table has (``mask_rle``, ``boxes``) come from the part files' :data:`~.tablerow.TABLE_FIELDS`;
for an image not in this merge's part files they are carried over from the previous table.

README.md ("results.parquet") lists the columns; docs/design.md says why Parquet and COCO RLE.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import Storage
from .tablerow import parse_boxes

log = logging.getLogger(__name__)

RESULTS = "results.parquet"

BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("w", pa.int32()), ("h", pa.int32()),
                 ("score", pa.float32())])
SCHEMA = pa.schema([
    ("image", pa.string()),
    ("mask", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("face_pixels", pa.int64()),
    ("coverage", pa.float64()),
    ("faces", pa.int32()),
    ("mean_confidence", pa.float32()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("mask_rle", pa.string()),
    ("boxes", pa.list_(BOX)),
])
#: The columns that come from the part files only (not kept in coverage.csv).
CARRIED = ("mask_rle", "boxes")


def _int(v) -> int | None:
    return int(v) if v not in (None, "") else None


def _float(v) -> float | None:
    return float(v) if v not in (None, "") else None


def _coverage(r: dict) -> float | None:
    """Exact ``face_pixels / (width * height)`` where the row has them (the CSV rounds to 6 digits)."""
    fp, w, h = _int(r.get("face_pixels")), _int(r.get("width")), _int(r.get("height"))
    if fp is not None and w and h:
        return fp / (w * h)
    return _float(r.get("coverage"))


def rows_table(rows: list[dict]) -> pa.Table:
    """Records (coverage.csv/part-file rows, text values) as a table of :data:`SCHEMA`; the carried
    columns are null where a row has none (an older part file, an error row)."""
    cols = {
        "image": [r["image"] for r in rows],
        "mask": [r.get("mask") or "" for r in rows],
        "width": [_int(r.get("width")) for r in rows],
        "height": [_int(r.get("height")) for r in rows],
        "face_pixels": [_int(r.get("face_pixels")) for r in rows],
        "coverage": [_coverage(r) for r in rows],
        "faces": [_int(r.get("faces")) for r in rows],
        "mean_confidence": [_float(r.get("mean_confidence")) for r in rows],
        "status": [r.get("status") or "" for r in rows],
        "error": [r.get("error") or "" for r in rows],
        "mask_rle": [r.get("mask_rle") or None for r in rows],
        "boxes": [parse_boxes(r.get("boxes")) for r in rows],
    }
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def read_results(out: Storage) -> pa.Table | None:
    """The previous table's image and carried columns; None when there is none or it is unreadable
    (then kept beside as ``results.parquet.unreadable``: its images keep their CSV columns, and
    their mask_rle/boxes are null until they are processed again)."""
    if not out.exists(RESULTS):
        return None
    data = out.read_bytes(RESULTS)
    try:
        table = pq.read_table(io.BytesIO(data), columns=["image", *CARRIED])
        return table.cast(pa.schema([SCHEMA.field(n) for n in ("image", *CARRIED)]))
    except (pa.ArrowException, ValueError, KeyError) as exc:
        keep = RESULTS + ".unreadable"
        log.warning("%s: unreadable (%s); kept as %s, rebuilt from coverage.csv", RESULTS, exc, keep)
        out.write_bytes(keep, data)
        return None


def build_results(records: dict[str, dict], fresh: Iterable[str], previous: pa.Table | None) -> pa.Table:
    """The table of ``records`` (sorted by image, as coverage.csv). The carried columns of the
    images in ``fresh`` (rows from this merge's part files) come from their rows, the others'
    from ``previous`` (null for images it does not have: recorded before the table existed)."""
    fresh = set(fresh)
    keys = sorted(records)
    return carry_over(rows_table([records[k] for k in keys]), [k in fresh for k in keys], previous)


def carry_over(table: pa.Table, fresh: list[bool], previous: pa.Table | None) -> pa.Table:
    """``table`` with the carried columns of its rows that are not ``fresh`` taken from
    ``previous`` (matched by image; null where it has none)."""
    if previous is None or not previous.num_rows or not table.num_rows:
        return table
    idx = pc.index_in(table["image"], value_set=previous["image"])
    idx = pc.if_else(pa.array(fresh, pa.bool_()), pa.scalar(None, pa.int32()), idx)  # fresh rows keep their own
    for name in CARRIED:
        old = previous[name].take(idx)
        new = _choose(pc.is_null(idx), table[name], old)
        table = table.set_column(table.schema.get_field_index(name), SCHEMA.field(name), new)
    return table


def _choose(mask: pa.ChunkedArray, a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.Array:
    """``a`` where ``mask`` else ``b``, by index (works for list-of-struct columns too)."""
    n = len(mask)
    ia = pa.array(range(n), pa.int64())
    both = pa.concat_arrays([a.combine_chunks(), b.combine_chunks()])
    pick = pc.if_else(mask, ia, pc.add(ia, n))
    return both.take(pick)


class PreviousTable:
    """The previous ``results.parquet``'s image and carried columns, read batch by batch in image
    order (it is written sorted) for a merge that walks the images in order. Missing: no rows.
    Unreadable (at the start or part way): kept beside as ``results.parquet.unreadable``, as
    :func:`read_results` does; the images not matched by then get null carried columns."""

    def __init__(self, out: Storage):
        self.out = out
        self._file = None
        self._batches = None
        self._pend = pa.table({n: pa.array([], SCHEMA.field(n).type) for n in ("image", *CARRIED)})
        self._schema = pa.schema([SCHEMA.field(n) for n in ("image", *CARRIED)])

    def __enter__(self) -> PreviousTable:
        if self.out.exists(RESULTS):
            try:
                self._file = self.out.open_read(RESULTS)
                pf = pq.ParquetFile(self._file)
                self._batches = pf.iter_batches(batch_size=65_536, columns=["image", *CARRIED])
            except (pa.ArrowException, ValueError, KeyError, OSError) as exc:
                self._unreadable(exc)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def _unreadable(self, exc: Exception) -> None:
        from .recordformat import copy_file

        self._batches = None
        if self._file is not None:
            self._file.close()
            self._file = None
        keep = RESULTS + ".unreadable"
        log.warning("%s: unreadable (%s); kept as %s, rebuilt from coverage.csv", RESULTS, exc, keep)
        copy_file(self.out, RESULTS, keep)

    def upto(self, last: str) -> pa.Table:
        """The previous rows not handed out yet whose image sorts at or before ``last``."""
        while self._batches is not None and (not self._pend.num_rows or self._pend["image"][-1].as_py() <= last):
            try:
                b = next(self._batches, None)
                t = None if b is None else pa.Table.from_batches([b]).cast(self._schema)
            except (pa.ArrowException, ValueError, KeyError, OSError) as exc:
                self._unreadable(exc)
                break
            if t is None:
                self._batches = None
                break
            self._pend = pa.concat_tables([self._pend, t])
        cut = pc.sum(pc.less_equal(self._pend["image"], pa.scalar(last, pa.string()))).as_py() or 0
        head, self._pend = self._pend.slice(0, cut), self._pend.slice(cut)
        return head


class TableWriter:
    """Rows written to a new ``results.parquet``, one row group per :meth:`write` (see :func:`new_table`)."""

    def __init__(self, writer: pq.ParquetWriter):
        self.writer = writer

    def write(self, rows: list[dict], fresh: list[bool], previous: PreviousTable) -> None:
        if rows:
            self.writer.write_table(carry_over(rows_table(rows), fresh, previous.upto(rows[-1]["image"])))


@contextlib.contextmanager
def new_table(out: Storage) -> Iterator[TableWriter]:
    """A :class:`TableWriter` whose table is published (atomically) when the block ends without
    an exception, and discarded otherwise."""
    with out.open_write(RESULTS) as f:
        w = TableWriter(pq.ParquetWriter(f, SCHEMA, compression="zstd"))
        try:
            yield w
        except BaseException:
            with contextlib.suppress(Exception):  # its footer goes to a file that is thrown away
                w.writer.close()
            raise
        w.writer.close()


def write_results(out: Storage, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    out.write_bytes(RESULTS, buf.getvalue())
