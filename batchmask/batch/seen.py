"""Which keys a run has already handed out: exact, in 16 bytes per key.

An input list may name an image twice; the second time must not be processed again in the same
run (the earlier images are skipped by the done set). A Python set of ten million strings would
take about a gigabyte; :class:`SeenKeys` keeps a 128-bit BLAKE2b digest of each key instead, in a
small set for the newest keys and sorted NumPy arrays for the rest (merged like a log-structured
merge tree: at most about log2(n / buffer) arrays, each looked up by binary search). Two different
keys share a digest with a probability of about n^2 / 2^129 (1e-25 for ten million): never.
"""

from __future__ import annotations

import numpy as np

from .records import key as digest  # the record index's 128-bit BLAKE2b of a name

#: Digests held in the Python set before they go to a sorted array.
BUFFER = 1 << 16


class SeenKeys:
    def __init__(self, buffer: int = BUFFER):
        self._buffer: set[int] = set()
        self._limit = buffer
        # (hi, lo): the digest's two 64-bit halves, sorted by hi (a key with an equal hi, 1 in 2^64,
        # is found by looking at the few lo of that run of equal hi); sizes decreasing
        self._levels: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._buffer) + sum(hi.size for hi, _ in self._levels)

    def add(self, key: str) -> bool:
        """Record ``key``; False if it was already recorded."""
        d = int.from_bytes(digest(key), "big")
        if d in self._buffer:
            return False
        h, lo = np.uint64(d >> 64), np.uint64(d & _LOW)
        for his, los in self._levels:
            i, j = np.searchsorted(his, h, "left"), np.searchsorted(his, h, "right")
            if i < j and (los[i:j] == lo).any():
                return False
        self._buffer.add(d)
        if len(self._buffer) >= self._limit:
            self._flush()
        return True

    def _flush(self) -> None:
        ds = list(self._buffer)
        self._buffer = set()
        self._levels.append(_sorted(np.array([d >> 64 for d in ds], np.uint64),
                                    np.array([d & _LOW for d in ds], np.uint64)))
        while len(self._levels) > 1 and self._levels[-2][0].size <= 2 * self._levels[-1][0].size:
            b, a = self._levels.pop(), self._levels.pop()
            hi, lo = np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])
            del a, b  # the merge peaks at 32 bytes a key: both halves, the order, one half reordered
            self._levels.append(_sorted(hi, lo))


_LOW = (1 << 64) - 1


def _sorted(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(hi)
    hi = hi[order]
    return hi, lo[order]
