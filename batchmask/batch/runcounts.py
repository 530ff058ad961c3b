"""The run's counts and the small helpers around them that the listing, the in-process path
and the dispatcher share: :class:`RunCounts` (run.json's ``counts``), the steady throughput
(:func:`steady_rate`), the message for images left for the next run, the SIGTERM handler, and an
error's last line (redacted) for logs.

Apart from :mod:`.dispatch` (the :class:`~.dispatch.Dispatcher` and its state) because none of
it is the dispatch's state, and the in-process path uses it without the dispatcher. All of it is
importable from :mod:`.dispatch`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .storage import redact_urls

log = logging.getLogger("batchmask.batch.dispatch")  # "failed: ..." lines keep their logger name


@dataclass
class RunCounts:
    """The run's counts; ``rows`` are the error rows the driver writes itself."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    retried_shards: int = 0
    #: Images left for the next run: their worker was killed each time, and not by them.
    left: int = 0
    listed_all: bool = False
    rows: list[dict] = field(default_factory=list)

    def recorded(self) -> dict[str, int]:
        """run.json's ``counts``."""
        return {k: getattr(self, k) for k in ("total", "skipped", "ok", "failed", "retried_shards", "left")}

    def add_result(self, r: dict) -> None:
        """A worker's answer for one shard (``ok``, ``failed``, ``errors``)."""
        self.ok += r["ok"]
        self.failed += r["failed"]
        for img, err in r["errors"]:
            log.info("failed: %s: %s", img, err)


def steady_rate(windows: list[tuple[float, float, int]], t_ready: float | None) -> float | None:
    """Images/s between all actors being ready and the last shard ending (shards pro rata)."""
    if not windows or t_ready is None:
        return None
    t_end = max(e for _, e, _ in windows)
    if t_end <= t_ready:
        return None
    n = 0.0
    for s, e, k in windows:
        if e <= t_ready:
            continue
        n += k * (e - max(s, t_ready)) / max(e - s, 1e-9)
    return round(n / (t_end - t_ready), 3)


def left_message(left: list[str]) -> str:
    """The run's last line when images were left for the next run."""
    some = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
    n = f"{len(left)} image{'s' if len(left) != 1 else ''}"
    return (f"{n} left for the next run ({some}): their worker was killed each time, not by "
            "the image (out of memory, a signal from outside, a lost node); everything else is done, rerun to "
            "finish them")


def raise_interrupt(signum, frame):
    """SIGTERM handler: stop like Ctrl-C (finished images are saved)."""
    raise KeyboardInterrupt(f"signal {signum}")


def last_line(exc: BaseException, n: int = 300) -> str:
    text = redact_urls(str(exc)).strip()
    return text.splitlines()[-1][:n] if text else type(exc).__name__
