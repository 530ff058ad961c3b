"""Reading an ``--input-list``: a ``.txt``, ``.csv`` or ``.parquet`` file of entries, streamed.

* ``.txt``: one entry per line (UTF-8); blank lines and lines starting with ``#`` are skipped.
* ``.csv``: a header row, then one row per image; the entries are column ``path`` (or
  ``--list-column``). Read row by row with the csv module.
* ``.parquet``: column ``path`` (or ``--list-column``) of strings, read one batch of rows at a time
  (``ParquetFile.iter_batches``): a list of ten million rows is never held whole.

Entries are stripped of surrounding whitespace; empty ones (and nulls) are skipped. The list may be
a local path or a URL; a remote one is read through fsspec (buffered range reads, never downloaded
whole). A list that cannot be read fails the run naming the file and the line or column.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator
from typing import IO
from urllib.parse import urlsplit

from .entries import ListSource, list_base
from .options import RunError
from .storage import _FAMILY, StorageSpec, is_remote, is_url, redact_urls, resolve_endpoint

FORMATS = (".txt", ".csv", ".parquet")
DEFAULT_COLUMN = "path"
#: Rows of a Parquet list read (and held) at a time.
PARQUET_BATCH = 65_536


class ListError(RunError):
    """The input list cannot be read (missing, unknown format, no such column, bad line)."""


class EntryList:
    """An input list: :meth:`check` it before anything is written, then iterate its entries."""

    def __init__(self, url: str, column: str | None = None, endpoint_url: str | None = None,
                 storage_options: dict | None = None):
        self.url, self.column = url, column
        self.spec_args = (endpoint_url, dict(storage_options or {}))
        self.where = redact_urls(url)  # a signed list URL's signature is never echoed
        self.format = _list_format(url)
        if self.format is None:
            raise ListError(f"{self.where}: unknown list format; name it .txt (one entry per line), .csv or .parquet")
        if column is not None and self.format == ".txt":
            raise ListError(f"{self.where}: --list-column applies to .csv and .parquet lists, not .txt")

    def source(self) -> ListSource:
        """What workers need to read the entries: per scheme family, the options its entries get
        (the run's ``storage_options`` go to the family of the list's own URL, S3 for a local
        list, as for an input), with the driver's environment credentials resolved."""
        endpoint, opts = self.spec_args
        mine = self.url.split("://", 1)[0].lower() if is_remote(self.url) else "s3"
        mine = _FAMILY.get(mine, mine)
        options = {f: StorageSpec(f"{f}://-", endpoint if f == "s3" else None, opts if f == mine else {})
                   .resolved().storage_options for f in ("s3", "gs", "az")}
        return ListSource(self.url, list_base(self.url), self.column, resolve_endpoint(endpoint), options)

    @contextlib.contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        try:
            if is_remote(self.url):
                parent, _, name = self.url.rpartition("/")
                st = StorageSpec(parent, *self.spec_args).resolved().open()
                f = st.fs.open(st.full(name), "rb")
            else:
                path = self.url[len("file://"):] if self.url.startswith("file://") else self.url
                f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ListError(f"{self.where}: no such list file") from None
        except IsADirectoryError:
            raise ListError(f"{self.where}: is a folder; --input-list takes a .txt, .csv or .parquet file "
                            "(--input takes a folder)") from None
        except (OSError, ValueError) as exc:  # StorageError, permissions, a bad URL
            raise ListError(f"{self.where}: cannot open ({redact_urls(str(exc))})") from exc
        with f:
            yield f

    def check(self) -> None:
        """Open the list and read its header or schema (the column is there): the run's errors
        about its list come before anything is written."""
        for _ in self._entries(head_only=True):
            pass

    def __iter__(self) -> Iterator[str]:
        return self._entries()

    def _entries(self, head_only: bool = False) -> Iterator[str]:
        with self._open() as f:
            if self.format == ".txt":
                yield from () if head_only else _txt(f, self.where)
            elif self.format == ".csv":
                yield from _csv(f, self.where, self.column or DEFAULT_COLUMN, head_only)
            else:
                yield from _parquet(f, self.where, self.column or DEFAULT_COLUMN, head_only)


def _txt(f: IO[bytes], where: str) -> Iterator[str]:
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ListError(f"{where}: line {n}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        entry = line.removeprefix("\ufeff").strip() if n == 1 else line.strip()
        if entry and not entry.startswith("#"):
            yield entry


def _missing(where: str, column: str, present: list[str]) -> ListError:
    shown = ", ".join(repr(c) for c in present[:20]) + (", ..." if len(present) > 20 else "")
    return ListError(f"{where}: no column {column!r} (columns: {shown or 'none'}); "
                     "name the column with --list-column")


def _csv(f: IO[bytes], where: str, column: str, head_only: bool) -> Iterator[str]:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            raise ListError(f"{where}: empty; expected a header row with column {column!r}")
        names = [h.strip() for h in header]
        if column not in names:
            raise _missing(where, column, names)
        if head_only:
            return
        i = names.index(column)
        for row in reader:
            if i < len(row):
                entry = row[i].strip()
                if entry:
                    yield entry
            elif any(v.strip() for v in row):
                raise ListError(f"{where}: line {reader.line_num}: {len(row)} fields, no value for column "
                                f"{column!r} (field {i + 1})")
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ListError(f"{where}: line {reader.line_num + 1}: cannot read ({exc})") from None


def _parquet(f: IO[bytes], where: str, column: str, head_only: bool) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise ListError(f"{where}: not a Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise _missing(where, column, schema.names)
    typ = schema.field(column).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ListError(f"{where}: column {column!r} holds {typ}, not strings (paths or URLs)")
    if head_only:
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is not None and value.strip():
                    yield value.strip()
    except (pa.ArrowException, OSError) as exc:
        raise ListError(f"{where}: cannot read after row {row} ({exc})") from None


def list_location_problem(url: str) -> str | None:
    """Why ``url`` cannot be an input list before it is opened (job files check this), or None."""
    if not url.strip():
        return "must not be empty"
    if is_url(url) and url.rstrip("/") != url:
        return "names a folder; an input list is a .txt, .csv or .parquet file"
    if _list_format(url) is None:
        return "must end in .txt, .csv or .parquet"
    return None


def _list_format(url: str) -> str | None:
    """The list's format from its name: the URL's path, so a signed URL's query does not hide it."""
    path = urlsplit(url).path if is_url(url) else url
    low = path.lower().rsplit("/", 1)[-1]
    return next((f for f in FORMATS if low.endswith(f)), None)

