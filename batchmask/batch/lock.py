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

S3 outputs (and GCS, Azure or any other writable object store, through the same code: each
backend in :mod:`.backends` reads and writes the object with its version tag, ETag or GCS
generation, under ``If-None-Match`` / ``If-Match`` or their equivalents): an object
``_lock.json`` with the holder and an expiry ``S3_LOCK_TTL_S`` ahead,
renewed every third of that by a thread; an expired lock is taken over, so a crashed holder
blocks others for at most the TTL. Where the server honours conditional writes (AWS S3, MinIO,
SeaweedFS >= 3.8x; probed once per acquire with a scratch object), the lock is created with
``If-None-Match: *`` and renewed or taken over with ``If-Match: <the ETag last seen>``: of two
writers only one can succeed, however slow the PUTs. Elsewhere (the probe finds the headers
ignored, or ``BATCHMASK_S3_CONDITIONAL=0``) the settle protocol: a taker writes its token, waits
``S3_LOCK_SETTLE_S`` and reads the object back; of two runs racing for a free lock only the one
whose write landed last sees its own token (a PUT slower than the settle time can still give two
holders there). Hosts' clocks must agree to within a fraction of the TTL.

Losing the lock: a holder paused (SIGSTOP, a frozen VM) or cut off from S3 for longer than the
TTL may find that another run took its output over. :meth:`OutputLock.check` says so
(:class:`LockLost`, exit 5): the renewal thread marks the loss, and the run checks before
handing out each shard and, synchronously (a renewal), before any merge or write of its own.
A local lock is lost when ``_lock.json`` is no longer the file it locked (the output folder or
the lock file was deleted or replaced).
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

from ..exits import EXIT_LOCK_LOST, EXIT_LOCKED
from .backends import PreconditionFailed
from .storage import Storage

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
S3_LOCK_TTL_S = float(os.environ.get("BATCHMASK_S3_LOCK_TTL", "180"))
S3_LOCK_SETTLE_S = 1.5
POLL_S = 1.0
#: "0": never use conditional writes (the settle protocol only), e.g. for a server whose probe lies.
CONDITIONAL_ENV = "BATCHMASK_S3_CONDITIONAL"


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, where: str, holder: dict[str, Any] | None):
        self.where, self.holder = where, holder or {}
        h = self.holder
        who = f" by pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}" if h else ""
        super().__init__(f"{where} is in use{who} (lock {LOCK_FILE}); wait for that run, or pass --wait")


class LockLost(RuntimeError):
    """This run held the output's lock and lost it: it must not write or merge anything more."""

    exit_code = EXIT_LOCK_LOST

    def __init__(self, where: str, why: str):
        self.where, self.why = where, why
        super().__init__(f"lost the lock of {where} ({why}); this run stopped without merging or writing run.json "
                         "(its finished masks are kept and merged by the next run)")


def _holder(token: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": token}


def _who(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "its lock object is gone"
    return f"taken over by pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {rec.get('since', '?')}"


def _s3_code(exc: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of an s3fs error, from the botocore error it was translated from."""
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            return (str(resp.get("Error", {}).get("Code", "")),
                    int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
    return "", 0


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, PreconditionFailed):
        return True
    code, status = _s3_code(exc)
    return code == "PreconditionFailed" or status == 412


class OutputLock:
    """Acquire with :meth:`acquire`, give back with :meth:`release` (idempotent)."""

    def __init__(self, out: Storage):
        self.out = out
        self.token = uuid.uuid4().hex
        self.info = _holder(self.token)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()  # one renewal at a time (thread and check()): each needs the last ETag
        self._etag: str | None = None
        self._conditional: bool | None = None  # None: not probed yet
        self._renewed = 0.0  # time.monotonic() of the last successful write of our record
        self._seq = 0
        self.lost = False
        self.lost_why = ""

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
            time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))

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

    # ------------------------------------------------------------------ S3 objects
    def _get_s3(self) -> tuple[dict[str, Any] | None, str | None]:
        """(record, version tag) of the lock object in one GET; (None, None) when there is none. A
        record that is not a JSON object counts as free (garbage), with its tag (to be replaced)."""
        with self.out._remote_errors("read", LOCK_FILE):
            data, etag = self.out.backend.get_tagged(self.out.fs, self.out.full(LOCK_FILE))
        if data is None:
            return None, None
        try:
            rec = json.loads(data)
        except ValueError:
            return None, etag
        return (rec if isinstance(rec, dict) else None), etag

    def _read_s3(self) -> dict[str, Any] | None:
        return self._get_s3()[0]

    def _record(self) -> bytes:
        self._seq += 1  # every write differs (its ETag too, which is the MD5 of the body on most servers)
        return json.dumps(dict(self.info, expires=time.time() + S3_LOCK_TTL_S, seq=self._seq)).encode()

    def _put(self, body: bytes, rel: str = LOCK_FILE, **cond: str) -> str | None:
        """One write of ``rel``; ``IfNoneMatch="*"`` / ``IfMatch=<tag>`` as in S3, whatever the store."""
        with self.out._remote_errors("write", rel):
            return self.out.backend.put_tagged(self.out.fs, self.out.full(rel), body,
                                               if_none_match=cond.get("IfNoneMatch") == "*",
                                               if_match=cond.get("IfMatch"))

    def _write_s3(self) -> None:
        """An unconditional write of our record (the settle protocol; tests)."""
        self._etag = self._put(self._record())
        self._renewed = time.monotonic()

    def _probe(self) -> bool:
        """Does the server honour If-None-Match and If-Match on PUT? Tried on a scratch object."""
        if os.environ.get(CONDITIONAL_ENV, "1") == "0":
            return False
        rel = f"{LOCK_FILE}.probe-{self.token}"
        try:
            self._put(b"probe", rel, IfNoneMatch="*")
            try:
                self._put(b"probe", rel, IfNoneMatch="*")
                return False  # the header was ignored
            except OSError as exc:
                if not _precondition_failed(exc) and not isinstance(exc, FileExistsError):
                    return False
            try:
                self._put(b"probe", rel, IfMatch='"00000000000000000000000000000000"')
                return False
            except OSError as exc:
                return _precondition_failed(exc)
        except OSError as exc:  # e.g. 501 Not Implemented for the header
            log.debug("conditional writes not usable on %s: %s", self._where(), exc)
            return False
        finally:
            self.out.delete(rel)

    def _try_s3(self) -> dict[str, Any] | None:
        if self._conditional is None:
            self._conditional = self._probe()
            log.info("%s lock of %s: %s", self.out.backend.name, self._where(),
                     "conditional writes" if self._conditional else f"settle protocol ({S3_LOCK_SETTLE_S:g} s)")
        cur, etag = self._get_s3()
        if cur and cur.get("token") != self.token and float(cur.get("expires", 0)) > time.time():
            return cur
        if cur:
            log.warning("taking over the expired lock of %s (held by %s)", self._where(), cur)
        holder = self._take_conditional(etag) if self._conditional else self._take_settle()
        if holder is not None:
            return holder
        self._thread = threading.Thread(target=self._renew, name="batchmask-lock", daemon=True)
        self._thread.start()
        return None

    def _take_conditional(self, etag: str | None) -> dict[str, Any] | None:
        try:
            self._etag = self._put(self._record(), **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))
        except OSError as exc:
            code, status = _s3_code(exc)
            if not (_precondition_failed(exc) or isinstance(exc, FileExistsError) or status == 409):
                raise
            return self._read_s3() or {"pid": "?"}  # another run wrote first
        self._renewed = time.monotonic()
        return None

    def _take_settle(self) -> dict[str, Any] | None:
        self._write_s3()
        time.sleep(S3_LOCK_SETTLE_S)
        cur = self._read_s3()
        if not cur or cur.get("token") != self.token:
            return cur or {"pid": "?"}
        return None

    # ------------------------------------------------------------------ holding
    def _mark_lost(self, why: str) -> None:
        if not self.lost:
            self.lost, self.lost_why = True, why
            log.info("lost the lock of %s: %s", self._where(), why)  # LockLost says it, once

    def _renew_once(self) -> None:
        """Write our record again (S3), if it is still ours; else mark the lock lost."""
        with self._mu:
            if self.lost:
                return
            if self._conditional:
                try:
                    self._etag = self._put(self._record(), IfMatch=self._etag or "*")
                except OSError as exc:
                    if not _precondition_failed(exc):
                        raise
                    self._mark_lost(_who(self._read_s3()))
                    return
            else:
                cur = self._read_s3()
                if not cur or cur.get("token") != self.token:
                    self._mark_lost(_who(cur))
                    return
                self._write_s3()
            self._renewed = time.monotonic()

    def _renew(self) -> None:
        while not self._stop.wait(S3_LOCK_TTL_S / 3):
            try:
                self._renew_once()
            except Exception as exc:  # noqa: BLE001 - storage hiccup: try again next period
                log.warning("could not renew the lock of %s: %s", self._where(), exc)
            if self.lost:
                return

    def _check_local(self) -> None:
        try:
            same = os.path.samestat(os.stat(os.path.join(self.out.root, LOCK_FILE)), os.fstat(self._fd))
        except OSError:
            same = False
        if not same:
            self._mark_lost(f"{LOCK_FILE} was deleted or replaced: the output folder was deleted or moved "
                            "during the run")

    def check(self, renew: bool = False) -> None:
        """Raise :class:`LockLost` if this lock has been lost. ``renew``: on S3, renew now (a
        synchronous, conditional where possible, proof that it is still ours) - before a merge or a
        write of the run's own; without it only a lease older than two thirds of the TTL is renewed
        here (the renewal thread may have been paused with the whole process)."""
        if self._fd is not None:
            self._check_local()
        elif self._thread is not None and not self.lost and (
                renew or time.monotonic() - self._renewed > S3_LOCK_TTL_S * 2 / 3):
            self._renew_once()
        if self.lost:
            raise LockLost(self._where(), self.lost_why)

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
            if self.lost:
                return  # the object is another run's now
            with contextlib.suppress(Exception):
                cur = self._read_s3()
                if cur and cur.get("token") == self.token:
                    self.out.delete(LOCK_FILE)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
