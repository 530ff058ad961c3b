"""Whose fault is a worker's death: the image's or the machine's? Decode the image alone in a
child process and see how that process ends.

Ray reports every death of a worker process the same way (``ActorUnavailableError``: "Socket
closed"; or ``ActorDiedError``: "Worker unexpectedly exits with a connection error code 2 ...
(1) the OOM killer, (2) ray stop --force, (3) SIGSEGV"): it cannot tell a decoder that crashed
on an image from the kernel's OOM killer or a SIGKILL from outside. A child process's exit
status can: :func:`probe_image` reads and decodes the image exactly as a worker does, in
``python -m batchmask.batch.probe``, and calls it a crash only when the child died of a signal
that a process sends itself when its code fails (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT).
SIGKILL (the OOM killer, an outside kill), any other signal, a timeout, an exit code or a clean
decode are not the image's doing: the dispatcher leaves the image for the next run instead.

The request (storage spec, with any credentials, and the image's path) goes to the child on
stdin, never on its command line. The child makes itself the OOM killer's first choice and
writes no core file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .entries import ListSource
from .storage import StorageSpec, redact_urls

#: Signals a process gets from its own failing code: a death by one of these is a crash.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})
#: Seconds a probe may take (a decode is well under one; the child's start a few on a busy machine).
PROBE_TIMEOUT_S = 120.0


def verdict_of(returncode: int, stderr: str = "") -> dict:
    """``{"crashed": bool, "how": str}`` for a child's exit status (negative: killed by that signal)."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig in CRASH_SIGNALS:
            return {"crashed": True, "how": sig.name}
        return {"crashed": False, "how": f"killed by {sig.name}"}
    if returncode == 0:
        return {"crashed": False, "how": "decoded alone without a crash"}
    last = redact_urls((stderr.strip().splitlines() or [""])[-1])[:200]  # the child read the signed URL
    return {"crashed": False, "how": f"exit code {returncode}" + (f": {last}" if last else "")}


def probe_image(spec: StorageSpec | ListSource, rel: str, settings: dict, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Read and decode ``rel`` alone in a child process; a :func:`verdict_of` its end.

    ``settings``: ``max_bytes``, ``max_pixels``, ``image_size``, ``draft`` (as the worker has them).
    """
    request = json.dumps({"spec": asdict(spec), "list": isinstance(spec, ListSource), "rel": rel, **settings}).encode()
    try:
        p = subprocess.run([sys.executable, "-m", "batchmask.batch.probe"], input=request, capture_output=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"crashed": False, "how": f"no answer within {timeout:.0f} s"}
    return verdict_of(p.returncode, p.stderr.decode(errors="replace"))


def _child() -> None:
    """The probe itself: what a worker does to one image before predicting, nothing more."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError):  # under memory pressure this process goes first
        Path("/proc/self/oom_score_adj").write_text("1000")
    req = json.loads(sys.stdin.buffer.read())
    from .outputs import decode_for_model
    from .testhooks import hooks_from_env
    from .worker import IMAGE_ERRORS, set_pixel_limit

    rel = req["rel"]
    set_pixel_limit(req["max_pixels"])
    try:
        hooks_from_env().image(rel)
        data = (ListSource if req.get("list") else StorageSpec)(**req["spec"]).open().read_bytes(rel, req["max_bytes"])
        decode_for_model(data, req["image_size"], req["max_pixels"], rel, req["draft"])
    except IMAGE_ERRORS:  # a bad image, but one the worker survives: its death was not this
        pass
    os._exit(0)  # no interpreter teardown: only the decode's own fate counts


if __name__ == "__main__":
    _child()
