"""One entry of an ``--input-list``: where it is read from, and where its mask goes.

An entry is a local path (absolute, or relative to the folder holding the list) or a URL
(``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``). Its **key** is the entry as written,
without any ``user:password@`` (such entries are refused, never read or stored with them): the
``image`` column of coverage.csv and results.parquet, and what "already done" is decided on.

Its mask goes to ``masks/<namespace>/<escaped segments>.png`` (:func:`entry_mask`): the namespace
is the URL's scheme, ``local`` for absolute paths, ``relative`` for relative ones; the segments are
the bucket or host and the path, each escaped (:func:`_segment`) so that every key has its own mask
path (the mapping is injective) and none can leave ``masks/``; its overlay is
``overlays/<the same>.jpg`` (:func:`entry_overlay`). docs/design.md, "Input lists", says
why. Reading: :class:`ListSource` (sent to workers) and :class:`EntryReader` (one per worker, a
cache of one :class:`~batchmask.batch.storage.Storage` per scheme and bucket or host).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import string
from dataclasses import dataclass, field
from typing import Any

from .backends import BACKENDS, MissingExtra, backend_for
from .entrystore import open_entry_storage
from .recordformat import overlay_of
from .storage import (
    _FAMILY,
    EntryError,
    Storage,
    StorageError,
    StorageSpec,
    UnsafePathError,
    check_rel,
    has_userinfo,
    is_url,
    public_url,
    redact_urls,
    split_entry_url,
)

#: URL schemes an entry may use (exactly as written: lowercase): the stores with a backend, and file://.
SCHEMES = (*BACKENDS, "file")
#: Mask namespaces of local paths; no scheme above is named so.
LOCAL_NS, RELATIVE_NS = "local", "relative"
#: Characters kept as they are in a mask path's segment (besides printable non-ASCII); every other
#: one is written %XX (its UTF-8 bytes). "%" and "~" are always escaped: "~" marks our own suffixes.
_KEEP = frozenset(string.ascii_letters + string.digits + "-_.+=,@ ()")
#: A segment escaped longer than this (bytes) is folded to a prefix and a hash of the whole.
SEGMENT_MAX = 200
_FOLD_PREFIX = 100
#: What mask and overlay files end in: a folder never does (its last "g" is written %67).
_FILES = (".png", ".jpg")
_PLAIN = re.compile(r"[A-Za-z0-9\-_.+=,@ ()]*\Z")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _escaped_chars(seg: str) -> list[str]:
    out = [c if c in _KEEP or (not c.isascii() and c.isprintable()) else
           "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")) for c in seg]
    if out and out[0] == ".":  # ".", "..", ".tmp-..." (hidden, or skipped by the listing)
        out[0] = "%2E"
    return out


def _segment(seg: str, last: bool) -> str:
    """One path segment as a safe, reversible-enough file name: never empty, ".", "..", hidden,
    over the file system's name limit, or (a folder) ending in ".png" or ".jpg" like a mask or an
    overlay file."""
    if seg == "":
        return "~e"
    if _PLAIN.match(seg) and not seg.startswith(".") and len(seg) <= SEGMENT_MAX and (last or not seg.endswith(_FILES)):
        return seg  # the common case, without a Python loop over its characters
    chars = _escaped_chars(seg)
    out = "".join(chars)
    if len(out.encode()) > SEGMENT_MAX:
        keep, n = [], 0
        for c in chars:
            n += len(c.encode())
            if n > _FOLD_PREFIX:
                break
            keep.append(c)
        out = "".join(keep) + "~h" + _hash(seg)
    if not last and out.endswith(_FILES):  # a folder named like a mask or overlay file: "a.jpg.png/b.jpg"
        out = out[:-1] + "%67"
    return out


def _parts(key: str) -> tuple[str, list[str], str]:
    """(namespace, segments, the query and fragment of an http(s) URL) of a key."""
    if is_url(key):
        scheme, rest = key.split("://", 1)
        if scheme in ("http", "https"):
            cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
            host, tail = rest[:cut], rest[cut:]
            q = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=len(tail))
            path, query = tail[:q], tail[q:]
            return scheme, [host] + (path[1:].split("/") if path else []), query
        # object keys are taken literally ("?" and "#" included); a scheme that is refused (never
        # read, no mask) still gets a namespace of its own: "local://x" is not "/x"
        return scheme if scheme in SCHEMES else "~s" + _segment(scheme, False), rest.split("/"), ""
    if key.startswith("/"):
        return LOCAL_NS, key[1:].split("/"), ""
    return RELATIVE_NS, key.split("/"), ""


def entry_name(key: str) -> str:
    """The relative path (no extension added) under ``masks/`` or ``overlays/`` of a key."""
    ns, segs, query = _parts(key)
    names = [_segment(s, i == len(segs) - 1) for i, s in enumerate(segs)]
    if query:
        names[-1] += "~q" + _hash(query)
    return "/".join([ns, *names])


def entry_mask(key: str) -> str:
    """``masks/<entry_name>.png``: the file name keeps its extension (``a.jpg`` -> ``a.jpg.png``),
    so ``a.jpg`` and ``a.png`` never share a mask, whatever order the list gives them in."""
    return f"masks/{entry_name(key)}.png"


def entry_overlay(key: str) -> str:
    """``overlays/<entry_name>.jpg``: named after the entry's mask path (:func:`~batchmask.batch.recordformat.overlay_of`),
    which is a function of the key alone, so it holds with ``--no-masks`` too."""
    return overlay_of(entry_mask(key))


def entry_key(raw: str) -> str:
    """The image column's value for an entry: as written, without ``user:password@`` and without
    the secrets URLs carry (a presigned URL's ``X-Amz-Signature=``, a SAS ``sig=``: ``<redacted>``)."""
    return (public_url(raw) or raw) if is_url(raw) else raw


def list_base(list_url: str) -> str:
    """The folder relative entries resolve against: the list's own folder (or URL prefix)."""
    if is_url(list_url) and not list_url.startswith("file://"):
        return list_url.rsplit("/", 1)[0]
    path = list_url[len("file://"):] if list_url.startswith("file://") else list_url
    return os.path.dirname(os.path.abspath(path))


def locate(key: str, base: str) -> str:
    """Where ``key`` is read: a URL, or an absolute local path (normalised). :class:`UnsafePathError`
    for an entry that cannot be read as given (unknown scheme, credentials, a remote relative
    entry with ``..``, a NUL)."""
    if "\x00" in key:
        raise UnsafePathError(f"{key!r}: a NUL in the entry")
    if is_url(key):
        scheme, rest = key.split("://", 1)
        if scheme not in SCHEMES:
            raise UnsafePathError(f"{key}: unsupported scheme {scheme!r} (use one of {', '.join(SCHEMES)})")
        if has_userinfo(key):
            raise UnsafePathError(f"{key}: credentials in the URL are not supported; use the environment or a "
                                  "profile")
        if scheme != "file":
            return key
        key = rest
    if key.startswith("/"):
        return posixpath.normpath(key)
    if not is_url(base):
        return posixpath.normpath(posixpath.join(base, key))
    check_rel(key)  # "a/../../b" must not walk out of the list's bucket or prefix
    return f"{base}/{key}"


def split_location(loc: str) -> tuple[str, str]:
    """(storage root, relative path, checked) of a :func:`locate` result: "/" for local paths, the
    scheme and bucket (or host) for URLs (:func:`~batchmask.batch.storage.split_entry_url`)."""
    if is_url(loc):
        return split_entry_url(loc)
    return "/", check_rel(loc.lstrip("/"))


def entry_problem(raw: str, base: str) -> str | None:
    """Why an entry as read from the list cannot be an image (its error row), or None."""
    try:
        split_location(locate(raw, base))
    except UnsafePathError as exc:
        return redact_urls(str(exc))
    return None


def require_store(key: str, checked: set[str]) -> None:
    """RunError with the pip line when the library of a URL entry's store is not installed (once per
    scheme, in ``checked``): the run stops at the first such entry, before any worker meets it."""
    scheme = key.split("://", 1)[0] if is_url(key) else ""
    if scheme in checked:
        return
    checked.add(scheme)
    if scheme in BACKENDS:
        from .options import RunError

        try:
            backend_for(scheme).require(public_url(key), scheme)
        except MissingExtra as exc:
            raise RunError(str(exc)) from None


@dataclass
class ListSource:
    """What a worker needs to read a list run's entries (picklable; the driver fills in the
    credentials of its environment, as :meth:`StorageSpec.resolved` does for ``--input``)."""

    url: str
    base: str
    column: str | None = None
    #: the run's S3 endpoint (S3 entries only)
    endpoint_url: str | None = None
    #: per scheme family ("s3", "az", "gs"): the options its entries get, with the driver's
    #: environment credentials resolved (StorageSpec.resolved); may hold credentials
    options: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: False on a multi-node cluster without --shared-fs: a local entry fails the run (not an error row).
    local_entries: bool = True

    def open(self) -> EntryReader:
        return EntryReader(self)

    def public(self) -> dict[str, Any]:
        return {"list": public_url(self.url), "list_column": self.column, "base": public_url(self.base),
                "endpoint_url": public_url(self.endpoint_url)}


class EntryReader:
    """A worker's reader of list entries: :meth:`read_bytes` like a Storage's, by key. URL entries
    open through :func:`~batchmask.batch.entrystore.open_entry_storage` (one Storage per bucket or host
    in the process); local ones through one Storage rooted at "/"."""

    def __init__(self, source: ListSource):
        self.source = source
        self._local: Storage | None = None

    def storage_of(self, key: str) -> tuple[Storage, str]:
        """(the storage, the path in it) of ``key``; UnsafePathError as :func:`locate`."""
        loc = locate(key, self.source.base)
        root, rel = split_location(loc)
        if root != "/":
            family = _FAMILY.get(root.split("://", 1)[0], root.split("://", 1)[0])
            defaults = StorageSpec(f"{family}://-", self.source.endpoint_url if family == "s3" else None,
                                   self.source.options.get(family, {}))
            return open_entry_storage(loc, defaults)
        if not self.source.local_entries:
            raise StorageError(f"{key}: a local path that workers on other nodes cannot see; list URLs, or "
                               "use --shared-fs if every node mounts it at the same path")
        if self._local is None:  # one Storage object: threads that race here make equal ones
            self._local = StorageSpec("/").open()
        return self._local, rel

    def check_entry(self, key: str) -> str:
        self.storage_of(key)
        return key

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        st, rel = self.storage_of(key)
        try:
            return st.read_bytes(rel, max_bytes)
        except EntryError as exc:  # "<rel>: over --max-bytes": the error row names the entry instead
            text = str(exc)
            raise EntryError(key + text[len(rel):] if text.startswith(rel) else text) from exc

    def overlay_rel(self, key: str) -> str:
        """The overlay path of an entry done with ``--no-masks`` (no mask path to name it after)."""
        return entry_overlay(key)


def check_same_input_kind(out: Storage, listed: bool) -> None:
    """RunError if the output's last run (run.json) read a folder and this one a list, or the other
    way round: their mask paths are made differently (masks/<path> and masks/<scheme>/...), and one
    output holds one kind, so that no mask path can be another image's."""
    import json

    from .options import RunError

    try:
        prev = json.loads(out.read_bytes("run.json")).get("input") or {}
    except (FileNotFoundError, ValueError, AttributeError):
        return
    if not isinstance(prev, dict) or ("list" in prev) == listed or not ("list" in prev or "url" in prev):
        return
    was = f"the list {prev.get('list')}" if "list" in prev else f"the folder or prefix {prev.get('url')}"
    raise RunError(f"{out.spec.public()['url']} holds the results of {was}; an output holds the images of a "
                   f"{'list' if 'list' in prev else 'folder or prefix'} only: use another --output")
