"""The local-folder side of :class:`~batchmask.batch.storage.Storage`: the sorted, cycle-safe
walk of a folder tree (in the order S3 lists keys), the checks that keep a FIFO, a device or an
oversized file from being read, and the image-name filter :func:`matches`.

Apart from :mod:`.storage` because none of it needs a store: plain functions of paths, ``stat``
modes and names. All of it is importable from :mod:`.storage`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Iterator

from .storeerrors import EntryError, StorageError

log = logging.getLogger("batchmask.batch.storage")  # the walk's messages keep their logger name


def _check_size(rel: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise EntryError(f"{rel}: {size} bytes, over the limit of {max_bytes} (--max-bytes); not read")


def _check_regular(rel: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise EntryError(f"{rel}: not a regular file ({_file_kind(mode)}); not read")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def _walk_sorted(path: str, base: str, ancestors: frozenset, exclude: frozenset = frozenset()) -> Iterator[str]:
    """Depth-first walk in code point order of the full relative path.

    Sorting a folder's entries by ``name`` for files and ``name + "/"`` for folders yields the
    same order as sorting all relative paths at once (what S3 returns), one folder at a time.
    Symlinks are followed; a folder that is its own ancestor (a symlink cycle) is skipped. A
    folder that cannot be listed (permission, I/O error) raises :class:`StorageError`.
    """
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            log.warning("skipping %s: symlink cycle", path)
            return
        if key in exclude:
            log.info("skipping %s: it is the output folder", path)
            return
        ancestors = ancestors | {key}
        with os.scandir(path) as it:
            entries = []
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    continue
                entries.append((e.name + "/" if is_dir else e.name, is_dir))
    except FileNotFoundError:  # deleted since its parent was listed, like a file deleted since listed
        log.warning("skipping %s: it no longer exists", path)
        return
    except OSError as exc:  # unreadable storage fails the run: a listing with a hole is not complete
        raise StorageError(f"{path}: cannot list ({exc.strerror or exc})") from exc
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            yield from _walk_sorted(os.path.join(path, key[:-1]), base + key, ancestors, exclude)
        elif not key.startswith(".tmp-"):
            yield base + key


def matches(rel: str, extensions: tuple[str, ...], glob: str | None) -> bool:
    """Image extension test plus optional fnmatch pattern on the relative path or the file name,
    both case-insensitive: ``*.jpg`` also takes ``IMG_0001.JPG`` (cameras and phones write both)."""
    low = rel.lower()
    if not low.endswith(extensions):
        return False
    if glob is None:
        return True
    pat = glob.lower()
    return fnmatch.fnmatchcase(low, pat) or fnmatch.fnmatchcase(low.rsplit("/", 1)[-1], pat)
