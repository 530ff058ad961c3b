"""Test hooks of the batch worker, out of its main path (issue 13).

:class:`MaskWorker <batchmask.batch.worker.MaskWorker>` calls a hook object at five points: when
it starts, before each shard, before each image, after each batch and after each shard. In
production that object is :data:`NO_HOOKS`, whose methods do nothing. :func:`hooks_from_env` returns :class:`EnvHooks`
only when one of the ``BATCHMASK_TEST_*`` variables below is set; the runner forwards them to
Ray actors' environments (:data:`TEST_HOOKS`). Never set them in production.

Gates, not sleeps: a test holds a worker at a known point (``GATE``, ``RENDEZVOUS``) and learns
that it got there from a file the worker writes, instead of sleeping and hoping.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

#: "N:/path/marker" makes an actor exit abruptly after N images, once (the marker file records
#: that it happened, with the actor's pid).
CRASH_ENV = "BATCHMASK_TEST_CRASH_AFTER"
#: An actor (or a probe) crashes with SIGSEGV, every time, when it reads an image whose relative
#: path contains this string (a "poison" image that crashes the decoder).
CRASH_ON_ENV = "BATCHMASK_TEST_CRASH_ON"
#: "text:MB": reading an image whose path contains text, the process allocates and touches MB
#: megabytes (an image that needs much memory: under a memory limit the kernel's OOM killer ends it).
ALLOC_ON_ENV = "BATCHMASK_TEST_ALLOC_ON"
#: "text:/dir": reading an image whose path contains text, the process writes its pid to
#: ``/dir/<pid>`` and waits (at most the gate limit) for a test to kill it from outside.
KILL_ON_ENV = "BATCHMASK_TEST_KILL_ON"
#: Seconds to sleep before each shard: a *stalled* shard (the stalled-shard test, and
#: scripts/s3_outage.py). Not for synchronising a test with a run: use the gate.
DELAY_ENV = "BATCHMASK_TEST_SHARD_DELAY"
#: "/path/marker": the first actor to create the marker is a late starter: it waits (at most
#: :data:`GATE_LIMIT_S`) until ``<marker>.go`` exists, which every other actor writes when it has
#: finished its first shard. The balancing test: the others have worked and gone idle before
#: the late actor is ready, with no sleep.
START_AFTER_ENV = "BATCHMASK_TEST_START_AFTER"
#: A path: shards wait until that file exists (at most :data:`GATE_LIMIT_S`). A shard that waits
#: first creates ``<path>.reached`` (and appends its pid), so a test knows the run is held there.
GATE_ENV = "BATCHMASK_TEST_GATE"
#: With the gate: the first N shards of each worker pass it freely (default 0), so a test can
#: hold a run after some work is done (the interrupt tests).
GATE_FREE_ENV = "BATCHMASK_TEST_GATE_FREE"
#: "N:/dir": at its first shard each actor writes ``/dir/<pid>`` and waits until N actors have
#: (at most :data:`GATE_LIMIT_S`): proof that N actors worked at the same time.
RENDEZVOUS_ENV = "BATCHMASK_TEST_RENDEZVOUS"
#: Seconds a gate or rendezvous holds a worker at most (default :data:`GATE_LIMIT_S`); then it
#: goes on, and the test fails on its asserts.
GATE_LIMIT_ENV = "BATCHMASK_TEST_GATE_LIMIT"
#: Hooks that simulate dying, slow or meeting actors: a run with any of them set always uses Ray.
RAY_ONLY_TEST_HOOKS = (CRASH_ENV, CRASH_ON_ENV, ALLOC_ON_ENV, KILL_ON_ENV, DELAY_ENV, START_AFTER_ENV,
                       RENDEZVOUS_ENV)
#: Every test hook, forwarded to Ray actors' environments.
TEST_HOOKS = (*RAY_ONLY_TEST_HOOKS, GATE_ENV, GATE_FREE_ENV, GATE_LIMIT_ENV)
GATE_LIMIT_S = 600.0


class NoHooks:
    """What a production worker calls: nothing happens."""

    def start(self) -> None:
        """Before the model is loaded."""

    def shard(self, shard: int) -> None:
        """Before a shard's first image is read."""

    def image(self, rel: str) -> None:
        """Before an image is read."""

    def batch_done(self, images: int) -> None:
        """After a batch; ``images``: images this worker has done in all."""

    def shard_done(self, shard: int) -> None:
        """After a shard's rows are written."""


NO_HOOKS = NoHooks()


def wait_for_file(path: str | os.PathLike, limit_s: float = GATE_LIMIT_S) -> bool:
    """Wait until ``path`` exists; False after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class EnvHooks(NoHooks):
    """The ``BATCHMASK_TEST_*`` hooks, read from the environment when the worker starts."""

    def __init__(self, env: dict[str, str] | None = None):
        env = os.environ if env is None else env
        self.crash_after = env.get(CRASH_ENV) or ""
        self.crash_on = env.get(CRASH_ON_ENV) or ""
        self.alloc_on = env.get(ALLOC_ON_ENV) or ""
        self.kill_on = env.get(KILL_ON_ENV) or ""
        self.delay = float(env.get(DELAY_ENV) or 0)
        self.start_after = env.get(START_AFTER_ENV) or ""
        self.gate = env.get(GATE_ENV) or ""
        self.gate_free = int(env.get(GATE_FREE_ENV) or 0)
        self.rendezvous = env.get(RENDEZVOUS_ENV) or ""
        self.limit_s = float(env.get(GATE_LIMIT_ENV) or GATE_LIMIT_S)
        self.shards = 0

    def start(self) -> None:
        if not self.start_after:
            return
        try:
            os.close(os.open(self.start_after, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        wait_for_file(f"{self.start_after}.go", self.limit_s)

    def shard(self, shard: int) -> None:
        self.shards += 1
        if self.delay:
            time.sleep(self.delay)
        if self.rendezvous and self.shards == 1:
            n, _, d = self.rendezvous.partition(":")
            Path(d).mkdir(parents=True, exist_ok=True)
            Path(d, str(os.getpid())).write_text(str(time.time()))
            deadline = time.monotonic() + self.limit_s
            while len(os.listdir(d)) < int(n) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.gate and self.shards > self.gate_free and not os.path.exists(self.gate):
            with open(f"{self.gate}.reached", "a") as f:
                f.write(f"{os.getpid()}\n")
            wait_for_file(self.gate, self.limit_s)

    def shard_done(self, shard: int) -> None:
        if self.start_after:
            Path(f"{self.start_after}.go").touch()

    def image(self, rel: str) -> None:
        if self.crash_on and self.crash_on in rel:
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.alloc_on:
            text, _, mb = self.alloc_on.partition(":")
            if text in rel:
                import numpy as np

                hog = np.ones(int(mb) << 20, np.uint8)  # written, so every page is really used
                del hog
        if self.kill_on:
            text, _, d = self.kill_on.partition(":")
            if text in rel:
                Path(d).mkdir(parents=True, exist_ok=True)
                Path(d, str(os.getpid())).write_text(rel)
                time.sleep(self.limit_s)

    def batch_done(self, images: int) -> None:
        if not self.crash_after:
            return
        n, _, marker = self.crash_after.partition(":")
        if images >= int(n) and marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)


def hooks_from_env() -> NoHooks:
    """:class:`EnvHooks` when a test hook is set in this process's environment, else :data:`NO_HOOKS`."""
    return EnvHooks() if any(os.environ.get(h) for h in TEST_HOOKS) else NO_HOOKS
