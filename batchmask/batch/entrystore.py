"""The store of one file's URL, for the entries of a list: :func:`open_entry_storage` opens (once
per bucket or web server, per process) the :class:`~.storage.Storage` an entry is read through.

Apart from :mod:`.storage` because it is a cache of storages by URL, not part of one storage;
:mod:`.storage` cannot import it back (this module builds on :class:`~.storage.StorageSpec`), so
it is imported from here.
"""

from __future__ import annotations

import json
import threading

from .storage import Storage, StorageSpec
from .urls import _FAMILY, is_remote, split_entry_url

_entry_stores: dict[tuple[str, ...], Storage] = {}
_entry_lock = threading.Lock()


def open_entry_storage(url: str, defaults: StorageSpec | None = None) -> tuple[Storage, str]:
    """The :class:`Storage` of one file's bucket (or web server) and the file's path in it.

    ``defaults`` carries the run's ``endpoint_url`` and ``storage_options``: they are given to
    entries of the scheme family of ``defaults.url`` (S3 when that is local or empty; the endpoint
    only ever to S3), other schemes get their standard environment. One :class:`Storage` (one
    filesystem, its connection pool) serves every entry of the same bucket or host, per process.
    Raises :class:`UnsafePathError` for a path that escapes its root, :class:`StorageError` when
    the store cannot be opened (a missing extra, bad options).
    """
    root, rel = split_entry_url(url)
    family = _FAMILY.get(root.split("://", 1)[0].lower(), root.split("://", 1)[0].lower())
    endpoint, opts = None, {}
    if defaults is not None:
        d_scheme = defaults.url.split("://", 1)[0].lower() if is_remote(defaults.url) else "s3"
        if _FAMILY.get(d_scheme, d_scheme) == family:
            opts = dict(defaults.storage_options or {})
            endpoint = defaults.endpoint_url if family == "s3" else None
    key = (family, root, endpoint or "", json.dumps(opts, sort_keys=True, default=repr))
    with _entry_lock:
        store = _entry_stores.get(key)
        if store is None:
            store = _entry_stores[key] = StorageSpec(root, endpoint, opts).resolved().open()
    return store, rel
