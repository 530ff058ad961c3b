"""The driver's dispatch without Ray: the retry/split policy as a pure function, and the
Dispatcher driven by fake actors and a fake clock (milliseconds). The same behaviour with real
Ray actors and worker deaths is tested in test_run.py / test_hostile.py."""

from __future__ import annotations

import itertools

import pytest

from batchmask.batch.dispatch import STATS_WAIT_S, STATS_WAIT_STOPPING_S, Dispatcher, RunCounts
from batchmask.batch.options import RunError
from batchmask.batch.policy import INFLIGHT_PER_ACTOR, MAX_SHARD_ATTEMPTS, Action, ErrorKind, decide

# ---------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("attempt", "n", "kind", "action"),
    [
        (1, 10, ErrorKind.DIED, Action.RETRY),
        (1, 10, ErrorKind.ERROR, Action.RETRY),
        (1, 10, ErrorKind.TIMED_OUT, Action.RETRY),
        (1, 1, ErrorKind.DIED, Action.RETRY),
        (2, 10, ErrorKind.DIED, Action.SPLIT),
        (2, 1, ErrorKind.DIED, Action.PROBE),
        (1, 10, ErrorKind.LOST, Action.RETRY),
        (2, 10, ErrorKind.LOST, Action.LEAVE),
        (2, 1, ErrorKind.LOST, Action.LEAVE),
        (2, 10, ErrorKind.ERROR, Action.FAIL_RUN),
        (2, 1, ErrorKind.ERROR, Action.FAIL_RUN),
        (2, 10, ErrorKind.TIMED_OUT, Action.FAIL_RUN),
        (2, 1, ErrorKind.TIMED_OUT, Action.FAIL_RUN),
    ],
)
def test_decide(attempt, n, kind, action):
    assert decide(attempt, n, kind) is action


def test_decide_follows_max_attempts():
    assert MAX_SHARD_ATTEMPTS == 2
    assert decide(2, 5, ErrorKind.DIED, max_attempts=3) is Action.RETRY
    assert decide(3, 5, ErrorKind.DIED, max_attempts=3) is Action.SPLIT


# ---------------------------------------------------------------- fakes


class FakeError(Exception):
    pass


class Died(FakeError):
    pass


class Restarting(FakeError):
    pass


class Lost(Died):
    """A death Ray blames on the machine (node died, preempted)."""


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakePool:
    """Actors that answer at once, in call order. ``behave(items, call_number)`` says what a
    process() call does: "ok", "die" (the actor process dies: every call in flight on it fails),
    "error" (an exception in the worker) or "hang" (no answer until the actor is restarted)."""

    errors = (FakeError,)

    def __init__(self, size: int, clock: Clock, behave=lambda items, n: "ok", start_fails: int = 0,
                 probe=lambda rel: {"crashed": False, "how": "killed by SIGKILL"}):
        self.size, self.clock, self.behave, self.probe_verdict = size, clock, behave, probe
        self.probed: list[str] = []
        self.refs = itertools.count()
        self.answers: dict[int, object] = {}  # ref -> result or exception, in completion order
        self.hanging: dict[int, int] = {}  # ref -> actor
        self.inflight: dict[int, set[int]] = {i: set() for i in range(size)}
        self.pids = {i: 100 * (i + 1) for i in range(size)}
        self.start_fails = start_fails
        self.calls: list[tuple[int, int, tuple]] = []  # (actor, sid, images) per process() call
        self.restarted: list[int] = []

    def ready(self, i):
        ref = next(self.refs)
        if self.start_fails:
            self.answers[ref] = FakeError(f"actor {i} cannot start")
        else:
            self.answers[ref] = {"pid": self.pids[i], "node_id": "node-a", "startup_s": 0.5, "peak_rss_mb": 50.0,
                                 "runtime": "keras"}
        return ref

    def process(self, i, sid, items):
        ref = next(self.refs)
        self.calls.append((i, sid, tuple(rel for rel, _ in items)))
        what = self.behave(items, len(self.calls))
        if what == "ok":
            t = self.clock()
            self.answers[ref] = {"ok": len(items), "failed": 0, "errors": [], "start": t, "end": t + 1.0,
                                 "n": len(items), "peak_rss_mb": 60.0, "node_id": "node-a", "pid": self.pids[i]}
        elif what == "error":
            self.answers[ref] = FakeError("AccessDenied: no")
        elif what in ("die", "lost"):
            self._die(i)
            self.answers[ref] = (Died if what == "die" else Lost)(f"actor {i} died")
        else:
            self.hanging[ref] = i
        self.inflight[i].add(ref)
        return ref

    def _die(self, i):
        self.pids[i] += 1
        for ref, actor in list(self.hanging.items()):
            if actor == i:
                del self.hanging[ref]
                self.answers[ref] = Died(f"actor {i} was restarted")

    def wait(self, refs, timeout):
        for ref in self.answers:
            if ref in refs:
                return [ref]
        self.clock.t += timeout
        return []

    def get(self, ref):
        answer = self.answers.pop(ref)
        for s in self.inflight.values():
            s.discard(ref)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def restart(self, i):
        self.restarted.append(i)
        self._die(i)

    def is_dead(self, exc):
        return isinstance(exc, Died)

    def is_restarting(self, exc):
        return isinstance(exc, Restarting)

    def is_lost(self, exc):
        return isinstance(exc, Lost)

    def probe(self, rel):
        ref = next(self.refs)
        self.probed.append(rel)
        self.answers[ref] = self.probe_verdict(rel)
        return ref

    def stats(self, actors, timeout):
        self.stats_asked = (list(actors), timeout)
        return {i: {"peak_rss_mb": 70.0, "busy_s": 1.5} for i in actors}


def shards_of(n_images: int, size: int) -> list[list[tuple[str, str]]]:
    items = [(f"img{i:03d}.jpg", f"masks/img{i:03d}.png") for i in range(n_images)]
    return [items[k:k + size] for k in range(0, n_images, size)]


def dispatch(pool: FakePool, shards: list[list], clock: Clock, shard_timeout: float = 300.0):
    counts = RunCounts(total=sum(map(len, shards)), listed_all=True)
    info: dict = {"ray": {"cpus_per_actor": 1.0}}
    d = Dispatcher(pool, shards[0], iter(shards[1:]), counts, info, shard_timeout=shard_timeout, t0=clock(),
                   clock=clock, sleep=lambda s: None)
    return d, counts, info


# ---------------------------------------------------------------- the dispatcher


def test_every_shard_is_done_and_every_actor_gets_work():
    clock = Clock()
    pool = FakePool(3, clock)
    d, counts, info = dispatch(pool, shards_of(40, 4), clock)
    d.run()
    assert (counts.ok, counts.failed, counts.retried_shards, counts.rows) == (40, 0, 0, [])
    done = sorted(rel for _, _, images in pool.calls for rel in images)
    assert done == [f"img{i:03d}.jpg" for i in range(40)]  # each image once
    assert {a for a, _, _ in pool.calls} == {0, 1, 2}
    assert [a["actor"] for a in info["actors"]] == [0, 1, 2]
    assert sum(a["images"] for a in info["actors"]) == 40
    assert all(a["busy_s"] == 1.5 and a["restarts"] == 0 for a in info["actors"])
    assert info["nodes_used"] == ["node-a"] and "startup_s" in info["throughput"]
    assert pool.stats_asked == ([0, 1, 2], STATS_WAIT_S)  # all actors at once, one wait
    assert not d.tasks and not d.retry and all(v == 0 for v in d.inflight.values())


def test_at_most_inflight_per_actor():
    clock = Clock()
    seen = []

    class Watching(FakePool):
        def process(self, i, sid, items):
            ref = super().process(i, sid, items)
            seen.append(len(self.inflight[i]))
            return ref

    pool = Watching(2, clock, behave=lambda items, n: "hang" if n <= 4 else "ok")
    d, _, _ = dispatch(pool, shards_of(20, 2), clock)
    d.starting = {pool.ready(i): i for i in range(2)}
    for _ in range(3):
        d.step()
    assert max(seen) == INFLIGHT_PER_ACTOR


def test_a_worker_death_is_retried_alone_and_the_run_goes_on():
    clock = Clock()
    pool = FakePool(2, clock, behave=lambda items, n: "die" if n == 1 else "ok")
    d, counts, info = dispatch(pool, shards_of(12, 3), clock)
    d.run()
    assert (counts.ok, counts.failed, counts.retried_shards) == (12, 0, 1)
    first = pool.calls[0][2]
    assert [c for c in pool.calls if c[2] == first][1:] != []  # the shard ran again
    assert info["actors"][0]["restarts"] == 1 and len(info["actors"][0]["pids"]) == 2


def test_a_poison_image_is_split_out_and_becomes_an_error_row():
    clock = Clock()
    poison = "img005.jpg"
    pool = FakePool(2, clock, behave=lambda items, n: "die" if any(rel == poison for rel, _ in items) else "ok",
                    probe=lambda rel: {"crashed": True, "how": "SIGSEGV"})
    d, counts, info = dispatch(pool, shards_of(12, 4), clock)
    d.run()
    assert (counts.ok, counts.failed, counts.left) == (11, 1, 0)
    assert [r["image"] for r in counts.rows] == [poison] and counts.rows[0]["status"] == "error"
    assert "the decoder crashed on this image (SIGSEGV)" in counts.rows[0]["error"]
    assert pool.probed == [poison]  # only the single image whose worker died again
    assert counts.retried_shards == 2  # the retry of the whole shard, then its split
    assert info["failed_shards"] and len(info["failed_shards"]) == 1
    singles = [c for c in pool.calls if len(c[2]) == 1]
    assert sorted(rel for _, _, (rel,) in singles) == ["img004.jpg", "img005.jpg", "img006.jpg", "img007.jpg"]


@pytest.mark.parametrize("verdict", [{"crashed": False, "how": "killed by SIGKILL"},
                                     {"crashed": False, "how": "decoded alone without a crash"},
                                     FakeError("the probe's own worker died")])
def test_a_death_the_probe_does_not_pin_on_the_image_leaves_it_for_the_next_run(verdict):
    """The OOM killer or a SIGKILL from outside, every time: no error row (the rerun does the image)."""
    clock = Clock()
    victim = "img005.jpg"
    pool = FakePool(2, clock, behave=lambda items, n: "die" if any(rel == victim for rel, _ in items) else "ok",
                    probe=lambda rel: verdict)
    d, counts, info = dispatch(pool, shards_of(12, 4), clock)
    with pytest.raises(RunError, match=r"1 image left for the next run \(img005.jpg\).*not by the image"):
        d.run()
    assert (counts.ok, counts.failed, counts.left, counts.rows) == (11, 0, 1, [])
    assert pool.probed == [victim] and "failed_shards" not in info


def test_a_machine_loss_is_retried_then_left_never_split_or_probed():
    clock = Clock()
    pool = FakePool(2, clock, behave=lambda items, n: "lost" if items[0][0] == "img004.jpg" else "ok")
    d, counts, _ = dispatch(pool, shards_of(12, 4), clock)
    with pytest.raises(RunError, match="4 images left for the next run"):
        d.run()
    assert (counts.ok, counts.failed, counts.left, counts.rows) == (8, 0, 4, [])
    assert pool.probed == [] and not [c for c in pool.calls if len(c[2]) == 1]


def test_a_retried_shard_runs_alone_on_its_actor():
    clock = Clock()
    pool = FakePool(1, clock, behave=lambda items, n: "die" if n == 1 else "ok")
    d, counts, _ = dispatch(pool, shards_of(12, 3), clock)
    d.starting = {pool.ready(0): 0}
    while d.step():
        if d.alone:
            assert len(d.tasks) == 1  # nothing else in flight beside the retried shard
    assert counts.ok == 12


def test_an_exception_twice_fails_the_run():
    clock = Clock()
    pool = FakePool(2, clock, behave=lambda items, n: "error")
    d, counts, info = dispatch(pool, shards_of(8, 4), clock)
    with pytest.raises(RunError, match="failed 2 times: AccessDenied"):
        d.run()
    assert pool.stats_asked[1] == STATS_WAIT_STOPPING_S < STATS_WAIT_S  # a stopping run waits less
    assert counts.retried_shards >= 1
    assert "actors" in info  # the statistics are written also when the run fails


def test_a_stalled_shard_is_restarted_then_fails_the_run():
    clock = Clock()
    pool = FakePool(1, clock, behave=lambda items, n: "hang")
    d, _, _ = dispatch(pool, shards_of(4, 4), clock, shard_timeout=30.0)
    with pytest.raises(RunError, match="made no progress for 30 s, 2 times"):
        d.run()
    assert pool.restarted == [0, 0]


def test_a_stalled_shard_that_then_succeeds_is_counted_once():
    clock = Clock()
    pool = FakePool(1, clock, behave=lambda items, n: "hang" if n == 1 else "ok")
    d, counts, _ = dispatch(pool, shards_of(4, 4), clock, shard_timeout=30.0)
    d.run()
    assert (counts.ok, counts.retried_shards, pool.restarted) == (4, 1, [0])


def test_no_worker_could_start():
    clock = Clock()
    pool = FakePool(2, clock, start_fails=1)
    d, _, _ = dispatch(pool, shards_of(4, 4), clock)
    with pytest.raises(RunError, match="no worker could start: worker 0: actor 0 cannot start"):
        d.run()


def test_workers_that_never_start_time_out():
    clock = Clock()

    class Silent(FakePool):
        def ready(self, i):
            return next(self.refs)  # never answers

    d, _, _ = dispatch(Silent(2, clock), shards_of(4, 4), clock)
    d.start_timeout = 60.0
    with pytest.raises(RunError, match="no worker started within 60 s"):
        d.run()


def test_a_second_shard_waits_for_the_other_actors_to_start():
    clock = Clock()
    pool = FakePool(2, clock)
    d, _, _ = dispatch(pool, shards_of(8, 2), clock)
    ref0 = pool.ready(0)
    d.starting = {ref0: 0, next(pool.refs): 1}  # actor 1 is slow to start (never answers here)
    d.step()  # actor 0 ready
    d.step()  # it gets one shard (done at once here)
    d.fill()
    assert d.given == {0: 1, 1: 0} and d.inflight[0] == 0  # no second one while actor 1 has none
    clock.t += d.balance_wait + 1  # after BALANCE_WAIT_S it may take more
    d.fill()
    assert d.inflight[0] == INFLIGHT_PER_ACTOR and d.given[1] == 0
