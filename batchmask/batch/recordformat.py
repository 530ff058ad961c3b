"""The record's format: ``coverage.csv``'s columns and the output's folder names, the CSV of a
coverage or part file read in pieces (:class:`CsvRows`) or whole (:func:`csv_to_rows`), and the
small path rules every reader and writer of a record shares (a folder run's mask path, a mask's
overlay, the mask paths a folder rules out, a free name beside a damaged file).

Apart from :mod:`.records` (the :class:`~.records.RecordIndex` built from these rows) because the
merge, the outputs and the entries use the format without the index. All of it is importable
from :mod:`.records`.
"""

from __future__ import annotations

import csv
import io
import posixpath
import shutil
from collections.abc import Iterator

from .storage import Storage

# The record's format (outputs.py re-exports these; README.md, "Files written", describes them).
COLUMNS = ["image", "width", "height", "face_pixels", "coverage", "faces", "mean_confidence", "mask", "status", "error"]
COVERAGE = "coverage.csv"
PARTS = "_parts/"
#: Suffix given to a part file that cannot be parsed (kept for inspection, never merged).
UNREADABLE = ".unreadable"
MASKS = "masks/"
OVERLAYS = "overlays/"
#: Error rows that older versions wrote for disk-full/permission/connection failures while
#: writing a mask: not a property of the image, so they are always processed again.
LEGACY_STORAGE_ERROR = "cannot write outputs"


class DamagedCsv(ValueError):
    """A CSV file that cannot be parsed, or has no ``image`` and ``status`` columns."""


class CsvRows:
    """The rows of a coverage or part file, read in pieces: ``fieldnames`` (the header) and, when
    iterated, the lists of the rows that have an image and a known status (as
    :func:`csv_to_rows` keeps). :class:`DamagedCsv` (naming ``where``),
    from the constructor or while iterating, for a file that is not such a CSV at all."""

    def __init__(self, raw, where: str):
        self.where = where
        self._raw = raw
        self._text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        self._reader = csv.reader(self._text)
        try:
            self.fieldnames: list[str] = next(self._reader, [])
            header_ok = {"image", "status"} <= set(self.fieldnames)
            if not header_ok and (any(f.strip() for f in self.fieldnames) or self._text.read().strip()):
                raise DamagedCsv(f"{where}: no 'image' and 'status' columns in its header")
        except (UnicodeDecodeError, csv.Error) as exc:
            self.close()
            raise DamagedCsv(f"{where}: unreadable ({exc})") from None
        except DamagedCsv:
            self.close()
            raise
        self.empty = not header_ok
        # DictReader semantics: a name given twice in the header means its last column
        self.index = {name: i for i, name in enumerate(self.fieldnames)}

    @classmethod
    def open(cls, out: Storage, rel: str) -> CsvRows:
        return cls(out.open_read(rel), rel)

    def __iter__(self) -> Iterator[list[str]]:
        if self.empty:
            return
        ii, si = self.index["image"], self.index["status"]
        n = max(ii, si) + 1
        try:
            for row in self._reader:
                if len(row) >= n and row[ii] and row[si] in ("ok", "error"):
                    yield row
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DamagedCsv(f"{self.where}: unreadable ({exc})") from None

    def dicts(self) -> Iterator[dict]:
        """The rows as dicts of the header's names (a short row's missing fields: None, fields
        beyond the header: dropped), as :class:`csv.DictReader` gives them."""
        names = self.fieldnames
        for row in self:
            r = dict(zip(names, row, strict=False))
            if len(row) < len(names):
                for name in names[len(row):]:
                    r.setdefault(name, None)
            yield r

    def close(self) -> None:
        self._text.detach()
        self._raw.close()

    def __enter__(self) -> CsvRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def clash_dirs(mask: str) -> list[tuple[str, str]]:
    """(folder, the mask path it rules out) for each folder of a mask path that another image's mask
    file could clash with: a folder ``masks/q.png`` rules out the mask ``masks/q.png`` itself, and a
    folder ``masks/a.jpg`` the mask ``masks/a.png``, whose overlay ``overlays/a.jpg`` would be a file
    where this mask's overlay needs the folder ``overlays/a.jpg`` (:func:`overlay_of`)."""
    if ".png/" not in mask and ".jpg/" not in mask:  # the common case, without a loop
        return []
    parts = mask.split("/")
    out = []
    for k in range(2, len(parts)):
        d = "/".join(parts[:k])
        if d.endswith(".png"):
            out.append((d, d))
        elif d.endswith(".jpg"):
            out.append((d, d[:-len(".jpg")] + ".png"))
    return out


def csv_to_rows(data: bytes, where: str) -> list[dict]:
    """The rows of a coverage or part file (rows without an image or a known status are dropped);
    :class:`DamagedCsv` (naming ``where``) for a file that is not such a CSV at all."""
    try:
        text = data.decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DamagedCsv(f"{where}: unreadable ({exc})") from None
    if text.strip() and not {"image", "status"} <= set(header):
        raise DamagedCsv(f"{where}: no 'image' and 'status' columns in its header")
    out = []
    for r in rows:
        if r.get("image") and r.get("status") in ("ok", "error"):
            r.pop(None, None)  # fields beyond the header (a stray comma): not a column
            out.append(r)
    return out


def list_parts(out: Storage) -> list[str]:
    return [p for p in out.iter_files(PARTS) if p.endswith(".csv")]


def free_name(out: Storage, name: str) -> str:
    """``name``, or ``name-1``, ``name-2``... the first that does not exist yet."""
    k, cand = 0, name
    while out.exists(cand):
        k += 1
        cand = f"{name}-{k}"
    return cand


def copy_file(out: Storage, src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` in pieces (a damaged file kept beside may be large)."""
    with out.open_read(src) as f, out.open_write(dst) as g:
        shutil.copyfileobj(f, g, 1 << 20)


def folder_mask(rel: str) -> str:
    """A folder run's first-choice mask path for ``rel`` (:func:`batchmask.batch.outputs.mask_rel`)."""
    return MASKS + posixpath.splitext(rel)[0] + ".png"


def overlay_of(mask: str) -> str:
    """The overlay path of the image whose mask path is ``mask``: ``masks/X.png`` -> ``overlays/X.jpg``.

    Mask paths are one per image and never another image's (:class:`~batchmask.batch.outputs.MaskNames`,
    :func:`~batchmask.batch.entries.entry_mask`), and this mapping is one-to-one, so overlays are
    too: ``a.jpg`` and ``a.png`` get ``overlays/a.jpg`` and ``overlays/a.png.jpg``, as their masks.
    """
    return OVERLAYS + mask[len(MASKS):-len(".png")] + ".jpg"
