"""The storage's two errors, in a module of their own so that :mod:`.storage` and
:mod:`.localfs` both raise them without importing each other. Importable from :mod:`.storage`.
"""

from __future__ import annotations


class StorageError(OSError):
    """A storage location cannot be used (bad URL, unreachable endpoint, missing bucket)."""


class EntryError(ValueError):
    """One listed entry that cannot be an image, whatever the storage's state: not a regular file
    (a FIFO, a device), over ``--max-bytes``, or a mask name longer than the output allows. The
    run records it as that image's error row and goes on."""
