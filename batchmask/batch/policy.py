"""What a failed shard means: the driver's retry-and-split policy, as a pure function.

The driver owns every retry (Ray's ``max_task_retries`` is 0). A shard that failed is retried
*alone* on an actor (nothing else in flight there), so a worker death during a retry is that
shard's doing or the machine's. After ``MAX_SHARD_ATTEMPTS`` deaths the shard is split into
single images, each tried alone once. An image whose worker still dies is *probed*: it is read
and decoded alone in a child process (:mod:`batchmask.batch.probe`), whose end the driver sees
itself; only a crash there (SIGSEGV, SIGABRT, ...) makes it an error row. Ray cannot tell a
crash from the kernel's OOM killer or a SIGKILL from outside (both are "the worker process
died"), so anything else - the child killed, or decoding fine - *leaves* the image for the next
run: no row, and the run fails at its end. A death Ray attributes to the machine (the node died
or was preempted, Ray's memory monitor) is never split or probed: retried, then left. A shard
that keeps timing out, or raising, fails the run: that is the storage's doing, not the image's.
:class:`~batchmask.batch.dispatch.Dispatcher` applies :func:`decide`; tests call it directly.
"""

from __future__ import annotations

import enum

#: Shards in flight per actor (one being processed, one queued behind it).
INFLIGHT_PER_ACTOR = 2
#: A failed shard is tried again, alone on its actor, up to this many attempts in all; a shard
#: whose worker died every time is then split into single images, each tried alone once, and an
#: image that still kills its worker is probed (an error row only if the decoder crashes on it).
MAX_SHARD_ATTEMPTS = 2


class ErrorKind(enum.Enum):
    DIED = "the worker process died (a crash, the OOM killer or a signal: Ray cannot tell which)"
    LOST = "the machine failed (node died or preempted, Ray's memory monitor)"
    TIMED_OUT = "no progress within --shard-timeout"
    ERROR = "an exception in the worker"


class Action(enum.Enum):
    RETRY = "retry the whole shard, alone on an actor"
    SPLIT = "split it: each image alone, once"
    PROBE = "decode the image alone in a child process: an error row only if the decoder crashes"
    LEAVE = "leave its images for the next run (no rows); the run goes on, then fails"
    FAIL_RUN = "give up on the run"


def decide(attempt: int, n_images: int, kind: ErrorKind, max_attempts: int = MAX_SHARD_ATTEMPTS) -> Action:
    """What to do with a shard of ``n_images`` that failed on its ``attempt``-th try.

    A failure before the last attempt is retried. On the last: a shard whose worker died is
    split (several images) or probed (one image); one the machine lost is left for the next run;
    one that timed out or raised (storage unreachable or stalled, access denied) fails the run.
    """
    if attempt < max_attempts:
        return Action.RETRY
    if kind is ErrorKind.DIED:
        return Action.SPLIT if n_images > 1 else Action.PROBE
    if kind is ErrorKind.LOST:
        return Action.LEAVE
    return Action.FAIL_RUN
