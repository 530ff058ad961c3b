"""The output lock: one ``batchmask run`` at a time per ``--output``.

Two runs on one output would both do all the work, and merging part files into
``coverage.csv`` is a read-modify-write that loses rows when two processes do it at once. A
run therefore holds ``_lock.json`` in its output from before the first merge until run.json is
written; a second run waits (``--wait``) or is refused with :class:`OutputLocked` (exit 4),
naming the holder. ``jobs run`` goes through the same lock, so cron plus a manual run, or two
jobs sharing an output, are serialised too.

Local outputs: ``fcntl.flock`` on ``<output>/_lock.json`` (the kernel drops it when the holder
dies, so a crash never leaves a stale lock); the file holds the holder's host, pid and start
and is emptied, not deleted, on release (deleting a flock'ed file races with the next locker).

S3 outputs: an object ``_lock.json`` with the holder and an expiry ``S3_LOCK_TTL_S`` ahead,
renewed every third of that by a thread; an expired lock is taken over, so a crashed holder
blocks others for at most the TTL. S3 has no compare-and-swap, so a taker writes its token,
waits ``S3_LOCK_SETTLE_S`` and reads the object back: of two runs racing for a free lock only
the one whose write landed last sees its own token and proceeds (reads are strongly
consistent on AWS S3, SeaweedFS, MinIO). Hosts' clocks must agree to within a fraction of the TTL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..exits import EXIT_LOCKED
from .storage import Storage

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
S3_LOCK_TTL_S = float(os.environ.get("BATCHMASK_S3_LOCK_TTL", "180"))
S3_LOCK_SETTLE_S = 1.5
POLL_S = 1.0


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, where: str, holder: dict[str, Any] | None):
        self.where, self.holder = where, holder or {}
        h = self.holder
        who = f" by pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}" if h else ""
        super().__init__(f"{where} is in use{who} (lock {LOCK_FILE}); wait for that run, or pass --wait")


def _holder(token: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": token}


class OutputLock:
    """Acquire with :meth:`acquire`, give back with :meth:`release` (idempotent)."""

    def __init__(self, out: Storage):
        self.out = out
        self.token = uuid.uuid4().hex
        self.info = _holder(self.token)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _where(self) -> str:
        return self.out.spec.public()["url"] or self.out.root

    # ------------------------------------------------------------------ acquire
    def acquire(self, wait: bool = False, wait_timeout: float | None = None) -> OutputLock:
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        while True:
            holder = self._try_local() if not self.out.remote else self._try_s3()
            if holder is None:
                return self
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise OutputLocked(self._where(), holder)
            log.info("waiting for the lock of %s held by %s", self._where(), holder)
            time.sleep(POLL_S)

    def _try_local(self) -> dict[str, Any] | None:
        path = os.path.join(self.out.root, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                data = os.pread(fd, 4096, 0)
                holder = json.loads(data) if data.strip() else {}
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            return holder or {"pid": "?"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
        self._fd = fd
        return None

    def _read_s3(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.out.read_bytes(LOCK_FILE))
            return data if isinstance(data, dict) else None
        except FileNotFoundError:
            return None
        except ValueError:  # garbage: treat as free
            return None

    def _write_s3(self) -> None:
        rec = dict(self.info, expires=time.time() + S3_LOCK_TTL_S)
        self.out.write_bytes(LOCK_FILE, json.dumps(rec).encode())

    def _try_s3(self) -> dict[str, Any] | None:
        cur = self._read_s3()
        if cur and cur.get("token") != self.token and float(cur.get("expires", 0)) > time.time():
            return cur
        if cur:
            log.warning("taking over the expired lock of %s (held by %s)", self._where(), cur)
        self._write_s3()
        time.sleep(S3_LOCK_SETTLE_S)
        cur = self._read_s3()
        if not cur or cur.get("token") != self.token:
            return cur or {"pid": "?"}
        self._thread = threading.Thread(target=self._renew, name="batchmask-lock", daemon=True)
        self._thread.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(S3_LOCK_TTL_S / 3):
            try:
                cur = self._read_s3()
                if cur and cur.get("token") != self.token:
                    self.lost = True
                    log.error("lost the lock of %s to %s", self._where(), cur)
                    return
                self._write_s3()
            except Exception as exc:  # noqa: BLE001 - storage hiccup: try again next period
                log.warning("could not renew the lock of %s: %s", self._where(), exc)

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(Exception):
                cur = self._read_s3()
                if cur and cur.get("token") == self.token:
                    self.out.delete(LOCK_FILE)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
