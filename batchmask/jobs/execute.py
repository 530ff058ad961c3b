"""Running a job once: per-job lock, timeout watchdog, run history.

``run_job`` holds an ``fcntl.flock`` lock on ``<lock dir>/<job name>.lock`` for the whole run
(the kernel drops it when the process dies, so a crashed run never leaves a stale lock), runs
:func:`batchmask.batch.runner.run` in a child process (its own process group, so a timeout or a
SIGTERM stops the run and everything it started), then appends one JSON line to
``<output>/job_history.jsonl``.

The child is this module run as a script: ``python -m batchmask.jobs.execute REQUEST.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exits import EXIT_FAILED, EXIT_IMAGES_FAILED, EXIT_LOCK_LOST, EXIT_LOCKED, EXIT_OK, exit_code_of
from .schedule import iso, utcnow
from .spec import JobSpec

log = logging.getLogger(__name__)

HISTORY_FILE = "job_history.jsonl"
#: history keeps this many most recent records (each rewrite is one PUT on S3)
HISTORY_KEEP = 10_000
#: seconds between SIGTERM and SIGKILL when a run is stopped
KILL_GRACE_S = 15.0


class JobLocked(RuntimeError):
    """Another process holds the job's lock."""

    exit_code = EXIT_LOCKED

    def __init__(self, name: str, lock_path: Path, holder: dict[str, Any] | None):
        self.name, self.lock_path, self.holder = name, lock_path, holder or {}
        who = ""
        if self.holder:
            who = f" (pid {self.holder.get('pid', '?')} on {self.holder.get('host', '?')} since {self.holder.get('since', '?')})"
        super().__init__(f"job '{name}' is already running{who}; lock {lock_path}")


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "batchmask"


def default_lock_dir() -> Path:
    """``$BATCHMASK_LOCK_DIR``, else ``${XDG_STATE_HOME:-~/.local/state}/batchmask/locks``."""
    env = os.environ.get("BATCHMASK_LOCK_DIR")
    return Path(env) if env else state_dir() / "locks"


def default_log_dir() -> Path:
    return state_dir() / "logs"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def job_lock(
    name: str, lock_dir: str | os.PathLike | None = None, wait: bool = False, wait_timeout: float | None = None
) -> Iterator[Path]:
    """Hold the job's exclusive lock; raise :class:`JobLocked` if busy (after ``wait_timeout``)."""
    d = Path(lock_dir) if lock_dir else default_lock_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    raise JobLocked(name, path, _read_holder(fd)) from None
                time.sleep(0.2)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": iso(utcnow())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- history


def _storage(job: JobSpec):
    """The job's output as a :class:`batchmask.batch.storage.Storage` (atomic writes: rename / one PUT)."""
    from ..batch.storage import StorageSpec

    opts = {"profile": job.profile} if job.profile else {}
    return StorageSpec(url=job.output, endpoint_url=job.endpoint_url, storage_options=opts).open()


def history_location(job: JobSpec) -> str:
    return job.output.rstrip("/") + "/" + HISTORY_FILE


def read_history(job: JobSpec) -> list[dict[str, Any]]:
    """Every record in the job's history (oldest first); [] when there is none yet."""
    try:
        text = _storage(job).read_bytes(HISTORY_FILE).decode()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def last_run(job: JobSpec) -> dict[str, Any] | None:
    hist = read_history(job)
    return hist[-1] if hist else None


def append_history(job: JobSpec, record: dict[str, Any]) -> str:
    """Append one record; the file is rewritten whole (local: temp file + rename; S3: one PUT).

    Callers hold the job lock, so the read-modify-write cannot lose a concurrent record.
    """
    old = read_history(job)[-(HISTORY_KEEP - 1) :]
    data = "".join(json.dumps(r) + "\n" for r in [*old, record])
    store = _storage(job)
    store.ensure_root()
    store.write_bytes(HISTORY_FILE, data.encode())
    return history_location(job)


# ---------------------------------------------------------------- running


@dataclass
class JobResult:
    exit_code: int
    record: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        r = self.record
        if r.get("new") is None and r.get("error"):  # no counts: the run ended without a summary
            what = f"{r['status']}: {r['error']}"
        else:
            what = (
                f"{r.get('new', 0)} new ({r.get('ok', 0)} ok, {r.get('failed', 0)} failed), "
                f"{r.get('skipped', 0)} already done"
            )
        return f"job {r.get('job')}: {what}; {r.get('duration_s', 0):.1f} s, exit {self.exit_code}"


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Leftovers of the group (e.g. processes the runner started) go too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def exit_code_for(summary: dict[str, Any], max_failures: int) -> tuple[int, str]:
    """The job's exit code and status from the runner's summary and the job's ``max_failures``."""
    failed = int(summary.get("failed", 0))
    code = int(summary.get("exit_code", EXIT_OK))
    if failed > max_failures:
        return EXIT_IMAGES_FAILED, "images_failed"
    if code in (EXIT_OK, EXIT_IMAGES_FAILED):
        return EXIT_OK, "ok"
    return code, "failed"


def run_job(
    job: JobSpec,
    *,
    quiet: bool = False,
    address: str | None = None,
    lock_dir: str | os.PathLike | None = None,
    wait: bool = False,
    wait_timeout: float | None = None,
    extra: dict[str, Any] | None = None,
) -> JobResult:
    """One incremental run of ``job`` under its lock; raises :class:`JobLocked` if busy.

    ``wait_timeout`` is one deadline for both waits, the job's lock and then the output's.
    """
    t_wait = time.monotonic()
    with job_lock(job.name, lock_dir, wait=wait, wait_timeout=wait_timeout):
        start = utcnow()
        t0 = time.monotonic()
        left = None if wait_timeout is None else max(0.0, wait_timeout - (t0 - t_wait))
        outcome = _run_child(job, quiet=quiet, address=address,
                             wait={"wait": True, "wait_timeout": left} if wait else None)
        end = utcnow()
        record: dict[str, Any] = {
            "job": job.name,
            "start": iso(start),
            "end": iso(end),
            "duration_s": round(time.monotonic() - t0, 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        summary = outcome.get("summary")
        if summary is not None:
            code, status = exit_code_for(summary, job.max_failures)
            ok, failed, skipped = (int(summary.get(k, 0)) for k in ("ok", "failed", "skipped"))
            record.update(
                status=status,
                exit_code=code,
                new=ok + failed,
                ok=ok,
                failed=failed,
                skipped=skipped,
                total=int(summary.get("total", ok + failed + skipped)),
                images_per_s=summary.get("images_per_s"),
                error=f"the run exited with code {code}" if status == "failed" else None,
            )
        else:
            # No summary (the run failed, timed out or was interrupted): the counts are unknown.
            # Images finished before a timeout are kept, so 0 would be wrong: null instead.
            # Another run (cron plus a manual one, or a job sharing the output) holds the output's
            # lock: exit 4, like the job's own lock.
            code = {"locked": EXIT_LOCKED, "lock_lost": EXIT_LOCK_LOST}.get(outcome.get("status"), EXIT_FAILED)
            record.update(
                status=outcome.get("status", "failed"),
                exit_code=code,
                new=None,
                ok=None,
                failed=None,
                skipped=None,
                total=None,
                images_per_s=None,
                error=outcome.get("error", "the run failed"),
            )
            if "run_pid" in outcome:  # the stopped run's process (group): for whoever looks into it
                record["run_pid"] = outcome["run_pid"]
        from ..version import __version__

        record["batchmask_version"] = __version__
        if extra:
            record.update(extra)
        try:
            append_history(job, record)
        except Exception as exc:  # noqa: BLE001 - reported, and the run is marked failed
            log.error("job %s: could not write the run history to %s: %s", job.name, history_location(job), exc)
            if code == EXIT_OK:
                code = EXIT_FAILED
            record["exit_code"] = code
        return JobResult(code, record)


def _run_child(job: JobSpec, *, quiet: bool, address: str | None, wait: dict | None = None) -> dict[str, Any]:
    """Run the runner in a child process group; {"summary": ...} or {"status", "error"}."""
    kwargs = job.runner_kwargs()
    kwargs["quiet"] = quiet
    if wait:
        kwargs.update(wait)
    if address:
        kwargs["address"] = address
    with tempfile.TemporaryDirectory(prefix="batchmask-job-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"kwargs": kwargs, "result": str(res)}))
        # --quiet: one summary line from the parent; what the child writes (its warnings, Ray's and
        # TensorFlow's lines, a traceback) goes to the parent's debug log instead of the terminal.
        errf = open(Path(tmp) / "stderr.txt", "w+b") if quiet else None  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "batchmask.jobs.execute", str(req)], start_new_session=True,
                                stdout=errf, stderr=errf)
        stop: list[int] = []

        def _on_signal(signum, _frame):  # forward SIGTERM/SIGINT: stop the run, still record it
            stop.append(signum)

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        deadline = None if job.timeout is None else time.monotonic() + job.timeout
        status = None
        try:
            while proc.poll() is None:
                if stop:
                    status = "interrupted"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    status = "timeout"
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
            if status:
                log.log(logging.INFO if quiet else logging.WARNING, "job %s: %s, stopping the run (pid %d)",
                        job.name, status, proc.pid)
                _kill_group(proc, KILL_GRACE_S)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if errf is not None:
                errf.seek(0)
                text = errf.read().decode("utf-8", "replace").strip()
                errf.close()
                if text:
                    log.debug("job %s: the run process wrote:\n%s", job.name, text[-4000:])
        if status == "timeout":
            return {"status": "timeout", "error": f"stopped after the job's timeout of {job.timeout:g} s",
                    "run_pid": proc.pid}
        if status == "interrupted":
            return {"status": "interrupted", "error": f"stopped by signal {stop[0]}", "run_pid": proc.pid}
        try:
            result = json.loads(res.read_text())
        except (OSError, ValueError):
            result = {"error": f"the run process exited with code {proc.returncode} and no result"}
        if "summary" not in result:
            result.setdefault("status", "failed")
        return result


def _child_main(argv: list[str]) -> int:
    """Child side: call the runner and write its summary (never secrets) to the result file."""
    request = json.loads(Path(argv[0]).read_text())
    result_path = Path(request["result"])
    kwargs = request["kwargs"]
    logging.basicConfig(
        level=logging.WARNING if kwargs.get("quiet") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ..tfquiet import install

    install()
    try:
        from ..batch.runner import run

        summary = run(**kwargs)
        raw = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(vars(summary))
        data = {k: v for k, v in raw.items() if k != "run_json"}
        result_path.write_text(json.dumps({"summary": data}, default=str))
        return 0
    except KeyboardInterrupt as exc:  # SIGTERM from the parent (timeout, its own signal): no traceback
        result_path.write_text(json.dumps({"status": "interrupted", "error": f"interrupted ({exc or 'Ctrl-C'})"}))
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
        from ..batch.lock import LockLost, OutputLocked
        from ..batch.runner import RunError
        from ..batch.storage import StorageError, redact_urls
        from ..inference import ModelNotFoundError

        if isinstance(exc, OutputLocked):
            result_path.write_text(json.dumps({"status": "locked", "error": str(exc)}))
            return exit_code_of(exc)
        if isinstance(exc, LockLost):
            result_path.write_text(json.dumps({"status": "lock_lost", "error": redact_urls(str(exc))}))
            return exit_code_of(exc)
        if not isinstance(exc, (RunError, StorageError, ModelNotFoundError)):
            log.exception("the run failed")  # unexpected: keep the traceback in the log
        result_path.write_text(json.dumps({"error": f"{type(exc).__name__}: {redact_urls(str(exc))}"}))
        return 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
