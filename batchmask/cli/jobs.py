"""``batchmask jobs``: validate, list, run, schedule (cron/systemd/k8s) and submit job definitions."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path

import click

from .common import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, exit_code_of

PATHS = click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))


def _load_all(paths: tuple[str, ...]):
    from ..jobs.spec import load_jobs

    jobs, errors = load_jobs(list(paths))
    for err in errors:
        click.echo(f"Error: {err}", err=True)
    if not jobs and not errors:
        click.echo(f"Error: no job files (*.toml) in {', '.join(paths)}", err=True)
        sys.exit(EXIT_FAILED)
    return jobs, errors


def _load_one(path: str):
    from ..jobs.spec import JobError, load_job

    try:
        return load_job(path)
    except JobError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


@click.group("jobs")
def jobs_group() -> None:
    """Scheduled, incremental runs defined by TOML files (see jobs/README.md)."""


@jobs_group.command("validate")
@PATHS
def validate_cmd(paths: tuple[str, ...]) -> None:
    """Check job files (or every *.toml in folders); errors name the file, field and value."""
    jobs, errors = _load_all(paths)
    for job in jobs:
        state = "" if job.enabled else " (disabled)"
        model = f" (model {job.model})" if job.model else ""
        click.echo(
            f"ok {job.source}: {job.name}, '{job.schedule}' {job.timezone}{state}: "
            f"{'' if job.input else 'list '}{job.input_where} -> {job.output}{model}"
        )
    if errors:
        click.echo(f"{len(errors)} invalid, {len(jobs)} valid", err=True)
        sys.exit(EXIT_FAILED)


@jobs_group.command("list")
@PATHS
@click.option("--next", "n_next", default=2, show_default=True, help="How many next run times to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job instead of text.")
def list_cmd(paths: tuple[str, ...], n_next: int, as_json: bool) -> None:
    """Name, schedule, next run times, input, output, and the last run with its result."""
    from ..jobs.execute import last_run
    from ..jobs.schedule import next_runs

    jobs, errors = _load_all(paths)
    for job in jobs:
        nxt = next_runs(job.schedule, job.timezone, n_next) if job.enabled else []
        try:
            last, last_err = last_run(job), None
        except Exception as exc:  # noqa: BLE001 - an unreachable output must not hide the others
            last, last_err = None, f"cannot read history: {exc}"
        if as_json:
            row = {
                "name": job.name,
                "enabled": job.enabled,
                "schedule": job.schedule,
                "timezone": job.timezone,
                "next": [t.isoformat() for t in nxt],
                "input": job.input,
                "input_list": job.input_list,
                "output": job.output,
                "model": job.model,
                "source": job.source,
                "last_run": last,
            }
            if last_err:
                row["last_run_error"] = last_err
            click.echo(json.dumps(row))
            continue
        click.echo(f"{job.name}{'' if job.enabled else '  [disabled]'}")
        click.echo(f"  schedule  {job.schedule}  ({job.timezone})")
        if nxt:
            click.echo(f"  next      {', '.join(t.strftime('%Y-%m-%d %H:%M %Z') for t in nxt)}")
        click.echo(f"  input     {job.input}" if job.input else f"  list      {job.input_list}")
        click.echo(f"  output    {job.output}")
        if job.model:
            click.echo(f"  model     {job.model}")
        if last_err:
            click.echo(f"  last run  ? ({last_err})")
        elif last:
            if last.get("new") is None:  # the run ended without counts (failed, timeout, interrupted)
                what = last.get("error") or "no counts"
            else:
                what = f"{last.get('new')} new, {last.get('ok') or 0} ok, {last.get('failed') or 0} failed"
            click.echo(
                f"  last run  {last.get('start')} -> {last.get('status')} (exit {last.get('exit_code')}): "
                f"{what}, {last.get('duration_s') or 0:.1f} s on {last.get('host')}"
            )
        else:
            click.echo("  last run  never")
    if errors:
        sys.exit(EXIT_FAILED)


@jobs_group.command("run")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True, help="Wait for a running instance of the job instead of exiting with 4.")
@click.option("--wait-timeout", type=float, default=None, help="With --wait: give up (exit 4) after SECONDS.")
@click.option("--locked-ok", is_flag=True,
              help="Exit 0, not 4, when another run holds the lock (for Kubernetes Jobs, which fail on any non-zero).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or info logs; one summary line.")
@click.option(
    "--lock-dir",
    type=click.Path(file_okay=False),
    envvar="BATCHMASK_LOCK_DIR",
    help="Where lock files live [env BATCHMASK_LOCK_DIR; default ~/.local/state/batchmask/locks].",
)
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster to run on [env RAY_ADDRESS].")
@click.option("--force", is_flag=True, help="Run even if the job has enabled = false.")
def run_cmd(
    job_file: str,
    wait: bool,
    wait_timeout: float | None,
    locked_ok: bool,
    quiet: bool,
    lock_dir: str | None,
    address: str | None,
    force: bool,
) -> None:
    """One incremental run now: only images not yet in the job's output are processed.

    Exit codes: 0 ok, 1 failed or timed out, 3 more failed images than max_failures,
    4 another run of this job (or of the output) holds the lock, 5 the run lost the output's lock.
    """
    from ..jobs.execute import JobLocked, run_job

    job = _load_one(job_file)
    if not job.enabled and not force:
        click.echo(f"Error: job '{job.name}' is disabled (enabled = false); use --force to run it", err=True)
        sys.exit(EXIT_FAILED)
    try:
        result = run_job(job, quiet=quiet, address=address, lock_dir=lock_dir, wait=wait, wait_timeout=wait_timeout)
    except JobLocked as exc:
        code = EXIT_OK if locked_ok else exit_code_of(exc)
        click.echo(f"batchmask: {exc}; exit {code}", err=True)
        sys.exit(code)
    click.echo(result.line(), err=result.exit_code != EXIT_OK)
    sys.exit(EXIT_OK if locked_ok and result.exit_code == EXIT_LOCKED else result.exit_code)


@jobs_group.command("crontab")
@PATHS
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["cron", "systemd", "k8s"]),
    default="cron",
    show_default=True,
    help="cron lines, systemd .service/.timer pairs, or Kubernetes CronJobs.",
)
@click.option("--user", default=None, help="User column for /etc/cron.d (default: you); User= for systemd.")
@click.option("--no-user", is_flag=True, help="No user column: a personal crontab (`crontab -`).")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None, help="Per-job log files (cron).")
@click.option("--lock-dir", type=click.Path(file_okay=False), default=None, help="Passed to `jobs run --lock-dir`.")
@click.option("--batchmask", "batchmask_path", default=None, help="Path of the batchmask script to call.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="systemd: write unit files here.")
@click.option("--image", default="batchmask:latest", show_default=True,
              help="k8s: container image (what scripts/build_image.sh tags).")
@click.option("--gpu-image", default="batchmask:latest-gpu", show_default=True,
              help="k8s: image for jobs with gpus_per_worker (scripts/build_image.sh --gpu).")
@click.option("--configmap", default="batchmask-jobs", show_default=True, help="k8s: ConfigMap with the job files.")
@click.option("--secret", default=None, help="k8s: Secret with AWS_* variables, passed as envFrom.")
@click.option("--aws-secret", default="batchmask-aws", show_default=True,
              help="k8s: Secret with AWS `config` and `credentials` files, mounted for jobs with a `profile`.")
def crontab_cmd(
    paths: tuple[str, ...],
    fmt: str,
    user: str | None,
    no_user: bool,
    log_dir: str | None,
    lock_dir: str | None,
    batchmask_path: str | None,
    out_dir: str | None,
    image: str,
    gpu_image: str,
    configmap: str,
    secret: str | None,
    aws_secret: str,
) -> None:
    """Print how to run every enabled job on its schedule, guarded against overlap."""
    from ..jobs.execute import default_log_dir
    from ..jobs.render import find_batchmask, render_crontab, render_k8s, render_systemd

    jobs, errors = _load_all(paths)
    if errors:
        click.echo("Error: fix the job files above first", err=True)
        sys.exit(EXIT_FAILED)
    if fmt == "k8s":
        try:
            text = render_k8s(jobs, image=image, gpu_image=gpu_image, configmap=configmap, secret=secret,
                              aws_secret=aws_secret)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(text, nl=False)
        return
    try:
        exe = os.path.abspath(batchmask_path) if batchmask_path else find_batchmask()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    lock_abs = os.path.abspath(lock_dir) if lock_dir else None
    if fmt == "cron":
        who = None if no_user else (user or getpass.getuser())
        logs = os.path.abspath(log_dir) if log_dir else str(default_log_dir())
        srcs = [os.path.abspath(p) for p in paths]
        try:
            text = render_crontab(jobs, batchmask=exe, log_dir=logs, user=who, lock_dir=lock_abs, sources=srcs)
        except ValueError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        click.echo(text, nl=False)
        return
    try:
        units = render_systemd(jobs, batchmask=exe, user=None if no_user else user, lock_dir=lock_abs)
    except ValueError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            (Path(out_dir) / name).write_text(text)
            click.echo(f"wrote {Path(out_dir) / name}")
        click.echo("enable with: systemctl daemon-reload && systemctl enable --now batchmask-<job>.timer")
        return
    for name, text in units.items():
        click.echo(f"### {name}\n{text}")


@jobs_group.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", envvar="RAY_ADDRESS", required=True, help="Ray dashboard, e.g. http://HEAD:8265.")
@click.option("--slot", default=None, help="Scheduled time to submit (ISO 8601; default: latest slot <= now).")
@click.option("--batchmask", "batchmask_cmd", default="batchmask", show_default=True, help="Command on the cluster.")
@click.option("--wait", is_flag=True, help="Wait for the Ray job to finish; exit 0 only if it SUCCEEDED.")
@click.option("--wait-timeout", type=float, default=None, help="With --wait: stop waiting after SECONDS.")
def submit_cmd(
    job_file: str, address: str, slot: str | None, batchmask_cmd: str, wait: bool, wait_timeout: float | None
) -> None:
    """Submit one run as a Ray Job; a second submission of the same slot is refused (exit 4)."""
    from ..jobs.schedule import current_slot, is_slot, next_runs
    from ..jobs.submit import SlotAlreadySubmitted, submit_job, wait_for

    job = _load_one(job_file)
    when = None
    if slot:
        try:
            when = dt.datetime.fromisoformat(slot)
        except ValueError:
            raise click.BadParameter(f"{slot!r} is not an ISO 8601 time", param_hint="--slot") from None
        if when.tzinfo is None:
            from zoneinfo import ZoneInfo

            when = when.replace(tzinfo=ZoneInfo(job.timezone))
        if not is_slot(job.schedule, job.timezone, when):
            # another time would get a submission id of its own: the slot's run could happen twice
            before = current_slot(job.schedule, job.timezone, now=when)
            after = next_runs(job.schedule, job.timezone, 1, now=when)[0]
            raise click.BadParameter(
                f"{slot!r} is not a scheduled time of job '{job.name}' ('{job.schedule}' {job.timezone}); "
                f"the nearest are {before.isoformat()} and {after.isoformat()}",
                param_hint="--slot",
            )
    try:
        sub = submit_job(job, address, slot=when, batchmask=batchmask_cmd)
    except SlotAlreadySubmitted as exc:
        click.echo(f"batchmask: {exc}; exit {exit_code_of(exc)}", err=True)
        sys.exit(exit_code_of(exc))
    except (RuntimeError, ConnectionError, OSError) as exc:
        click.echo(f"Error: cannot submit to {address}: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"submitted {sub.submission_id} (slot {sub.slot.isoformat()}) to {address}")
    if wait:
        status = wait_for(address, sub.submission_id, wait_timeout)
        click.echo(f"{sub.submission_id}: {status}")
        sys.exit(EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED)
