"""The driver side of a Ray run: handing shards to workers, and what a failure means.

* :func:`~batchmask.batch.policy.decide` (in :mod:`batchmask.batch.policy`) - the
  retry-and-split policy, a pure function of the failed shard's attempt, size and error kind.
* :class:`RunCounts` - the run's counts (run.json's ``counts``), kept by the listing, the
  dispatcher and the in-process path (defined in :mod:`batchmask.batch.runcounts` with the small
  helpers they share; importable from here).
* :class:`Dispatcher` - one dispatch: its state as attributes, one method per event (actor
  ready, actor failed to answer, shard done, shard failed, shard timed out). It talks to the
  workers through a pool (:class:`~batchmask.batch.raypool.RayPool` for Ray actors; the tests
  use fakes), so its behaviour is tested without Ray.

The policy is described in :mod:`batchmask.batch.policy`. A dead actor is restarted by Ray (``ACTOR_MAX_RESTARTS`` in :mod:`batchmask.batch.rayexec`); the dispatcher
waits for it with ``ready()`` and then gives it work again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .options import RunError
from .outputs import error_row
from .policy import INFLIGHT_PER_ACTOR, MAX_SHARD_ATTEMPTS, Action, ErrorKind, decide
from .runcounts import (  # noqa: F401  (raise_interrupt: part of this module's interface)
    RunCounts,
    last_line,
    left_message,
    raise_interrupt,
    steady_rate,
)

log = logging.getLogger(__name__)

#: ready() calls that may fail on an actor that died before it is given up as dead.
REVIVE_TRIES = 3
ACTOR_START_TIMEOUT_S = float(os.environ.get("BATCHMASK_ACTOR_START_TIMEOUT", "600"))
#: An actor gets a second shard only once every starting actor has one, or this long after the
#: first actor was ready (an actor that cannot be placed must not hold the others back).
BALANCE_WAIT_S = 60.0
#: Seconds one wait for a result lasts before the dispatcher looks at stalls and timeouts again.
POLL_S = 5.0
#: Seconds the end of a run waits for the actors' statistics (all asked at once); a run that is
#: stopping (Ctrl-C, SIGTERM, a failure) waits less: its actors may be busy with a shard.
STATS_WAIT_S = 10.0
STATS_WAIT_STOPPING_S = 2.0
#: Keys of an actor's ready() answer recorded in run.json's ``actors``.
DEVICE_KEYS = ("runtime", "runtime_version", "device", "providers", "cuda_visible_devices", "threads", "streams", "precision")


# ---------------------------------------------------------------- the workers


class WorkerPool(Protocol):
    """The workers as the dispatcher sees them; calls return references to wait for."""

    size: int
    #: what :meth:`get` raises for a failed call
    errors: tuple[type[BaseException], ...]

    def ready(self, i: int) -> Any: ...
    def process(self, i: int, sid: int, items: list) -> Any: ...
    def wait(self, refs: list, timeout: float) -> list: ...
    def get(self, ref: Any) -> Any: ...
    def restart(self, i: int) -> None: ...
    def is_dead(self, exc: BaseException) -> bool: ...
    def is_restarting(self, exc: BaseException) -> bool: ...
    def is_lost(self, exc: BaseException) -> bool: ...
    def probe(self, rel: str) -> Any: ...
    def stats(self, actors: list[int], timeout: float) -> dict[int, dict]: ...


class _NoBar:
    total = None

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the dispatcher


@dataclass
class _Task:
    actor: int
    sid: int
    items: list
    attempt: int


@dataclass
class _Probe:
    sid: int
    items: list  # one image
    why: str  # the death that led to it


class Dispatcher:
    """Hand shards to ready actors and collect results until every shard is done (or the run fails)."""

    def __init__(self, pool: WorkerPool, first: list | None, shards: Iterator[list], counts: RunCounts, info: dict,
                 *, shard_timeout: float, t0: float, bar: Any = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, start_timeout: float = ACTOR_START_TIMEOUT_S,
                 balance_wait: float = BALANCE_WAIT_S):
        self.pool, self.counts, self.info = pool, counts, info
        self.bar = _NoBar() if bar is None else bar
        self.shard_timeout, self.t0, self.clock, self.sleep = shard_timeout, t0, clock, sleep
        self.start_timeout, self.balance_wait = start_timeout, balance_wait
        self.first, self.shards, self.listing_done = first, shards, False
        n = pool.size
        self.starting: dict[Any, int] = {}  # ready() ref -> actor
        self.ready: list[int] = []
        self.inflight = dict.fromkeys(range(n), 0)
        self.given = dict.fromkeys(range(n), 0)  # shards handed to each actor
        self.alone: set[int] = set()  # actors running a retried shard, with nothing else in flight
        self.revive_failures = dict.fromkeys(range(n), 0)
        self.restarting_since: dict[int, float] = {}  # actor -> when Ray first said "restarting"
        self.progress: dict[int, float] = {}  # actor -> last time it started work or returned a result
        self.stalled: set[int] = set()  # actors killed because their shard made no progress
        self.tasks: dict[Any, _Task] = {}
        self.probes: dict[Any, _Probe] = {}
        self.left: list[str] = []  # images left for the next run
        self.retry: deque[tuple[int, list, int]] = deque()
        self.next_id = 0
        self.per_actor: dict[int, dict] = {}
        self.windows: list[tuple[float, float, int]] = []
        self.start_errors: list[str] = []
        self.first_ready = 0.0
        self.t_all_ready: float | None = None
        self.last_progress = t0

    # -- the loop

    def run(self) -> None:
        for i in range(self.pool.size):
            self.starting[self.pool.ready(i)] = i
        finished = False
        try:
            while self.step():
                pass
            finished = True
            if self.left:  # everything else is done
                raise RunError(left_message(self.left))
        finally:
            # A run that is stopping (interrupted, failed) does not wait long for busy actors.
            self.finish(STATS_WAIT_S if finished else STATS_WAIT_STOPPING_S)

    def step(self) -> bool:
        """Hand out work, wait for one answer (at most POLL_S) and handle it; False when all is done."""
        if self.ready:
            self.fill()
        if self.counts.listed_all and self.bar.total is None:
            self.bar.total = self.counts.total - self.counts.skipped
            self.bar.refresh()
        if self.listing_done and not self.tasks and not self.retry and not self.probes:
            return False
        if not self.ready and not self.starting:
            if self.per_actor:
                raise RunError("all workers died; rerun to continue (finished images are kept): "
                               + "; ".join(self.start_errors[-2:]))
            raise RunError("no worker could start: " + "; ".join(self.start_errors[:3]))
        self.stop_stalled()
        done = self.pool.wait(list(self.tasks) + list(self.starting) + list(self.probes), POLL_S)
        if not done:
            if not self.ready and self.clock() - self.last_progress > self.start_timeout:
                raise RunError(f"no worker started within {self.start_timeout:.0f} s; the cluster may lack free "
                               f"CPUs ({self.info.get('ray', {}).get('cpus_per_actor')} per worker needed)")
            return True
        self.last_progress = self.clock()
        ref = done[0]
        if ref in self.probes:
            self.on_probed(self.probes.pop(ref), ref)
            return True
        if ref in self.starting:
            i = self.starting.pop(ref)
            try:
                r = self.pool.get(ref)
            except self.pool.errors as exc:
                self.on_actor_failed(i, exc)
            else:
                self.on_actor_ready(i, r)
            return True
        task = self.tasks.pop(ref)
        self.inflight[task.actor] -= 1
        self.progress[task.actor] = self.clock()
        timed_out = task.actor in self.stalled
        if timed_out and not self.inflight[task.actor]:
            self.stalled.discard(task.actor)
        if task.attempt > 1:
            self.alone.discard(task.actor)
        try:
            r = self.pool.get(ref)
        except self.pool.errors as exc:
            self.on_shard_failed(task, exc, timed_out)
        else:
            self.on_shard_done(task.actor, r)
        return True

    # -- handing out work

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _next_new(self) -> tuple[int, list, int] | None:
        if self.first is not None:
            items, self.first = self.first, None
        else:
            items = next(self.shards, None)
            if items is None:
                self.listing_done = True
                return None
        return self._new_id(), items, 1

    def _others_first(self, i: int) -> bool:
        """Actor i has work while another live actor has none yet: it waits (see BALANCE_WAIT_S)."""
        if not self.given[i] or self.clock() - self.first_ready > self.balance_wait:
            return False
        live = set(self.ready) | set(self.starting.values())
        return any(not self.given[j] for j in live if j != i)

    def fill(self) -> None:
        """Give each ready actor up to INFLIGHT_PER_ACTOR shards; a retried shard runs alone."""
        for i in list(self.ready):
            while self.inflight[i] < INFLIGHT_PER_ACTOR and i not in self.alone:
                if self.retry:
                    if self.inflight[i]:
                        break  # a retried shard waits until it can run alone
                    sid, items, attempt = self.retry.popleft()
                    self.alone.add(i)
                else:
                    if self._others_first(i):
                        break
                    job = self._next_new()
                    if job is None:
                        return
                    sid, items, attempt = job
                if not self.inflight[i]:
                    self.progress[i] = self.clock()
                self.tasks[self.pool.process(i, sid, items)] = _Task(i, sid, items, attempt)
                self.inflight[i] += 1
                self.given[i] += 1

    # -- events

    def stop_stalled(self) -> None:
        """Bounded time: an actor whose shard returns nothing for shard_timeout is restarted (shard timed out)."""
        now = self.clock()
        for i in self.ready:
            if self.inflight[i] and i not in self.stalled and now - self.progress.get(i, now) > self.shard_timeout:
                self.on_shard_timed_out(i)

    def on_shard_timed_out(self, i: int) -> None:
        log.warning("worker %d made no progress for %.0f s; restarting it and retrying its shards "
                    "(--shard-timeout)", i, self.shard_timeout)
        self.stalled.add(i)
        self.pool.restart(i)

    def on_actor_failed(self, i: int, exc: BaseException) -> None:
        """ready() failed. A known actor that died may still be restarting: while Ray says so (a
        restart loads TF and the model, slow on a busy machine) keep asking until the start
        timeout; other errors get REVIVE_TRIES tries."""
        restarting = (self.pool.is_restarting(exc)
                      and self.clock() - self.restarting_since.setdefault(i, self.clock()) < self.start_timeout)
        if i in self.per_actor and (restarting or self.revive_failures[i] < REVIVE_TRIES):
            if not restarting:
                self.revive_failures[i] += 1
            self.sleep(0.5 * max(1, self.revive_failures[i]))
            self.starting[self.pool.ready(i)] = i
            return
        self.start_errors.append(f"worker {i}: {last_line(exc)}")
        log.error("worker %d %s: %s", i, "is dead" if i in self.per_actor else "failed to start", last_line(exc))

    def on_actor_ready(self, i: int, r: dict) -> None:
        self.revive_failures[i] = 0
        self.restarting_since.pop(i, None)
        if i not in self.ready:
            self.ready.append(i)
            self.first_ready = self.first_ready or self.clock()
        if i in self.per_actor:  # restarted after a death
            if r["pid"] not in self.per_actor[i]["pids"]:
                self.per_actor[i]["pids"].append(r["pid"])
        else:
            self.per_actor[i] = {"actor": i, "node_id": r["node_id"], "pids": [r["pid"]],
                                 "startup_s": round(r["startup_s"], 2), "images": 0, "peak_rss_mb": r["peak_rss_mb"]}
            self.per_actor[i].update({k: r[k] for k in DEVICE_KEYS if k in r})
        if not self.starting and self.t_all_ready is None:
            self.t_all_ready = self.clock()
            self.info.setdefault("throughput", {})["startup_s"] = round(self.t_all_ready - self.t0, 2)

    def on_shard_done(self, i: int, r: dict) -> None:
        self.counts.add_result(r)
        self.windows.append((r["start"], r["end"], r["n"]))
        a = self.per_actor.setdefault(i, {"actor": i, "pids": [], "images": 0})
        a["images"] += r["n"]
        a["peak_rss_mb"] = max(a.get("peak_rss_mb", 0), r["peak_rss_mb"])
        a["node_id"] = r["node_id"]
        if r["pid"] not in a["pids"]:
            a["pids"].append(r["pid"])
        self.bar.update(r["n"])

    def on_shard_failed(self, task: _Task, exc: BaseException, timed_out: bool) -> None:
        dead = self.pool.is_dead(exc)
        kind = (ErrorKind.TIMED_OUT if timed_out else ErrorKind.LOST if dead and self.pool.is_lost(exc)
                else ErrorKind.DIED if dead else ErrorKind.ERROR)
        action = decide(task.attempt, len(task.items), kind)
        if action is Action.FAIL_RUN and kind is ErrorKind.TIMED_OUT:  # not the image's fault
            raise RunError(f"shard {task.sid} made no progress for {self.shard_timeout:.0f} s, {task.attempt} times; "
                           "is the storage reachable? (finished images are kept; raise --shard-timeout for very "
                           "slow images)") from exc
        i = task.actor
        log.warning("shard %d (%d images, attempt %d) failed on worker %d: %s", task.sid, len(task.items),
                    task.attempt, i, last_line(exc, 200))
        if dead and i in self.ready:  # Ray restarts it; it gets work again once ready() answers
            self.ready.remove(i)
            self.alone.discard(i)
            self.starting[self.pool.ready(i)] = i
        if action is Action.RETRY:
            self.counts.retried_shards += 1
            self.retry.append((task.sid, task.items, task.attempt + 1))
        elif action is Action.SPLIT:  # find the image(s) that kill the worker: one by one
            self.counts.retried_shards += 1
            self.retry.extend((self._new_id(), [item], MAX_SHARD_ATTEMPTS) for item in task.items)
        elif action is Action.PROBE:  # the image, or the machine? (batchmask.batch.probe)
            item = task.items[0]  # (image, mask) or, for a listed URL with a secret, (image, mask, URL)
            self.probes[self.pool.probe(item[2] if len(item) > 2 else item[0])] = _Probe(task.sid, task.items,
                                                                                      last_line(exc, 120))
        elif action is Action.LEAVE:
            self.leave(task.items, f"the machine failed ({last_line(exc, 120)})")
        else:  # an exception, e.g. storage unreachable or access denied
            raise RunError(f"shard {task.sid} failed {task.attempt} times: {last_line(exc)}") from exc

    def on_probed(self, p: _Probe, ref: Any) -> None:
        """A probe's verdict: a crash of the decoder on the image alone is the image's error row;
        anything else (killed, decoded fine, the probe itself failed) leaves it for the next run."""
        try:
            verdict = self.pool.get(ref)
        except self.pool.errors as exc:
            verdict = {"crashed": False, "how": f"the probe failed: {last_line(exc, 120)}"}
        rel = p.items[0][0]
        if verdict["crashed"]:
            log.warning("%s: the decoder crashed on it (%s), also alone in a separate process: an error row",
                        rel, verdict["how"])
            self.fail_images(p.sid, p.items, f"the decoder crashed on this image ({verdict['how']}), "
                                             "also alone and in a separate process")
        else:
            self.leave(p.items, f"its worker died each time ({p.why}); alone in a separate process: "
                                f"{verdict['how']}")

    def leave(self, items: list, why: str) -> None:
        """No row for these images: the next run does them (the run fails at its end, saying so)."""
        for rel, *_ in items:
            log.warning("left for the next run: %s: %s", rel, why)
            self.left.append(rel)
        self.counts.left += len(items)
        self.bar.update(len(items))

    def fail_images(self, sid: int, items: list, reason: str) -> None:
        """The images of a (one-image) shard that crashes its decoder become error rows (driver-side part)."""
        rows = [error_row(rel, reason) for rel, *_ in items]
        self.info.setdefault("failed_shards", []).append(sid)
        self.counts.failed += len(rows)
        self.counts.rows.extend(rows)
        self.bar.update(len(items))

    # -- the end

    def finish(self, stats_wait: float = 10.0) -> None:
        """Actor statistics into run.json (also when the run failed; then from the actors that
        answer within ``stats_wait``)."""
        self.bar.close()
        stats = self.pool.stats(list(self.per_actor), stats_wait) if self.per_actor else {}
        for i, a in self.per_actor.items():
            a["restarts"] = max(0, len(a.get("pids", [])) - 1)
            s = stats.get(i)
            if s is not None:
                a["peak_rss_mb"] = max(a.get("peak_rss_mb", 0), s["peak_rss_mb"])
                a["busy_s"] = s["busy_s"]
        self.info["actors"] = [self.per_actor[k] for k in sorted(self.per_actor)]
        self.info["nodes_used"] = sorted({a["node_id"] for a in self.per_actor.values() if a.get("images")})
        self.info.setdefault("throughput", {})["steady_images_per_s"] = steady_rate(self.windows, self.t_all_ready)
