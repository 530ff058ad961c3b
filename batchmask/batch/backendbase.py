"""What every object store backend is built on: :class:`Backend` (the generic part: what any
fsspec filesystem can do), :class:`WholeListing` (a filesystem without a paged listing, listed
whole), and the errors of opening and of conditional writes.

Apart from :mod:`.backends` (one class per store, and the scheme registry :data:`BACKENDS`) so
that module holds only the per-store code. All of it is importable from :mod:`.backends`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("batchmask.batch.backends")  # WholeListing's warning keeps its logger name


class MissingExtra(ImportError):
    """The filesystem library of a scheme is not installed."""


class PreconditionFailed(FileExistsError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class NoConditionalWrites(OSError):
    """This store cannot write under a condition (the lock then uses its settle protocol)."""


class Backend:
    """The generic part: what every fsspec filesystem can do."""

    #: Name in messages ("S3", "GCS", ...).
    name = "fsspec"
    #: ``pip install batchmask[extra]`` and the module it brings, when not a core dependency.
    extra: str | None = None
    package: str | None = None
    writable = True
    listable = True
    #: Longest object key in bytes (None: the filesystem's own limit, checked on write).
    max_key_bytes: int | None = 1024

    def require(self, url: str, scheme: str) -> None:
        """:class:`MissingExtra` with the pip line when the filesystem library is missing."""
        if self.package is None:
            return
        try:
            importlib.import_module(self.package)
        except ImportError as exc:
            raise MissingExtra(f"{url}: install batchmask[{self.extra}] ({self.package}) to read {scheme}:// "
                               "URLs") from exc

    def open_fs(self, url: str, options: dict[str, Any], endpoint_url: str | None) -> tuple[Any, str]:
        import fsspec

        return fsspec.core.url_to_fs(url, **options)

    # ---------------------------------------------------------------- listing
    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        """Keys (bucket-relative, possibly with folder markers ending in "/") under ``key_prefix``,
        one server page at a time."""
        raise NotImplementedError

    def ping(self, fs: Any, bucket: str) -> None:
        """Raise unless the bucket can be reached (the cheapest request that proves it)."""
        fs.ls(bucket)

    # --------------------------------------------------------------- objects
    def read(self, fs: Any, path: str, max_bytes: int | None) -> tuple[bytes, int | None]:
        """(bytes, size the server announced before reading, if it was asked)."""
        size = int(fs.info(path).get("size") or 0) if max_bytes is not None else None
        if size is not None and size > max_bytes:
            return b"", size
        return fs.cat_file(path), size

    def get_tagged(self, fs: Any, path: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and version tag in one request; (None, None) when there is none."""
        try:
            return fs.cat_file(path), None
        except FileNotFoundError:
            return None, None

    def put_tagged(self, fs: Any, path: str, body: bytes, if_none_match: bool = False,
                   if_match: str | None = None) -> str | None:
        """Write ``body``; with a condition, :class:`PreconditionFailed` when it does not hold. The
        new version tag (None where the store has none)."""
        if if_none_match or if_match:
            raise NoConditionalWrites(f"{self.name}: no conditional writes")
        fs.pipe_file(path, body)
        return None


class WholeListing(Backend):
    """A filesystem fsspec knows but this module has no paged listing for: listed whole (sorted)."""

    _warned: set[str] = set()

    def pages(self, fs: Any, bucket: str, key_prefix: str, page_size: int) -> Iterator[list[str]]:
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if proto not in self._warned:
            self._warned.add(proto)
            log.warning("%s:// has no paged listing here: listing it whole, in memory", proto)
        base = f"{bucket}/{key_prefix}"
        start = base if base.endswith("/") else base.rsplit("/", 1)[0] + "/"
        try:
            found = fs.find(start.rstrip("/"))
        except FileNotFoundError:
            found = []
        keys = sorted(p.split("/", 1)[1] if "/" in p else "" for p in found if p.startswith(base))
        yield keys
