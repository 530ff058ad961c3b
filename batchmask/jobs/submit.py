"""``batchmask jobs submit``: a job's run as a Ray Job, one submission per scheduled slot.

The submission id is ``batchmask-<job name>-<slot in UTC, YYYYMMDDTHHMMZ>``. Ray refuses a
second submission with an id it already knows (whatever that job's state), so retrying the
same slot - a cron retry, a double click, two schedulers - never runs it twice.

The job definition travels with the submission: the resolved TOML (absolute local paths) is
written to a temporary folder that Ray uploads as the job's ``working_dir``; the entrypoint
is ``batchmask jobs run --quiet job.toml`` on the cluster, which takes the job lock on the
node running the entrypoint and appends the run to the history in the job's output.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..exits import EXIT_LOCKED
from .schedule import current_slot, is_slot
from .spec import JobSpec, is_url

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SlotAlreadySubmitted(RuntimeError):
    exit_code = EXIT_LOCKED
    """The cluster already has a submission for this job and slot."""


class SubmitError(RuntimeError):
    """The cluster could not be asked (unreachable, authentication, server error)."""


def _is_not_found(exc: BaseException) -> bool:
    """True for the Jobs API's answer to an unknown submission id (HTTP 404)."""
    return isinstance(exc, RuntimeError) and "status code 404" in str(exc)


@dataclass
class Submission:
    submission_id: str
    slot: dt.datetime
    address: str
    entrypoint: str


def _client(address: str):
    """A JobSubmissionClient; like ``ray.init()``, it sends Ray's auth token when one is available.

    Ray >= 2.5x clusters started locally use token authentication by default; the Jobs SDK only
    sends the token when ``RAY_AUTH_MODE=token``. When ``RAY_AUTH_MODE`` is unset and a token exists
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) token mode is switched on
    for this process. ``RAY_AUTH_MODE=disabled`` never sends it.
    """
    if "RAY_AUTH_MODE" not in os.environ:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
            os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submission_id(job: JobSpec, slot: dt.datetime) -> str:
    utc = slot.astimezone(dt.UTC)
    return f"batchmask-{job.name}-{utc:%Y%m%dT%H%M}Z"


def submit_job(
    job: JobSpec,
    address: str,
    *,
    slot: dt.datetime | None = None,
    now: dt.datetime | None = None,
    batchmask: str = "batchmask",
    entrypoint_num_cpus: float | None = None,
) -> Submission:
    """Submit the job's run for ``slot`` (default: the latest scheduled time at or before now).

    Raises ValueError when ``slot`` is not one of the schedule's times (another time would get a
    submission id of its own, so the slot's run could happen twice), :class:`SlotAlreadySubmitted`
    when the cluster knows the id, :class:`SubmitError` when the cluster cannot be asked.
    """
    if slot is None:
        slot = current_slot(job.schedule, job.timezone, now)
    elif not is_slot(job.schedule, job.timezone, slot):
        raise ValueError(f"{slot.isoformat()} is not a scheduled time of job '{job.name}' ('{job.schedule}' {job.timezone})")
    sid = submission_id(job, slot)
    local = [k for k, v in (("input_list" if job.input_list else "input", job.input_where), ("output", job.output))
             if not is_url(v)]
    if local:
        log.warning(
            "job %s: %s %s local path(s); they must exist on the cluster's nodes (shared file system)",
            job.name,
            " and ".join(local),
            "is a" if len(local) == 1 else "are",
        )
    client = _client(address)
    try:
        info = client.get_job_info(sid)
    except Exception as exc:  # noqa: BLE001 - only "not found" means not submitted
        if not _is_not_found(exc):
            raise SubmitError(
                f"cannot check whether {sid} was already submitted to {address} ({type(exc).__name__}: {exc}); "
                "nothing submitted"
            ) from exc
        info = None
    if info is not None:
        raise SlotAlreadySubmitted(f"{sid}: already submitted to {address} (status {info.status}); not run again")
    entrypoint = " ".join(shlex.quote(c) for c in (*shlex.split(batchmask), "jobs", "run", "--quiet", "job.toml"))
    with tempfile.TemporaryDirectory(prefix="batchmask-submit-") as tmp:
        (Path(tmp) / "job.toml").write_text(job.to_toml())
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env={"working_dir": tmp},
                metadata={"batchmask_job": job.name, "slot": slot.isoformat(), "source": job.source},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):
                raise SlotAlreadySubmitted(f"{sid}: already submitted to {address}; not run again") from None
            raise
    return Submission(sid, slot, address, entrypoint)


def wait_for(address: str, sid: str, timeout: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the submission reaches a terminal status (or ``timeout``); return the status."""
    client = _client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(sid)).split(".")[-1]
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return status
        time.sleep(poll_s)


def job_logs(address: str, sid: str) -> str:
    return _client(address).get_job_logs(sid)
