"""Local folders and object stores (S3, GCS, Azure Blob, read-only HTTP) behind one small
interface (fsspec; one backend class per store in :mod:`.backends`).

A :class:`Storage` is a root (a local folder, ``s3://bucket/prefix``, ``gs://...``, ``az://container/...``,
``https://host``) plus a filesystem. Paths handed to it are *relative* POSIX paths under the
root; they are checked so that nothing can be read or written outside it (``..``, absolute paths,
empty segments; :mod:`.urls`).

Listing streams: :meth:`Storage.iter_files` yields relative paths one at a time, from one
directory (local, in code point order of the whole relative path) or one page of keys (S3, GCS,
Azure: the server's order, code point order on AWS, GCS and Azure) at a time, so a bucket of a
million keys is never held in memory. HTTP(S) URLs are never listed.

Writes are atomic: a local file is written under a temporary name in the same folder and
renamed; an object is written with a single PUT (upload), or (:meth:`Storage.open_write`, for
files written in pieces) one multipart, resumable or block upload that becomes visible only when
it completes.

Credentials come from each store's standard environment variables, profiles or
``storage_options`` and are never logged; the S3 endpoint from ``endpoint_url`` or
``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``; a GCS emulator from ``STORAGE_EMULATOR_HOST``.

The storage's errors are defined in :mod:`.storeerrors`, the local folder walk and checks in
:mod:`.localfs`, the capture of environment credentials in :mod:`.credentials`; all of them are
importable from here. :func:`~.entrystore.open_entry_storage`, the store of one file's URL (lists
of entries), is in :mod:`.entrystore`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .backends import (  # noqa: F401  (the S3 limits were defined here; kept importable)
    S3,
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_READ_TIMEOUT_S,
    S3FS_RETRIES,
    Backend,
    MissingExtra,
    backend_for,
)
from .credentials import _resolve_azure, _resolve_s3
from .localfs import (
    _check_regular,
    _check_size,
    _walk_sorted,
    matches,  # noqa: F401  (part of this module's interface)
)
from .storeerrors import EntryError, StorageError
from .urls import (  # noqa: F401  (part of this module's interface)
    _FAMILY,
    UnsafePathError,
    _redact,
    check_rel,
    check_url_rel,
    has_userinfo,
    is_remote,
    is_url,
    public_url,
    redact_urls,
    resolve_endpoint,
    split_entry_url,
    strip_userinfo,
)


@dataclass
class StorageSpec:
    """Everything needed to open a :class:`Storage` anywhere (picklable, sent to Ray actors)."""

    url: str
    endpoint_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def __repr__(self) -> str:  # no credentials, no user:password@ in the endpoint
        return f"StorageSpec(url={public_url(self.url)!r}, endpoint_url={public_url(self.endpoint_url)!r})"

    def open(self) -> Storage:
        return Storage(self)

    def resolved(self) -> StorageSpec:
        """A copy with the endpoint and the driver's environment credentials filled in.

        Ray workers (possibly on other machines) do not share the driver's environment, so the
        driver captures the store's standard variables here (S3: ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the region; Azure:
        ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
        ``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``; GCS: ``STORAGE_EMULATOR_HOST``),
        unless ``storage_options`` already name credentials. They travel in the actors'
        constructor arguments, never in logs, run.json or Ray's runtime_env. (GCS credentials
        come from each node's own Application Default Credentials.)
        """
        if not is_remote(self.url):
            return self
        scheme = self.url.split("://", 1)[0].lower()
        opts = dict(self.storage_options or {})
        if scheme in ("s3", "s3a"):
            _resolve_s3(opts)
            return StorageSpec(self.url, resolve_endpoint(self.endpoint_url), opts)
        if scheme in ("az", "abfs"):
            _resolve_azure(opts)
        elif scheme in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
            host = os.environ["STORAGE_EMULATOR_HOST"]
            opts.setdefault("endpoint_url", host if "://" in host else f"http://{host}")
        return StorageSpec(self.url, self.endpoint_url, opts)

    def public(self) -> dict[str, Any]:
        """What may be written to run.json / logs: no credentials."""
        return {"url": public_url(self.url), "endpoint_url": public_url(resolve_endpoint(self.endpoint_url))}


class Storage:
    """A root folder or bucket prefix; all paths are relative to it."""

    #: Keys per listing page (S3's and GCS's maximum is 1000, Azure's 5000).
    page_size = 1000

    def __init__(self, spec: StorageSpec):
        self.spec = spec
        url = spec.url
        self.remote = is_remote(url)
        self._exclude: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders never listed
        if not self.remote:
            self.fs, self.backend = None, None
            path = url[len("file://") :] if url.startswith("file://") else url
            self.root = os.path.abspath(os.path.expanduser(path))
            return
        scheme = url.split("://", 1)[0].lower()
        self.backend = backend_for(scheme)
        if "@" in urlsplit(url).netloc:  # s3fs would take "KEY:SECRET@bucket" as the bucket name
            raise StorageError(f"{self._where()}: credentials in the URL are not supported; use "
                               "the store's environment variables, a profile or storage_options")
        try:
            self.backend.require(self._where(), scheme)
            endpoint = resolve_endpoint(spec.endpoint_url) if isinstance(self.backend, S3) else None
            self.fs, root = self.backend.open_fs(url, dict(spec.storage_options or {}), endpoint)
        except MissingExtra as exc:
            raise StorageError(str(exc)) from None
        except Exception as exc:  # unknown protocol, bad options
            raise StorageError(f"{self._where()}: cannot open storage ({_redact(exc)})") from exc
        self.root = root.rstrip("/")
        if not self.root:
            raise StorageError(f"{self._where()}: no bucket in URL")

    def _where(self) -> str:
        return public_url(self.spec.url) or ""

    # ------------------------------------------------------------------ paths
    def full(self, rel: str) -> str:
        if self.remote and not self.backend.listable:
            check_url_rel(rel)
        else:
            check_rel(rel)
        return f"{self.root}/{rel}" if self.remote else os.path.join(self.root, *rel.split("/"))

    def relative_prefix_of(self, other: Storage) -> str | None:
        """If ``other``'s root lies inside this root (same filesystem), its relative prefix."""
        if self.remote != other.remote:
            return None
        a, b = self.root.rstrip("/") + "/", other.root.rstrip("/") + "/"
        if not self.remote:  # real paths: a symlinked input or output is still recognised
            a = os.path.realpath(self.root).rstrip(os.sep) + os.sep
            b = os.path.realpath(other.root).rstrip(os.sep) + os.sep
        if b.startswith(a) and b != a:
            return b[len(a) :].replace(os.sep, "/")
        return "" if a == b else None

    # ---------------------------------------------------------------- listing
    def iter_files(self, prefix: str = "") -> Iterator[str]:
        """Yield relative paths of all files under the root (or ``prefix``), sorted by code point."""
        if self.remote:
            yield from self._iter_remote(prefix)
        else:
            start = self.root if not prefix else os.path.join(self.root, *prefix.rstrip("/").split("/"))
            if os.path.isdir(start):
                base = prefix.rstrip("/") + "/" if prefix else ""
                if not prefix:
                    try:
                        os.scandir(start).close()
                    except OSError as exc:
                        raise StorageError(f"{self._where()}: cannot list ({exc.strerror or exc})") from exc
                yield from _walk_sorted(start, base, frozenset(), frozenset(self._exclude))
            elif not prefix:
                self.check_input()

    def exclude_dir(self, path: str) -> None:
        """Never list the folder ``path`` (local), wherever it appears: the output, when a symlink
        inside the input leads to it."""
        with contextlib.suppress(OSError):
            st = os.stat(path)
            self._exclude.add((st.st_dev, st.st_ino))

    def check_input(self) -> None:
        """Raise :class:`StorageError` unless the root can be an input: an existing folder (local),
        or a prefix that is not itself an object (S3)."""
        if not self.remote:
            if os.path.isfile(self.root):
                raise StorageError(f"{self._where()}: is a file; --input must be a folder")
            if not os.path.isdir(self.root):
                raise StorageError(f"{self._where()}: no such directory")
            return
        if not self.backend.listable:
            raise StorageError(f"{self._where()}: cannot list http(s) URLs; use --input-list")
        if "/" not in self.root:
            return
        try:
            is_file = self.fs.isfile(self.root)
        except Exception:  # unreachable storage or no permission: the listing will say so
            return
        if is_file:
            raise StorageError(f"{self._where()}: is an object, not a prefix; --input must be a folder or prefix")

    def _iter_remote(self, prefix: str) -> Iterator[str]:
        if not self.backend.listable:
            raise StorageError(f"{self._where()}: cannot list http(s) URLs; use --input-list")
        bucket, _, key_root = self.root.partition("/")
        key_prefix = (key_root + "/" if key_root else "") + prefix
        n0 = len(key_root) + 1 if key_root else 0
        pages = self.backend.pages(self.fs, bucket, key_prefix, self.page_size)
        while True:
            try:
                page = next(pages, None)
            except FileNotFoundError as exc:
                raise StorageError(f"{self._where()}: bucket not found") from exc
            except PermissionError as exc:
                raise StorageError(f"{self._where()}: access denied listing the bucket") from exc
            except Exception as exc:  # endpoint unreachable, bad profile (botocore), ...
                raise StorageError(f"{self._where()}: cannot list ({_redact(exc)})") from exc
            if page is None:
                return
            for key in page:
                if not key.endswith("/"):
                    yield key[n0:]

    # ------------------------------------------------------------ read/write
    @contextlib.contextmanager
    def _remote_errors(self, what: str, rel: str) -> Iterator[None]:
        """botocore/aiohttp errors (not OSErrors: endpoint unreachable, timeouts) as StorageError."""
        try:
            yield
        except (ConnectionError, TimeoutError) as exc:  # retries spent (HTTP), a stalled server
            raise StorageError(redact_urls(f"{self._where().rstrip('/')}/{rel}: cannot {what} ({_redact(exc)})")) from exc
        except (OSError, UnsafePathError, EntryError):  # ours: the caller knows what they mean
            raise
        except Exception as exc:
            raise StorageError(redact_urls(f"{self._where().rstrip('/')}/{rel}: cannot {what} ({_redact(exc)})")) from exc

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes. With ``max_bytes``: an :class:`EntryError`, before reading, for a file
        over that size or (locally) one that is not a regular file; a FIFO is never waited on."""
        if self.remote:
            with self._remote_errors("read", rel):
                # with max_bytes, the object's size first (a HEAD, or the GET's Content-Length)
                data, size = self.backend.read(self.fs, self.full(rel), max_bytes)
            if max_bytes is not None and size is not None:
                _check_size(rel, size, max_bytes)
        else:
            path = self.full(rel)
            if max_bytes is not None:  # a FIFO or a device is never opened (opening one has effects)
                _check_regular(rel, os.stat(path).st_mode)
            # O_NONBLOCK: should it have become a FIFO since, opening it returns at once instead of
            # blocking this thread (and a run's shutdown) forever; fstat checks the file opened.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                if max_bytes is not None:
                    _check_regular(rel, st.st_mode)
                    _check_size(rel, st.st_size, max_bytes)
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:  # it grew since its size was read
            _check_size(rel, len(data), max_bytes)
        return data

    def check_name(self, rel: str) -> None:
        """:class:`EntryError` if ``rel`` cannot be written here: a name longer than the file
        system's limit (locally, usually 255 bytes), or a key over S3's 1024 bytes."""
        if self.remote:
            key = f"{self.root.partition('/')[2]}/{rel}".lstrip("/")
            limit = self.backend.max_key_bytes
            if limit is not None and len(key.encode()) > limit:
                raise EntryError(f"{rel}: the object key would be {len(key.encode())} bytes, over "
                                 f"{self.backend.name}'s {limit}")
            return
        name_max = self._name_max()
        for part in rel.split("/"):
            n = len(os.fsencode(part))
            if n > name_max:
                raise EntryError(f"{rel}: a name in this path would be {n} bytes, over the file system's "
                                 f"limit of {name_max} ({os.strerror(errno.ENAMETOOLONG)})")

    def _name_max(self) -> int:
        if not hasattr(self, "_name_max_cached"):
            try:
                self._name_max_cached = int(os.pathconf(self.root, "PC_NAME_MAX"))
            except (OSError, ValueError):
                self._name_max_cached = 255
        return self._name_max_cached

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: temp file + rename locally, a single PUT (upload) to an object store."""
        if self.remote:
            self._check_writable()
            with self._remote_errors("write", rel):
                self.fs.pipe_file(self.full(rel), data)
            return
        with self.open_write(rel) as f:
            f.write(data)

    def _check_writable(self) -> None:
        if not self.backend.writable:
            raise StorageError(f"{self._where()}: http(s) URLs are read-only (inputs only)")

    def open_read(self, rel: str):
        """A binary file object to read ``rel`` in pieces (coverage.csv, results.parquet: never whole)."""
        if self.remote:
            with self._remote_errors("read", rel):
                return self.fs.open(self.full(rel), "rb")
        return open(self.full(rel), "rb")  # noqa: SIM115 - the caller closes it

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[Any]:
        """A binary file object written in pieces and published atomically when the block ends
        without an exception (as :meth:`write_bytes`): locally a temporary file renamed into place;
        remotely one object upload (S3: a multipart upload, visible only when completed), discarded
        on an exception (never completed), so readers see the old object or the new one, never
        part of it."""
        if self.remote:
            self._check_writable()
            with self._remote_errors("write", rel):
                f = self.fs.open(self.full(rel), "wb")
            try:
                yield f
            except BaseException:
                with contextlib.suppress(Exception):
                    f.discard()  # s3fs: aborts the multipart upload
                f.closed = True  # never committed by a later close() or __del__
                raise
            with self._remote_errors("write", rel):
                f.close()
            return
        path = self.full(rel)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        # Short and fixed-length: a name of up to 255 bytes still leaves room for it (NAME_MAX).
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex[:16]}")
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def exists(self, rel: str) -> bool:
        if self.remote:
            with self._remote_errors("check", rel):
                return self.fs.exists(self.full(rel))
        return os.path.exists(self.full(rel))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(OSError):
            if self.remote:
                self._check_writable()
                with self._remote_errors("delete", rel):
                    self.fs.rm_file(self.full(rel))
            else:
                os.unlink(self.full(rel))

    def ensure_root(self) -> None:
        """Create the local output folder; in an object store, check that the bucket is reachable."""
        if not self.remote:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{self._where()}: cannot create ({exc.strerror or exc})") from exc
            return
        self._check_writable()
        bucket = self.root.split("/", 1)[0]
        try:
            self.backend.ping(self.fs, bucket)
        except FileNotFoundError as exc:
            raise StorageError(f"{self._where()}: bucket {bucket!r} not found") from exc
        except PermissionError as exc:
            raise StorageError(f"{self._where()}: access denied") from exc
        except Exception as exc:  # endpoint unreachable, botocore ProfileNotFound, ...
            raise StorageError(f"{self._where()}: cannot reach storage ({_redact(exc)})") from exc
