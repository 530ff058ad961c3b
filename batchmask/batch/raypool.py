"""The dispatcher's :class:`~batchmask.batch.dispatch.WorkerPool` over Ray actors
(:class:`~batchmask.batch.worker.MaskWorker`), and what Ray's errors say about a death."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

#: Phrases of Ray's death messages that put the blame on the machine (lower case).
LOST_PHRASES = ("node has died", "node died", "running out of memory", "memory pressure", "preempted")


class RayPool:
    """:class:`~batchmask.batch.dispatch.WorkerPool` over Ray actors (:class:`~batchmask.batch.worker.MaskWorker`)."""

    def __init__(self, actors: list, probe: Callable[[str], Any] | None = None):
        """``probe(rel)``: starts a probe of that image (:mod:`batchmask.batch.probe`), returns its ref."""
        import ray
        from ray.exceptions import RayError

        self.ray, self.actors, self.size, self.errors = ray, actors, len(actors), (RayError,)
        self._probe = probe

    def ready(self, i: int) -> Any:
        return self.actors[i].ready.remote()

    def process(self, i: int, sid: int, items: list) -> Any:
        return self.actors[i].process.remote(sid, items)

    def wait(self, refs: list, timeout: float) -> list:
        return self.ray.wait(refs, num_returns=1, timeout=timeout)[0]

    def get(self, ref: Any) -> Any:
        return self.ray.get(ref)

    def restart(self, i: int) -> None:
        self.ray.kill(self.actors[i], no_restart=False)  # Ray restarts it

    def is_dead(self, exc: BaseException) -> bool:
        from ray.exceptions import RayActorError

        return isinstance(exc, RayActorError)

    def is_restarting(self, exc: BaseException) -> bool:
        from ray.exceptions import ActorUnavailableError

        return isinstance(exc, ActorUnavailableError)

    def is_lost(self, exc: BaseException) -> bool:
        """Ray says the machine failed: the node died or was preempted, or Ray's memory monitor
        killed the worker. (A kernel OOM kill, a SIGKILL and a crash all look alike to Ray.)"""
        from ray.exceptions import LocalRayletDiedError, NodeDiedError, OutOfMemoryError

        if isinstance(exc, (NodeDiedError, OutOfMemoryError, LocalRayletDiedError)):
            return True
        if getattr(exc, "preempted", False):
            return True
        text = str(exc).lower()
        return any(p in text for p in LOST_PHRASES)

    def probe(self, rel: str) -> Any:
        return self._probe(rel)

    def stats(self, actors: list[int], timeout: float) -> dict[int, dict]:
        """Each actor's stats() answer, asked of all at once; those that do not answer within
        ``timeout`` (busy with a shard, or dead) are left out."""
        from ray.exceptions import RayError

        refs = {self.actors[i].stats.remote(): i for i in actors}
        done, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        out = {}
        for ref in done:
            with contextlib.suppress(RayError):
                out[refs[ref]] = self.ray.get(ref)
        return out
