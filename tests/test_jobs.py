"""Job definitions, schedules, crontab/systemd/k8s rendering and the lock (no runner needed)."""

from __future__ import annotations

import configparser
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from croniter import croniter

from batchmask.cli import main
from batchmask.cli.common import EXIT_FAILED, EXIT_LOCKED
from batchmask.jobs.execute import JobLocked, append_history, exit_code_for, job_lock, read_history
from batchmask.jobs.schedule import current_slot, next_runs, to_on_calendar, validate_cron
from batchmask.jobs.spec import JobError, load_job, load_jobs, parse_duration
from batchmask.jobs.submit import submission_id

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"

GOOD = """
name = "cam-drops"
schedule = "*/5 * * * *"
timezone = "Europe/Paris"
input = "in"
output = "../out"
workers = 2
batch_size = 4
max_failures = 3
timeout = "45m"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(path: Path) -> str:
    with pytest.raises(JobError) as ei:
        load_job(path)
    return str(ei.value)


# ----------------------------------------------------------------- definitions


def test_shipped_examples_validate_with_the_cli():
    res = CliRunner().invoke(main, ["jobs", "validate", str(JOBS)])
    assert res.exit_code == 0, res.output
    jobs, errors = load_jobs([JOBS])
    assert not errors
    assert len(jobs) >= 2
    local = [j for j in jobs if not j.input_where.startswith("s3://")]
    remote = [j for j in jobs if j.input_where.startswith("s3://") and j.output.startswith("s3://")]
    assert local and remote and any(j.input_list for j in remote)
    # the local example points at the demo images, relative to the job file
    demo = next(j for j in local if j.name == "demo-wider")
    assert demo.input == str(REPO / "demo" / "wider" / "images")
    assert Path(demo.input).is_dir()
    assert "../demo/wider/images" in (JOBS / "demo-wider.toml").read_text()


def test_good_definition_and_relative_paths(tmp_path):
    sub = tmp_path / "defs"
    sub.mkdir()
    job = load_job(write(sub, GOOD))
    assert job.name == "cam-drops"
    assert job.input == str(sub / "in")  # relative to the job file, not the cwd
    assert job.output == str(tmp_path / "out")
    assert (job.workers, job.batch_size, job.max_failures, job.timeout) == (2, 4, 3, 2700.0)
    assert job.enabled and job.model is None and not job.overlays
    kw = job.runner_kwargs()
    assert kw["input"] == job.input and kw["storage_options"] is None
    # the TOML written for Ray submission reads back to the same job
    again = load_job(write(sub, job.to_toml(), "again.toml"))
    assert again.to_dict() | {"source": ""} == job.to_dict() | {"source": ""}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('colour = "red"', "unknown field 'colour'"),
        ('aws_secret_access_key = "abc"', "secrets are never stored in job files"),
        ("workers = \"4\"", "field 'workers' = '4': expected an integer, got str"),
        ("workers = 0", "field 'workers' = 0: must be at least 1"),
        ("overlays = 1", "field 'overlays' = 1: expected true or false"),
        ("batch_size = true", "field 'batch_size' = True: expected an integer, got bool"),
        ("threshold = 1.5", "field 'threshold' = 1.5: must be between 0 and 1"),
        ('timeout = "soon"', "field 'timeout' = 'soon'"),
        ("timeout = -3", "field 'timeout' = -3: must be more than 0 seconds"),
        ('timezone = "Mars/Olympus"', "field 'timezone' = 'Mars/Olympus': unknown timezone"),
        ('endpoint_url = "ftp://x"', "field 'endpoint_url' = 'ftp://x'"),
    ],
)
def test_invalid_fields_name_file_field_and_value(tmp_path, line, expected):
    key = line.split("=")[0].strip()
    base = "\n".join(ln for ln in GOOD.splitlines() if not ln.startswith(key + " "))
    p = write(tmp_path, base + "\n" + line + "\n")
    msg = problems(p)
    assert str(p) in msg
    assert expected in msg


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("61 * * * *", "minute field '61': 61 out of range 0-59"),
        ("* * * *", "expected 5 fields"),
        ("@daily", "'@' shortcuts are not accepted"),
        ("0 0 L * *", "day of month field 'L'"),
        ("5/15 * * * *", "write '5/15' as '5-59/15'"),
        ("0 12-3 * * *", "goes backwards"),
        ("0 0 * * 8", "out of range 0-7"),
    ],
)
def test_bad_cron_expressions(tmp_path, expr, expected):
    text = GOOD.replace('"*/5 * * * *"', json.dumps(expr))
    msg = problems(write(tmp_path, text))
    assert f"field 'schedule' = {expr!r}" in msg
    assert expected in msg


def test_missing_fields_secrets_in_urls_and_all_problems_listed(tmp_path):
    p = write(tmp_path, 'name = "Bad Name"\nschedule = "* * * * *"\ninput = "s3://AKIA:sekret@bucket/x"\n')
    msg = problems(p)
    assert "missing required field 'output'" in msg
    p = write(
        tmp_path,
        'name = "Bad Name"\nschedule = "* * * * *"\ninput = "s3://AKIA:sekret@bucket/x"\noutput = "o"\n'
        'profile = "p"\n',
    )
    msg = problems(p)
    assert "field 'name' = 'Bad Name'" in msg
    assert "credentials in the URL" in msg and "sekret" not in msg
    # profile is fine with an s3:// input; endpoint_url/profile on a purely local job are not
    p2 = write(tmp_path, GOOD + 'profile = "p"\n', "local.toml")
    assert "field 'profile' = 'p': only used with s3://" in problems(p2)
    p2 = write(tmp_path, GOOD.replace('output = "../out"', 'output = "gs://b/out"') + 'profile = "p"\n', "gs.toml")
    assert "field 'profile' = 'p': only used with s3://" in problems(p2)
    p3 = write(tmp_path, "name = [", "broken.toml")
    assert "invalid TOML" in problems(p3)


def test_validate_cli_reports_errors_and_duplicate_names(tmp_path):
    write(tmp_path, GOOD, "a.toml")
    write(tmp_path, GOOD, "b.toml")  # same name
    write(tmp_path, GOOD.replace("*/5", "*/75"), "c.toml")
    res = CliRunner().invoke(main, ["jobs", "validate", str(tmp_path)])
    assert res.exit_code == EXIT_FAILED
    assert f"{tmp_path / 'b.toml'}: field 'name' = 'cam-drops': already used by" in res.output
    assert f"{tmp_path / 'c.toml'}: field 'schedule' = '*/75 * * * *'" in res.output
    assert f"ok {tmp_path / 'a.toml'}: cam-drops, '*/5 * * * *' Europe/Paris: {tmp_path / 'in'} -> {tmp_path.parent / 'out'}" in res.output


def test_parse_duration():
    assert parse_duration(90) == 90
    assert parse_duration("2h") == 7200
    assert parse_duration("1.5m") == 90
    with pytest.raises(ValueError):
        parse_duration("0s")


# ----------------------------------------------------------------- schedules


def test_next_runs_and_slots_follow_timezone_and_dst():
    # Europe/Paris leaves summer time on 2026-10-25 (02:30 happens twice: croniter lists both)
    now = dt.datetime(2026, 10, 25, 1, 0, tzinfo=dt.UTC)
    runs = next_runs("30 2 * * *", "Europe/Paris", 2, now=now)
    assert [r.astimezone(dt.UTC).strftime("%d %H:%M") for r in runs] == ["25 01:30", "26 01:30"]
    assert [r.strftime("%H:%M %Z") for r in runs] == ["02:30 CET", "02:30 CET"]
    # ... and enters it on 2026-03-29: 02:30 does not exist, the run moves to 03:00 local
    runs = next_runs("30 2 * * *", "Europe/Paris", 2, now=dt.datetime(2026, 3, 28, 12, 0, tzinfo=dt.UTC))
    assert [r.strftime("%d %H:%M %Z") for r in runs] == ["29 03:00 CEST", "30 02:30 CEST"]
    slot = current_slot("*/15 * * * *", "UTC", now=dt.datetime(2026, 1, 1, 10, 14, 59, tzinfo=dt.UTC))
    assert slot == dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC)
    on = current_slot("*/15 * * * *", "UTC", now=dt.datetime(2026, 1, 1, 10, 15, 20, tzinfo=dt.UTC))
    assert on.minute == 15


def test_submission_id_is_per_slot(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    slot = dt.datetime(2026, 3, 1, 2, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert submission_id(job, slot) == "batchmask-cam-drops-20260301T0130Z"
    assert submission_id(job, slot + dt.timedelta(minutes=5)) != submission_id(job, slot)


def test_on_calendar_conversion():
    assert to_on_calendar("30 2 * * *", "Europe/Paris") == "*-*-* 02:30:00 Europe/Paris"
    assert to_on_calendar("*/20 8-10 * * 1-5") == "Mon,Tue,Wed,Thu,Fri *-*-* 08,09,10:00,20,40:00 UTC"
    assert to_on_calendar("0 0 1 */3 *") == "*-01,04,07,10-01 00:00:00 UTC"
    assert to_on_calendar("0 0 * * 0,7") == "Sun *-*-* 00:00:00 UTC"
    with pytest.raises(ValueError, match="day-of-month OR day-of-week"):
        to_on_calendar("0 0 1 * 1")


# ----------------------------------------------------------------- rendering


def _parse_cron_table(text: str) -> tuple[dict[str, str], list[list[str]]]:
    env: dict[str, str] = {}
    lines: list[list[str]] = []
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        head = s.split(None, 1)[0]
        if "=" in head and not head[0].isdigit() and not head.startswith("*"):
            k, v = s.split("=", 1)
            env[k] = v
            continue
        lines.append(s.split(None, 6))
    return env, lines


def test_crontab_lines_parse_back(tmp_path):
    d = tmp_path / "50%-jobs"  # '%' must be escaped for cron
    d.mkdir()
    write(d, GOOD, "a.toml")
    write(d, GOOD.replace("cam-drops", "night").replace("*/5 * * * *", "30 2 * * 1-5"), "b.toml")
    write(d, GOOD.replace("cam-drops", "off") + "enabled = false\n", "c.toml")
    logs = tmp_path / "logs"
    res = CliRunner().invoke(main, ["jobs", "crontab", str(d), "--user", "batch", "--log-dir", str(logs)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert text.startswith("# batchmask jobs")
    env, lines = _parse_cron_table(text)
    assert env["SHELL"] == "/bin/sh" and env["CRON_TZ"] in ("Europe/Paris",)
    assert len(lines) == 2  # the disabled job has no line
    assert "# disabled (no line): off" in text
    for fields in lines:
        expr = " ".join(fields[:5])
        assert croniter.is_valid(expr)
        validate_cron(expr)
        assert fields[5] == "batch"
        cmd = fields[6]
        assert "\\%" in cmd and "50%" not in cmd.replace("\\%", "")
        argv = shlex.split(cmd.replace("\\%", "%"))
        exe = argv[0]
        assert os.path.isabs(exe) and os.access(exe, os.X_OK) and Path(exe).name == "batchmask"
        assert argv[1:4] == ["jobs", "run", "--quiet"]
        assert Path(argv[4]).is_absolute() and Path(argv[4]).is_file()
        assert argv[5] == ">>" and argv[6].startswith(str(logs)) and argv[6].endswith(".log")
        assert argv[7] == "2>&1"
    assert [" ".join(f[:5]) for f in lines] == ["*/5 * * * *", "30 2 * * 1-5"]
    # a personal crontab has no user column
    res = CliRunner().invoke(main, ["jobs", "crontab", str(d), "--no-user", "--log-dir", str(logs)])
    _, lines = _parse_cron_table(res.output)
    assert all(Path(f[5]).name == "batchmask" for f in lines)


def test_systemd_and_k8s_formats(tmp_path):
    write(tmp_path, GOOD, "a.toml")
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "systemd", "--out-dir", str(tmp_path / "u"), str(tmp_path)])
    assert res.exit_code == 0, res.output
    timer = configparser.ConfigParser(interpolation=None)
    timer.read(tmp_path / "u" / "batchmask-cam-drops.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* *:00,05,10,15,20,25,30,35,40,45,50,55:00 Europe/Paris"
    service = configparser.ConfigParser(interpolation=None)
    service.read(tmp_path / "u" / "batchmask-cam-drops.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].split()[1:4] == ["jobs", "run", "--quiet"]
    assert service["Service"]["TimeoutStartSec"] == "2760s"

    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "k8s", "--secret", "s3-creds", str(tmp_path)])
    assert res.exit_code == 0, res.output
    docs = [d for d in yaml.safe_load_all(res.output) if d]
    assert len(docs) == 1
    cj = docs[0]
    assert cj["kind"] == "CronJob" and cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert cj["spec"]["schedule"] == "*/5 * * * *" and cj["spec"]["timeZone"] == "Europe/Paris"
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][-1] == "/etc/batchmask/jobs/a.toml"
    assert pod["containers"][0]["envFrom"][0]["secretRef"]["name"] == "s3-creds"

    # a schedule systemd cannot express is a clear error
    write(tmp_path, GOOD.replace("*/5 * * * *", "0 0 1 * 1"), "a.toml")
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "systemd", str(tmp_path)])
    assert res.exit_code == EXIT_FAILED
    assert "job 'cam-drops'" in res.output and "OR day-of-week" in res.output


# ----------------------------------------------------------------- lock, history


def test_lock_is_exclusive_and_released_on_process_death(tmp_path):
    with job_lock("j", tmp_path) as path, pytest.raises(JobLocked) as ei, job_lock("j", tmp_path):
        pass
    assert ei.value.holder["pid"] == os.getpid()
    assert str(path) in str(ei.value)
    with job_lock("j", tmp_path):  # released after the with block
        pass
    # a holder killed with SIGKILL leaves no stale lock
    code = (
        "import sys, time; from batchmask.jobs.execute import job_lock\n"
        f"with job_lock('k', {str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(JobLocked), job_lock("k", tmp_path):
            pass
        t0 = time.monotonic()
        with pytest.raises(JobLocked), job_lock("k", tmp_path, wait=True, wait_timeout=0.5):
            pass
        assert time.monotonic() - t0 >= 0.5
        proc.kill()
        proc.wait()
        with job_lock("k", tmp_path, wait=True, wait_timeout=5):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_locked_run_exits_with_documented_code(tmp_path):
    job_file = write(tmp_path, GOOD)
    with job_lock("cam-drops", tmp_path / "locks"):
        res = subprocess.run(
            [sys.executable, "-c", "from batchmask.cli import main; main()", "jobs", "run", "--quiet",
             "--lock-dir", str(tmp_path / "locks"), str(job_file)],
            capture_output=True, text=True, timeout=120,
        )
    assert res.returncode == EXIT_LOCKED
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "job 'cam-drops' is already running" in lines[0]
    assert f"pid {os.getpid()}" in lines[0]


def test_history_append_is_atomic_and_listed(tmp_path):
    job = load_job(write(tmp_path, GOOD))
    assert read_history(job) == []
    for i in range(3):
        append_history(job, {"job": job.name, "start": f"t{i}", "status": "ok", "exit_code": 0, "new": i,
                             "ok": i, "failed": 0, "duration_s": 1.0, "host": "h"})
    hist = read_history(job)
    assert [r["start"] for r in hist] == ["t0", "t1", "t2"]
    out = Path(job.output)
    assert sorted(p.name for p in out.iterdir()) == ["job_history.jsonl"]  # no temp files left
    res = CliRunner().invoke(main, ["jobs", "list", str(tmp_path / "job.toml")])
    assert res.exit_code == 0
    assert "last run  t2 -> ok (exit 0): 2 new, 2 ok, 0 failed" in res.output
    res = CliRunner().invoke(main, ["jobs", "list", "--json", str(tmp_path / "job.toml")])
    row = json.loads(res.output)
    assert row["last_run"]["start"] == "t2" and len(row["next"]) == 2


def test_exit_code_respects_max_failures():
    assert exit_code_for({"failed": 2, "exit_code": 3}, 5) == (0, "ok")
    assert exit_code_for({"failed": 6, "exit_code": 3}, 5) == (3, "images_failed")
    assert exit_code_for({"failed": 0, "exit_code": 0}, 0) == (0, "ok")
    assert exit_code_for({"failed": 0, "exit_code": 1}, 0) == (1, "failed")


# ----------------------------------------------------------------- review fixes


def test_all_problems_in_one_pass_and_unknown_values_never_echoed(tmp_path):
    text = (
        GOOD.replace("workers = 2", 'workers = "two"').replace('"*/5 * * * *"', '"61 * * * *"')
        + 'aws_access = "AKIAEXAMPLE123"\nthreshold = 2.0\n[extra]\na = 1\n[more]\nb = 2\n'
    )
    msg = problems(write(tmp_path, text))
    for expected in (
        "field 'workers' = 'two': expected an integer",
        "field 'schedule' = '61 * * * *'",
        "unknown field 'aws_access'",
        "field 'threshold' = 2.0: must be between 0 and 1",
        "unexpected table [extra]",
        "unexpected table [more]",
    ):
        assert expected in msg, msg
    assert "AKIA" not in msg
    # a wrongly typed field is reported once, its value checks skipped
    msg = problems(write(tmp_path, GOOD.replace("timeout = \"45m\"", "timeout = true")))
    assert msg.count("'timeout'") == 1


def test_job_name_length_fits_kubernetes(tmp_path):
    from batchmask.jobs.render import render_k8s

    longest = "a" * 41 + "b"
    job = load_job(write(tmp_path, GOOD.replace("cam-drops", longest)))
    (doc,) = [d for d in yaml.safe_load_all(render_k8s([job], image="i")) if d]
    assert doc["metadata"]["name"] == f"batchmask-{longest}" and len(doc["metadata"]["name"]) == 52
    assert "use 1-42 lowercase" in problems(write(tmp_path, GOOD.replace("cam-drops", longest + "c")))
    assert "field 'name'" in problems(write(tmp_path, GOOD.replace("cam-drops", "cam-")))


@pytest.mark.parametrize(
    "outcome",
    [{"status": "timeout", "error": "stopped"}, {"summary": {"ok": 2, "failed": 0, "skipped": 1, "total": 3,
                                                             "images_per_s": 1.5, "exit_code": 0}}],
)
def test_history_record_always_has_every_key(tmp_path, monkeypatch, outcome):
    import batchmask.jobs.execute as jx

    sub = tmp_path / "d"  # output "../out" = tmp_path / "out", this test's own
    sub.mkdir()
    job = load_job(write(sub, GOOD))
    monkeypatch.setattr(jx, "_run_child", lambda *a, **k: dict(outcome))
    result = jx.run_job(job, lock_dir=tmp_path / "locks")
    keys = {"job", "start", "end", "duration_s", "host", "pid", "status", "exit_code", "new", "ok", "failed",
            "skipped", "total", "images_per_s", "error", "batchmask_version"}
    (rec,) = read_history(job)
    assert set(rec) == keys
    if "summary" in outcome:
        assert (rec["status"], rec["total"], rec["images_per_s"], rec["error"]) == ("ok", 3, 1.5, None)
    else:
        assert (rec["status"], rec["total"], rec["new"], rec["error"]) == ("timeout", None, None, "stopped")
        assert "timeout: stopped" in result.line()
        res = CliRunner().invoke(main, ["jobs", "list", str(sub / "job.toml")])
        assert "-> timeout (exit 1): stopped" in res.output


class _FakeClient:
    def __init__(self, error: str | None = None, info=None):
        self.error, self.info, self.submitted = error, info, []

    def get_job_info(self, sid):
        if self.error:
            raise RuntimeError(self.error)
        return self.info

    def submit_job(self, **kw):
        self.submitted.append(kw["submission_id"])


def test_submit_slot_must_be_scheduled_and_only_not_found_means_absent(tmp_path, monkeypatch):
    import batchmask.jobs.submit as js
    from batchmask.jobs.schedule import is_slot

    assert is_slot("30 2 * * *", "Europe/Paris", dt.datetime(2026, 1, 5, 2, 30))
    assert is_slot("30 2 * * *", "Europe/Paris", dt.datetime(2026, 1, 5, 1, 30, 20, tzinfo=dt.UTC))
    assert not is_slot("30 2 * * *", "Europe/Paris", dt.datetime(2026, 1, 5, 2, 31))
    assert is_slot("30 2 * * *", "Europe/Paris", dt.datetime(2026, 3, 29, 3, 0))  # spring: 02:30 -> 03:00

    job_file = write(tmp_path, GOOD.replace("input = \"in\"", "input = \"s3://b/in\""))
    job = load_job(job_file)
    fake = _FakeClient("Request failed with status code 404: Job x does not exist.")
    monkeypatch.setattr(js, "_client", lambda address: fake)
    res = CliRunner().invoke(main, ["jobs", "submit", str(job_file), "--address", "http://h:8265",
                                    "--slot", "2026-01-05T02:32"])
    assert res.exit_code == 2 and "not a scheduled time of job 'cam-drops'" in res.output
    assert not fake.submitted
    with pytest.raises(ValueError, match="not a scheduled time"):
        js.submit_job(job, "http://h", slot=dt.datetime(2026, 1, 5, 2, 32, tzinfo=dt.UTC))
    sub = js.submit_job(job, "http://h", slot=dt.datetime(2026, 1, 5, 2, 35, tzinfo=dt.UTC))
    assert fake.submitted == [sub.submission_id]
    # an error other than "not found" is not "not submitted": nothing is submitted
    fake = _FakeClient("Request failed with status code 401: Unauthorized.")
    res = CliRunner().invoke(main, ["jobs", "submit", str(job_file), "--address", "http://h:8265"])
    assert res.exit_code == EXIT_FAILED and "cannot check whether" in res.output and "401" in res.output
    assert not fake.submitted
    fake = _FakeClient(info=type("Info", (), {"status": "RUNNING"})())
    res = CliRunner().invoke(main, ["jobs", "submit", str(job_file), "--address", "http://h:8265"])
    assert res.exit_code == EXIT_LOCKED and "already submitted" in res.output
