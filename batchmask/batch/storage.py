"""Local folders and S3-compatible buckets behind one small interface (fsspec / s3fs).

A :class:`Storage` is a root (a local folder or ``s3://bucket/prefix``) plus a filesystem.
Paths handed to it are *relative* POSIX paths under the root; they are checked so that
nothing can be read or written outside it (``..``, absolute paths, empty segments).

Listing streams: :meth:`Storage.iter_files` yields relative paths one at a time, in
lexicographic (code point) order of the whole relative path, from one directory (local) or
one 1000-key page (S3) at a time, so a bucket of a million keys is never held in memory.

Writes are atomic: a local file is written under a temporary name in the same folder and
renamed; an S3 object is written with a single PUT, or (:meth:`Storage.open_write`, for files
written in pieces) one multipart upload that becomes visible only when it completes.

The S3 endpoint comes from ``endpoint_url`` or the environment (``AWS_ENDPOINT_URL_S3``,
then ``AWS_ENDPOINT_URL``); credentials come from the standard AWS variables, profiles or
``storage_options`` and are never logged.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)


class StorageError(OSError):
    """A storage location cannot be used (bad URL, unreachable endpoint, missing bucket)."""


#: S3 client limits (botocore): seconds to connect, seconds a socket read may stall, attempts per
#: request; s3fs retries a timed-out request ``S3FS_RETRIES`` times in all. Together they bound a
#: call to a stalled endpoint to about 2 minutes instead of hanging. ``storage_options``
#: (``config_kwargs``) may override the botocore values.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 20
S3_MAX_ATTEMPTS = 2
S3FS_RETRIES = 3


class UnsafePathError(ValueError):
    """A relative path that would read or write outside the storage root."""


class EntryError(ValueError):
    """One listed entry that cannot be an image, whatever the storage's state: not a regular file
    (a FIFO, a device), over ``--max-bytes``, or a mask name longer than the output allows. The
    run records it as that image's error row and goes on."""


#: Longest object key S3 accepts (bytes, UTF-8).
S3_MAX_KEY = 1024


_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """True for ``scheme://...`` locations (s3://, gs://, file://, ...); job files use it too."""
    return _URL_RE.match(path) is not None


def is_remote(url: str) -> bool:
    """A URL other than ``file://``: read and written through fsspec, not the local filesystem."""
    return is_url(url) and not url.startswith("file://")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def check_rel(rel: str) -> str:
    """Return ``rel`` if it is a safe relative POSIX path, else raise :class:`UnsafePathError`."""
    # A drive letter ("c:/x.jpg") only means something on Windows; on POSIX and in S3 keys it
    # is an ordinary name.
    drive = os.name == "nt" and len(rel) > 1 and rel[1] == ":"
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or drive:
        raise UnsafePathError(f"refusing unsafe path {rel!r} (absolute or malformed)")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"refusing unsafe path {rel!r} (empty, '.' or '..' segment)")
    return rel


@dataclass
class StorageSpec:
    """Everything needed to open a :class:`Storage` anywhere (picklable, sent to Ray actors)."""

    url: str
    endpoint_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def __repr__(self) -> str:  # no credentials, no user:password@ in the endpoint
        return f"StorageSpec(url={strip_userinfo(self.url)!r}, endpoint_url={strip_userinfo(self.endpoint_url)!r})"

    def open(self) -> Storage:
        return Storage(self)

    def resolved(self) -> StorageSpec:
        """A copy with the endpoint and the driver's AWS environment credentials filled in.

        Ray workers (possibly on other machines) do not share the driver's environment, so the
        driver captures ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
        and the region here, unless ``storage_options`` already name credentials. They travel
        in the actors' constructor arguments, never in logs, run.json or Ray's runtime_env.
        """
        if not is_remote(self.url) or not self.url.startswith(("s3://", "s3a://")):
            return self
        opts = dict(self.storage_options or {})
        env = os.environ
        if not any(k in opts for k in ("key", "secret", "token", "profile", "anon")):
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
                opts["key"], opts["secret"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
                if env.get("AWS_SESSION_TOKEN"):
                    opts["token"] = env["AWS_SESSION_TOKEN"]
            elif env.get("AWS_PROFILE"):
                opts["profile"] = env["AWS_PROFILE"]
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            ck = dict(opts.get("client_kwargs") or {})
            ck.setdefault("region_name", region)
            opts["client_kwargs"] = ck
        return StorageSpec(self.url, resolve_endpoint(self.endpoint_url), opts)

    def public(self) -> dict[str, Any]:
        """What may be written to run.json / logs: no credentials."""
        return {"url": strip_userinfo(self.url), "endpoint_url": strip_userinfo(resolve_endpoint(self.endpoint_url))}


def redact_urls(text: str) -> str:
    """``text`` without any ``user:password@`` in the URLs it contains."""
    return re.sub(r"://[^/\s@]+@", "://", text)


def _redact(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + redact_urls(str(exc))


def strip_userinfo(url: str | None) -> str | None:
    """``url`` without a ``user:password@`` part (safe to log or record)."""
    if not url or "@" not in url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://<redacted>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def has_userinfo(url: str) -> bool:
    """True for a URL with a ``user:password@`` part (credentials, never to be stored or echoed)."""
    return is_url(url) and strip_userinfo(url) != url


class Storage:
    """A root folder or bucket prefix; all paths are relative to it."""

    #: Keys per S3 ListObjectsV2 page (S3's maximum is 1000).
    page_size = 1000

    def __init__(self, spec: StorageSpec):
        self.spec = spec
        url = spec.url
        self.remote = is_remote(url)
        if self.remote:
            import fsspec

            proto = url.split("://", 1)[0]
            opts = dict(spec.storage_options or {})
            if "@" in urlsplit(url).netloc:  # s3fs would take "KEY:SECRET@bucket" as the bucket name
                raise StorageError(f"{self._where()}: credentials in the URL are not supported; use "
                                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
            if proto in ("s3", "s3a"):
                cfg = dict(opts.get("config_kwargs") or {})
                cfg.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
                cfg.setdefault("read_timeout", S3_READ_TIMEOUT_S)
                cfg.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
                opts["config_kwargs"] = cfg
                endpoint = resolve_endpoint(spec.endpoint_url)
                if endpoint:
                    ck = dict(opts.get("client_kwargs") or {})
                    ck.setdefault("endpoint_url", endpoint)
                    opts["client_kwargs"] = ck
                url = "s3://" + url.split("://", 1)[1]
            try:
                self.fs, root = fsspec.core.url_to_fs(url, **opts)
            except Exception as exc:  # unknown protocol, missing s3fs, bad options
                raise StorageError(f"{self._where()}: cannot open storage ({_redact(exc)})") from exc
            if hasattr(self.fs, "retries"):
                self.fs.retries = S3FS_RETRIES
            self.root = root.rstrip("/")
            if not self.root:
                raise StorageError(f"{spec.url}: no bucket in URL")
        else:
            self.fs = None
            path = url[len("file://") :] if url.startswith("file://") else url
            self.root = os.path.abspath(os.path.expanduser(path))
        self._exclude: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders never listed

    def _where(self) -> str:
        return strip_userinfo(self.spec.url) or ""

    # ------------------------------------------------------------------ paths
    def full(self, rel: str) -> str:
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
            yield from self._iter_s3(prefix)
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
        if "/" not in self.root:
            return
        try:
            is_file = self.fs.isfile(self.root)
        except Exception:  # unreachable storage or no permission: the listing will say so
            return
        if is_file:
            raise StorageError(f"{self._where()}: is an object, not a prefix; --input must be a folder or prefix")

    def _iter_s3(self, prefix: str) -> Iterator[str]:
        bucket, _, key_root = self.root.partition("/")
        key_prefix = (key_root + "/" if key_root else "") + prefix
        token = None
        n0 = len(key_root) + 1 if key_root else 0
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self.fs.call_s3("list_objects_v2", **kwargs)
            except FileNotFoundError as exc:
                raise StorageError(f"{self._where()}: bucket not found") from exc
            except PermissionError as exc:
                raise StorageError(f"{self._where()}: access denied listing the bucket") from exc
            except Exception as exc:  # endpoint unreachable, bad profile (botocore), ...
                raise StorageError(f"{self._where()}: cannot list ({_redact(exc)})") from exc
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/"):
                    yield key[n0:]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    # ------------------------------------------------------------ read/write
    @contextlib.contextmanager
    def _remote_errors(self, what: str, rel: str) -> Iterator[None]:
        """botocore/aiohttp errors (not OSErrors: endpoint unreachable, timeouts) as StorageError."""
        try:
            yield
        except (OSError, UnsafePathError, EntryError):  # ours: the caller knows what they mean
            raise
        except Exception as exc:
            raise StorageError(f"{self._where().rstrip('/')}/{rel}: cannot {what} ({_redact(exc)})") from exc

    def read_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes. With ``max_bytes``: an :class:`EntryError`, before reading, for a file
        over that size or (locally) one that is not a regular file; a FIFO is never waited on."""
        if self.remote:
            with self._remote_errors("read", rel):
                if max_bytes is not None:  # the object's size first: a HEAD, never the body
                    _check_size(rel, int(self.fs.info(self.full(rel)).get("size") or 0), max_bytes)
                data = self.fs.cat_file(self.full(rel))
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
            if len(key.encode()) > S3_MAX_KEY:
                raise EntryError(f"{rel}: the object key would be {len(key.encode())} bytes, over S3's "
                                 f"{S3_MAX_KEY}")
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
        """Atomic write: temp file + rename locally, a single PUT on S3."""
        if self.remote:
            with self._remote_errors("write", rel):
                self.fs.pipe_file(self.full(rel), data)
            return
        path = self.full(rel)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        # Short and fixed-length: a name of up to 255 bytes still leaves room for it (NAME_MAX).
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex[:16]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

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
        on an exception, so readers see the old object or the new one, never part of it."""
        if self.remote:
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
                with self._remote_errors("delete", rel):
                    self.fs.rm_file(self.full(rel))
            else:
                os.unlink(self.full(rel))

    def ensure_root(self) -> None:
        """Create the local output folder; on S3 check that the bucket is reachable."""
        if not self.remote:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"{self._where()}: cannot create ({exc.strerror or exc})") from exc
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except FileNotFoundError as exc:
            raise StorageError(f"{self._where()}: bucket {bucket!r} not found") from exc
        except PermissionError as exc:
            raise StorageError(f"{self._where()}: access denied") from exc
        except Exception as exc:  # endpoint unreachable, botocore ProfileNotFound, ...
            raise StorageError(f"{self._where()}: cannot reach storage ({_redact(exc)})") from exc


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
