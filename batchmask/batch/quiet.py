"""Keep Ray's own lines off the terminal during a run (cron mails whatever reaches stderr).

Ray's C++ core worker in the driver writes straight to file descriptor 2 (``core_worker.cc ... E
... constructor arguments in the object store``) and its Python logger prints start-up notices
("Token authentication is enabled ..."). Neither is batchmask's to show. :func:`ray_output_hidden`
points descriptor 2 at a temporary file for the duration, while ``sys.stderr`` and the logging
handlers that wrote to it get a copy of the real descriptor: batchmask's progress bar and log
lines still reach the terminal; Ray's do not. With ``-v`` nothing is hidden.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_output_hidden(active: bool = True) -> Iterator[None]:
    if not active:
        yield
        return
    import ray  # noqa: F401 - imported first: Ray's log handler keeps the stderr it finds (hidden below)

    orig = sys.stderr
    try:
        orig.flush()
        real_fd = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr (e.g. closed): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        term = os.fdopen(os.dup(real_fd), "w", buffering=1, encoding=getattr(orig, "encoding", None) or "utf-8",
                         errors="backslashreplace")
        handlers = [h for lg in (logging.getLogger(), logging.getLogger("batchmask")) for h in lg.handlers
                    if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is orig]
        for h in handlers:
            h.setStream(term)
        sys.stderr = term
        # Ray's logger writes to sys.stderr at emit time (and ray.init() removes its handlers, leaving
        # Python's last-resort handler): silence it at the source instead.
        ray_logger = logging.getLogger("ray")
        ray_level = ray_logger.level
        ray_logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            ray_logger.setLevel(ray_level)
            with contextlib.suppress(Exception):
                term.flush()
            sys.stderr = orig
            for h in handlers:
                h.setStream(orig)
            os.dup2(real_fd, 2)
            os.close(real_fd)
            with contextlib.suppress(Exception):
                term.close()
            with contextlib.suppress(OSError):
                sink.seek(0)
                hidden = sink.read().decode("utf-8", "replace").strip()
                if hidden:
                    log.debug("Ray's output during the run:\n%s", hidden[-4000:])
