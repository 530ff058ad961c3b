"""`batchmask jobs run` end to end with the real runner (local Ray): incremental runs, the lock,
--wait, the timeout, history, and a crontab line executed by /bin/sh."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_until

from batchmask.cli.common import EXIT_FAILED, EXIT_LOCKED
from batchmask.jobs.execute import HISTORY_FILE, read_history
from batchmask.jobs.spec import load_job

BATCHMASK = [sys.executable, "-c", "from batchmask.cli import main; main()"]


def demo_images(demo_wider: Path) -> list[Path]:
    return sorted((demo_wider / "images").rglob("*.jpg"))


def write_job(d: Path, model: Path, inp: str, out: str, **extra) -> Path:
    lines = [
        'name = "growing"',
        'schedule = "*/5 * * * *"',
        f"input = {json.dumps(inp)}",
        f"output = {json.dumps(out)}",
        f"model = {json.dumps(str(model))}",
        "workers = 1",
        "batch_size = 4",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    p = d / "growing.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def env() -> dict[str, str]:
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    e.pop("RAY_ADDRESS", None)
    return e


def jobs_run(job: Path, locks: Path, *args: str, gate: Path | None = None, **kw) -> subprocess.Popen:
    """``batchmask jobs run`` in a subprocess; with ``gate`` its shards wait until that file exists."""
    cmd = [*BATCHMASK, "jobs", "run", "--lock-dir", str(locks), *args, str(job)]
    e = env() if gate is None else {**env(), "BATCHMASK_TEST_GATE": str(gate)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, **kw)


def live_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) still in process group ``pgid``: 'pid state cmdline'."""
    live = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(f"{d.name} {fields[0]} {(d / 'cmdline').read_bytes()[:120]!r}")
        except (OSError, ValueError):
            continue
    return live


def coverage_images(text: str) -> Counter:
    return Counter(row["image"] for row in csv.DictReader(io.StringIO(text)))


@pytest.mark.slow  # five `jobs run` subprocesses, each loading TensorFlow
def test_incremental_local_lock_wait_and_crontab_line(tmp_path, tiny_model_dir, demo_wider, leftovers):
    images = demo_images(demo_wider)
    inp, out, locks = tmp_path / "in", tmp_path / "out", tmp_path / "locks"
    (inp / "a").mkdir(parents=True)
    for p in images[:4]:
        shutil.copy(p, inp / "a" / p.name)
    job_file = write_job(tmp_path, tiny_model_dir, "in", "out")  # relative to the job file
    assert load_job(job_file).input == str(inp)

    # run A works (held at its first shard until B has been refused: no race); B finds the lock
    # and exits 4 at once; C waits for A, then finds nothing new
    gate = tmp_path / "gate"
    leftovers.gates.append(gate)
    a = jobs_run(job_file, locks, gate=gate)
    leftovers.procs.append(a)
    # A's run is at the gate: A took the job's lock before starting it, and holds it until the gate opens
    wait_until(Path(f"{gate}.reached").exists, "run A reached the gate", a)
    lock_file = locks / "growing.lock"
    assert json.loads(lock_file.read_text())["pid"] == a.pid
    b = jobs_run(job_file, locks, "--quiet")
    c = jobs_run(job_file, locks, "--quiet", "--wait")
    leftovers.procs += [b, c]
    b_out, b_err = b.communicate(timeout=60)
    assert b.returncode == EXIT_LOCKED, b_err
    assert len(b_err.strip().splitlines()) == 1
    assert f"job 'growing' is already running (pid {a.pid}" in b_err
    gate.touch()
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err
    assert "job growing: 4 new (4 ok, 0 failed), 0 already done" in a_out
    c_out, c_err = c.communicate(timeout=120)
    assert c.returncode == 0, c_err
    assert "0 new (0 ok, 0 failed), 4 already done" in c_out

    hist = read_history(load_job(job_file))
    assert [(r["new"], r["ok"], r["failed"], r["skipped"], r["status"]) for r in hist] == [
        (4, 4, 0, 0, "ok"),
        (0, 0, 0, 4, "ok"),
    ]
    assert hist[1]["start"] >= hist[0]["end"]  # C really waited
    for r in hist:
        assert set(r) >= {"start", "end", "duration_s", "host", "exit_code", "new", "ok", "failed"}

    # the folder grows: only the new images are processed, each image is in coverage.csv once
    (inp / "b").mkdir()
    for p in images[4:7]:
        shutil.copy(p, inp / "b" / p.name)
    d = jobs_run(job_file, locks, "--quiet")
    d_out, d_err = d.communicate(timeout=300)
    assert d.returncode == 0, d_err
    assert "job growing: 3 new (3 ok, 0 failed), 4 already done" in d_out
    counts = coverage_images((out / "coverage.csv").read_text())
    assert len(counts) == 7 and set(counts.values()) == {1}
    assert {k.split("/")[0] for k in counts} == {"a", "b"}

    # the crontab line for this job, run by /bin/sh: nothing new, summary appended to the log
    logs = tmp_path / "logs"
    logs.mkdir()
    tab = subprocess.run(
        [*BATCHMASK, "jobs", "crontab", "--no-user", "--log-dir", str(logs), "--lock-dir", str(locks),
         "--batchmask", shutil.which("batchmask") or str(Path(sys.executable).parent / "batchmask"), str(job_file)],
        capture_output=True, text=True, check=True, env=env(),
    ).stdout
    line = next(ln for ln in tab.splitlines() if ln and not ln.startswith(("#", "SHELL", "PATH", "CRON_TZ")))
    command = line.split(None, 5)[5].replace("\\%", "%")
    subprocess.run(["/bin/sh", "-c", command], check=True, env=env(), timeout=120)
    log_text = (logs / "growing.log").read_text()
    assert "job growing: 0 new (0 ok, 0 failed), 7 already done" in log_text
    assert len(read_history(load_job(job_file))) == 4


def test_timeout_stops_the_run_and_is_recorded(tmp_path, tiny_model_dir, demo_wider):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in demo_images(demo_wider)[:2]:
        shutil.copy(p, inp / p.name)
    job_file = write_job(tmp_path, tiny_model_dir, "in", "out", timeout=1)
    # The run's shards wait for a gate that never opens: the timeout, not luck, ends it (two
    # images in process can finish within the 1 s timeout).
    p = jobs_run(job_file, tmp_path / "locks", "--quiet", gate=tmp_path / "never")
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_FAILED, err
    assert "timeout: stopped after the job's timeout of 1 s" in err
    # --quiet: that one line; nothing of the child (no KeyboardInterrupt traceback, no TF start-up lines)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    (rec,) = read_history(load_job(job_file))
    assert rec["status"] == "timeout" and rec["exit_code"] == EXIT_FAILED
    assert (tmp_path / "out" / HISTORY_FILE).is_file()
    # nothing of the killed run's process group is left
    # (SIGKILLed: dying is the kernel's business now; no deadline but pytest's own timeout)
    wait_until(lambda: not live_in_group(rec["run_pid"]), "the run's process group is gone")


def test_sigterm_stops_the_run_and_is_recorded_as_interrupted(tmp_path, tiny_model_dir, demo_wider):
    """The real SIGTERM path: `jobs run` is signalled while its run is held at a gate; it stops
    the run's process group (whose runner records the interruption in run.json), records
    "interrupted" in the history and exits 1."""
    inp = tmp_path / "in"
    inp.mkdir()
    for p in demo_images(demo_wider)[:2]:
        shutil.copy(p, inp / p.name)
    job_file = write_job(tmp_path, tiny_model_dir, "in", "out")
    gate = tmp_path / "gate"
    p = jobs_run(job_file, tmp_path / "locks", "--quiet", gate=gate)
    try:
        wait_until(Path(f"{gate}.reached").exists, "the run reached the gate", p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        gate.touch()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == EXIT_FAILED, err
    (rec,) = read_history(load_job(job_file))
    assert (rec["status"], rec["exit_code"], rec["error"]) == ("interrupted", EXIT_FAILED, "stopped by signal 15")
    assert "interrupted: stopped by signal 15" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    wait_until(lambda: not live_in_group(rec["run_pid"]), "the run's process group is gone")
    # the run itself got the SIGTERM and saved as an interrupted run does
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["interrupted"] is True and info["exit_code"] == 1


def test_disabled_job_needs_force(tmp_path, tiny_model_dir):
    job_file = write_job(tmp_path, tiny_model_dir, "in", "out", enabled=False)
    res = subprocess.run([*BATCHMASK, "jobs", "run", "--lock-dir", str(tmp_path), str(job_file)],
                         capture_output=True, text=True, env=env(), timeout=60)
    assert res.returncode == EXIT_FAILED
    assert "disabled" in res.stderr and "--force" in res.stderr


@pytest.mark.slow  # the S3 server
def test_incremental_s3_bucket_with_named_profile(tmp_path, tiny_model_dir, demo_wider, s3_server, monkeypatch):
    # credentials from a named profile (never from the job file)
    creds = tmp_path / "aws-credentials"
    creds.write_text(
        f"[batchmask-test]\naws_access_key_id = {s3_server.key}\naws_secret_access_key = {s3_server.secret}\n"
    )
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-missing"))
    fs = s3_server.fs()
    bucket = s3_server.new_bucket("jobs")
    images = demo_images(demo_wider)
    for p in images[:3]:
        fs.put_file(str(p), f"{bucket}/in/{p.name}")
    job_file = write_job(
        tmp_path, tiny_model_dir, f"s3://{bucket}/in", f"s3://{bucket}/out",
        endpoint_url=s3_server.endpoint_url, profile="batchmask-test",
    )
    locks = tmp_path / "locks"
    p = jobs_run(job_file, locks, "--quiet")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "3 new (3 ok, 0 failed), 0 already done" in out
    for q in images[3:5]:
        fs.put_file(str(q), f"{bucket}/in/{q.name}")
    p = jobs_run(job_file, locks, "--quiet")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "2 new (2 ok, 0 failed), 3 already done" in out
    fs.invalidate_cache()
    counts = coverage_images(fs.cat_file(f"{bucket}/out/coverage.csv").decode())
    assert counts == Counter({q.name: 1 for q in images[:5]})
    # history lives in the bucket, one JSON line per run
    lines = fs.cat_file(f"{bucket}/out/{HISTORY_FILE}").decode().splitlines()
    assert [json.loads(x)["new"] for x in lines] == [3, 2]
    assert [r["skipped"] for r in read_history(load_job(job_file))] == [0, 3]


def test_failed_run_is_recorded_with_its_reason(tmp_path, demo_wider):
    (tmp_path / "in").mkdir()
    job_file = write_job(tmp_path, tmp_path / "no-such-model", "in", "out")
    p = jobs_run(job_file, tmp_path / "locks", "--quiet")
    _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_FAILED
    assert "job growing: failed: ModelNotFoundError" in err and "Traceback" not in err
    (rec,) = read_history(load_job(job_file))
    assert rec["status"] == "failed" and "no-such-model" in rec["error"]
