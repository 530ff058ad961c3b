"""What an output already records, read streaming and held compactly: the done set and the
recorded mask paths of ``coverage.csv``, for outputs of millions of images.

An output's record is ``coverage.csv`` (sorted by image, written by
:func:`batchmask.batch.outputs.merge_parts`) plus its ``masks/``. Each run reads it once, row by
row, into a :class:`RecordIndex`: every recorded image as 16 bytes in one sorted NumPy array (a
120-bit BLAKE2b hash of its name, then a flag byte: done; mask at its default path), and the
128-bit hashes of every recorded mask path (and of the paths its folders rule out: :func:`clash_dirs`) in another.
That is 32 bytes per image, where Python sets and dicts of the names took about 1.3 KB; mask
paths that differ from the default (``a.jpg`` -> ``masks/a.jpg.png`` beside ``a.png``) are kept
by name, as they are few. Both arrays are sorted in place: building the index needs about 50
bytes per image at its peak.

A false "done" from two names with one hash would skip an image: with 120-bit hashes the chance
for 10 million names is about 10^-22, far below a disk's undetected error rate.

docs/design.md ("Bookkeeping at millions of images") says why this and not a new on-disk store.
The record's format (columns, CSV reading, path rules) is in :mod:`.recordformat`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

import numpy as np

from .recordformat import (
    COVERAGE,
    LEGACY_STORAGE_ERROR,
    MASKS,
    CsvRows,
    clash_dirs,
    folder_mask,
)
from .storage import Storage

log = logging.getLogger(__name__)

#: Bytes of an image's or a mask path's hash.
HASH_BYTES = 16
_KEY = f"S{HASH_BYTES}"
_ZERO = bytes(HASH_BYTES)
#: Names hashed per NumPy lookup when many are looked up at once (the masks listing).
CHUNK = 65_536

# flags of a recorded image in the index
DONE = 1
DEFAULT_MASK = 2


def key(name: str) -> bytes:
    """The 128-bit hash of a mask path (``surrogatepass``: a name listed from undecodable bytes
    hashes too, and stays distinct)."""
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=HASH_BYTES).digest()


def image_key(name: str) -> bytes:
    """The 120-bit hash of an image name: an index entry is this and the image's flag byte."""
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=HASH_BYTES - 1).digest()


def keys_array(names: Iterable[str]) -> np.ndarray:
    return np.frombuffer(b"".join(key(n) for n in names), _KEY)


def _member(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``sorted_keys``, whether present) of each query."""
    if not len(sorted_keys):
        return np.zeros(len(queries), np.int64), np.zeros(len(queries), bool)
    i = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return i, sorted_keys[i] == queries


class RecordIndex:
    """The recorded images of an output: ``rel in index`` says whether ``rel`` needs no work
    (the rule of :func:`batchmask.batch.outputs.done_set`); :meth:`get` and :meth:`reserves`
    give :class:`~batchmask.batch.outputs.MaskNames` the recorded mask paths (and :meth:`rules_out`,
    the mask paths their folders rule out)."""

    def __init__(self, entries: np.ndarray, reserved: np.ndarray, odd_masks: dict[str, str],
                 default_mask: Callable[[str], str] = folder_mask, any_ruled_out: bool = False):
        self._entries, self._reserved, self._odd = entries, reserved, odd_masks
        self._any_ruled_out = any_ruled_out  # no recorded folder rules a path out: rules_out costs no lookup
        self._default_mask = default_mask
        self._last: tuple[str, int] = ("", 0)
        # A lookup per listed image: NumPy's searchsorted costs ~5 µs for one bytes key, so the
        # entries are bucketed by their first bits (hashes: uniform), 1 to 4 entries a bucket.
        self._bits = min(24, max(1, len(entries).bit_length() - 2))
        top = _flag_bytes(entries, 0).astype(np.uint32) << 16
        top |= _flag_bytes(entries, 1).astype(np.uint32) << 8
        top |= _flag_bytes(entries, 2)
        top >>= 24 - self._bits
        starts = np.zeros((1 << self._bits) + 1, np.uint32)
        np.cumsum(np.bincount(top, minlength=1 << self._bits), out=starts[1:])
        del top
        self._starts = memoryview(starts)
        self._raw = memoryview(entries.view(np.uint8))

    @classmethod
    def read(cls, out: Storage, retry_errors: bool = False, masks: bool = True,
             default_mask: Callable[[str], str] = folder_mask) -> RecordIndex:
        """Build the index from ``coverage.csv`` (streaming) and, when masks are wanted and some
        row is ``ok``, the listing of ``masks/`` (hashed in chunks, never held as names).
        :class:`DamagedCsv` for a coverage.csv that cannot be read."""
        if not out.exists(COVERAGE):
            return cls.empty()
        with CsvRows.open(out, COVERAGE) as rows:
            b = _Builder(retry_errors, default_mask)
            b.add(rows)
        return b.finish(out, masks)

    @classmethod
    def empty(cls) -> RecordIndex:
        none = np.zeros(0, _KEY)
        return cls(none, none, {})

    def _flag(self, rel: str) -> int:
        if self._last[0] == rel and rel:  # `rel in done` and names.assign(rel) ask in turn
            return self._last[1]
        h = image_key(rel)
        b = int.from_bytes(h[:3], "big") >> (24 - self._bits)
        block = self._raw[self._starts[b] * HASH_BYTES:self._starts[b + 1] * HASH_BYTES].tobytes()
        p = block.find(h)
        while p > 0 and p % HASH_BYTES:  # a match across two entries: not one
            p = block.find(h, p + 1)
        f = block[p + HASH_BYTES - 1] if p >= 0 else 0
        self._last = (rel, f)
        return f

    def __contains__(self, rel: object) -> bool:
        return isinstance(rel, str) and bool(self._flag(rel) & DONE)

    def __len__(self) -> int:
        """Images done."""
        return int(np.count_nonzero(_flag_bytes(self._entries) & DONE))

    def get(self, rel: str) -> str | None:
        """The mask path recorded for ``rel``, if any."""
        odd = self._odd.get(rel) if self._odd else None
        if odd:
            return odd
        return self._default_mask(rel) if self._flag(rel) & DEFAULT_MASK else None

    def reserves(self, path: str) -> bool:
        """Whether ``path`` is a recorded mask path."""
        return self._has(key(path))

    def rules_out(self, path: str) -> bool:
        """Whether a folder of a recorded mask path rules out a mask file at ``path`` (:func:`clash_dirs`)."""
        return self._any_ruled_out and self._has(key(path + "/"))

    def _has(self, h: bytes) -> bool:
        if not len(self._reserved):
            return False
        i = int(self._reserved.searchsorted(h))
        return i < len(self._reserved) and self._reserved[i] == h.rstrip(b"\0")

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes + self._reserved.nbytes


def _flag_bytes(entries: np.ndarray, at: int = HASH_BYTES - 1) -> np.ndarray:
    """Byte ``at`` of each index entry, by default the flag byte (a view: writing to it sets them)."""
    return entries.view(np.uint8).reshape(-1, HASH_BYTES)[:, at]


# per-row flags while building
_OK, _ERR_DONE, _DEFAULT, _HAS_MASK = 1, 2, 4, 8


class Unsorted(ValueError):
    """coverage.csv's rows are not in image order (edited by hand)."""


class _Builder:
    """Rows of coverage.csv (in image order) in, arrays out; of repeated rows for one image (next
    to each other, in a sorted file) the last wins, as in a dict. :class:`Unsorted` otherwise."""

    def __init__(self, retry_errors: bool, default_mask: Callable[[str], str] = folder_mask):
        # Rows whose mask is where the rule puts it cost a flag bit; only the others are kept by name
        # (a list run's rule is entries.entry_mask: with the folder rule every row would be kept).
        self.retry_errors, self.default_mask = retry_errors, default_mask
        self.entries, self.masks, self.dirs = bytearray(), bytearray(), bytearray()
        self.odd: dict[str, str] = {}

    def add(self, rows: CsvRows) -> None:
        if rows.empty:
            return
        ix = rows.index
        ii, si, mi, ei = ix["image"], ix["status"], ix.get("mask", -1), ix.get("error", -1)
        retry, odd = self.retry_errors, self.odd
        entries, masks, dirs = self.entries, self.masks, self.dirs
        default_mask = self.default_mask
        prev, prev_dirs = "", 0
        for row in rows:
            img, n = row[ii], len(row)
            if img <= prev:
                if img < prev:
                    raise Unsorted(COVERAGE)
                del entries[-HASH_BYTES:], masks[-HASH_BYTES:], dirs[len(dirs) - prev_dirs:]  # replaced
                odd.pop(img, None)
            prev, prev_dirs = img, 0
            if row[si] == "ok":
                f = _OK
            else:
                err = row[ei] if 0 <= ei < n else ""
                f = 0 if retry or err.startswith(LEGACY_STORAGE_ERROR) else _ERR_DONE
            m = row[mi] if 0 <= mi < n else ""
            if m:
                f |= _HAS_MASK
                masks += key(m)
                if m == default_mask(img):
                    f |= _DEFAULT
                else:
                    odd[img] = m
                if ".png/" in m or ".jpg/" in m:  # rare: no call per row otherwise
                    for _, ruled_out in clash_dirs(m):  # hashed with a "/": not a mask path of its own
                        dirs += key(ruled_out + "/")
                        prev_dirs += HASH_BYTES
            else:
                masks += _ZERO
            entries += image_key(img)
            entries.append(f)

    def finish(self, out: Storage, want_masks: bool) -> RecordIndex:
        entries = np.frombuffer(self.entries, _KEY)  # writable: bytearray's memory, no copy
        flags = _flag_bytes(entries)
        final, recorded = _final(np.frombuffer(self.masks, _KEY), flags.copy(), out, want_masks)
        self.masks = bytearray()
        flags[:] = final
        del final, flags
        entries.sort()  # in place; the flag byte is the last: one image's entry stays whole
        if self.dirs:
            recorded = _unique(np.concatenate([recorded, np.frombuffer(self.dirs, _KEY)]))
        return RecordIndex(entries, recorded, self.odd, self.default_mask, any_ruled_out=bool(self.dirs))


def _final(mask_keys: np.ndarray, flags: np.ndarray, out: Storage, want_masks: bool) -> tuple[np.ndarray, np.ndarray]:
    """(index flags per row, the sorted hashes of the recorded mask paths)."""
    has_mask = (flags & _HAS_MASK) != 0
    recorded = _unique(mask_keys[has_mask])
    ok = (flags & _OK) != 0
    done = ok if not want_masks else np.zeros(len(flags), bool)
    if want_masks and np.any(ok & has_mask):
        found = _listed(out, recorded)
        for lo in range(0, len(flags), 1 << 18):  # in slices: no second copy of every mask hash
            rows = np.flatnonzero(has_mask[lo:lo + (1 << 18)]) + lo
            done[rows] = found[np.searchsorted(recorded, mask_keys[rows])]
        done &= ok
    done |= (flags & _ERR_DONE) != 0
    default = np.where((flags & _DEFAULT) != 0, DEFAULT_MASK, 0).astype(np.uint8)
    return done.astype(np.uint8) * DONE | default, recorded


def _unique(a: np.ndarray) -> np.ndarray:
    """``a`` (a copy of ours) sorted in place, without repeats (np.unique would sort another copy)."""
    a.sort()
    if len(a) > 1:
        new = np.ones(len(a), bool)
        new[1:] = a[1:] != a[:-1]
        if not new.all():
            return a[new]
    return a


def _listed(out: Storage, recorded: np.ndarray) -> np.ndarray:
    """For each of the ``recorded`` mask hashes (sorted), whether ``masks/`` holds that file;
    the listing is hashed CHUNK names at a time."""
    found = np.zeros(len(recorded), bool)
    batch: list[str] = []

    def look() -> None:
        i, hit = _member(recorded, keys_array(batch))
        found[i[hit]] = True
        batch.clear()

    for p in out.iter_files(MASKS):
        batch.append(p)
        if len(batch) >= CHUNK:
            look()
    if batch:
        look()
    return found
