"""What a failed shard means: the driver's retry-and-split policy, as a pure function.

The driver owns every retry (Ray's ``max_task_retries`` is 0). A shard that failed is retried
*alone* on an actor (nothing else in flight there), so a worker death during a retry is that
shard's doing. After ``MAX_SHARD_ATTEMPTS`` deaths the shard is split into single images, each
tried alone once; an image whose worker still dies becomes an error row. A shard that keeps
timing out, or raising, fails the run: that is the storage's doing, not the image's.
:class:`~batchmask.batch.dispatch.Dispatcher` applies :func:`decide`; tests call it directly.
"""

from __future__ import annotations

import enum

#: Shards in flight per actor (one being processed, one queued behind it).
INFLIGHT_PER_ACTOR = 2
#: A failed shard is tried again, alone on its actor, up to this many attempts in all; a shard
#: whose worker died every time is then split into single images, each tried alone once, and an
#: image that still kills its worker becomes an error row.
MAX_SHARD_ATTEMPTS = 2


class ErrorKind(enum.Enum):
    DIED = "the worker process died"
    TIMED_OUT = "no progress within --shard-timeout"
    ERROR = "an exception in the worker"


class Action(enum.Enum):
    RETRY = "retry the whole shard, alone on an actor"
    SPLIT = "split it: each image alone, once"
    ERROR_ROWS = "give up on its images: error rows, the run goes on"
    FAIL_RUN = "give up on the run"


def decide(attempt: int, n_images: int, kind: ErrorKind, max_attempts: int = MAX_SHARD_ATTEMPTS) -> Action:
    """What to do with a shard of ``n_images`` that failed on its ``attempt``-th try.

    A shard that timed out ``max_attempts`` times fails the run (a storage problem, not the
    image's fault); a failure before the last attempt is retried; a shard whose worker died
    every time is split (several images) or becomes error rows (one image); an exception on the
    last attempt (e.g. storage unreachable, access denied) fails the run.
    """
    if attempt < max_attempts:
        return Action.RETRY
    if kind is ErrorKind.DIED:
        return Action.SPLIT if n_images > 1 else Action.ERROR_ROWS
    return Action.FAIL_RUN
