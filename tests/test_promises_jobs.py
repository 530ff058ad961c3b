"""README / jobs/README.md promises of `batchmask jobs` that no other test checked (issue 14).

Fast tier: the scheduler outputs are parsed back, `submit` talks to a fake Jobs API client, and
the one real `jobs run` processes three 32x32 images (in process, ONNX Runtime).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from croniter import croniter
from PIL import Image

from batchmask.cli import main
from batchmask.jobs.execute import job_lock, read_history
from batchmask.jobs.spec import load_job


def job_file(d: Path, name: str = "cam", **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"name": name, "schedule": "*/15 * * * *", "input": "in", "output": "out"}
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (base | fields).items())
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


def _runner_in_this_process(job, *, quiet, address, wait=None):
    """execute._run_child without the child process (the real one is tested in test_jobs_run.py,
    slow): the same runner call and the same summary."""
    import dataclasses

    from batchmask.batch.runner import run

    kwargs = {**job.runner_kwargs(), "quiet": quiet, **(wait or {})}
    if address:
        kwargs["address"] = address
    summary = run(**kwargs)
    return {"summary": {k: v for k, v in dataclasses.asdict(summary).items() if k != "run_json"}}


def test_jobs_run_exits_3_with_more_failures_than_max_failures(tmp_path, tiny_model_dir, monkeypatch):
    import batchmask.jobs.execute as execute

    monkeypatch.setattr(execute, "_run_child", _runner_in_this_process)
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(inp / "good.png")
    (inp / "bad1.jpg").write_bytes(b"")
    (inp / "bad2.jpg").write_bytes(b"not an image")
    job = job_file(tmp_path, model=str(tiny_model_dir), max_failures=1)
    res = CliRunner().invoke(main, ["jobs", "run", "--quiet", "--lock-dir", str(tmp_path / "locks"), str(job)])
    assert res.exit_code == 3, res.output
    assert "1 ok, 2 failed" in res.output and "exit 3" in res.output
    (rec,) = read_history(load_job(job))
    assert (rec["status"], rec["exit_code"], rec["ok"], rec["failed"]) == ("images_failed", 3, 1, 2)
    # as many failures as max_failures: exit 0, the failures still in coverage.csv and the history
    job2 = job_file(tmp_path / "two", model=str(tiny_model_dir), max_failures=2, input=str(inp),
                    output=str(tmp_path / "out2"))
    res = CliRunner().invoke(main, ["jobs", "run", "--quiet", "--lock-dir", str(tmp_path / "locks"), str(job2)])
    assert res.exit_code == 0, res.output
    (rec,) = read_history(load_job(job2))
    assert (rec["status"], rec["exit_code"], rec["failed"]) == ("ok", 0, 2)
    assert (tmp_path / "out2" / "coverage.csv").read_text().count(",error,") == 2


def test_jobs_run_wait_timeout_gives_up_with_4(tmp_path):
    job = job_file(tmp_path)
    locks = tmp_path / "locks"
    with job_lock("cam", locks):
        t0 = time.monotonic()
        res = CliRunner().invoke(main, ["jobs", "run", "--quiet", "--wait", "--wait-timeout", "0.6",
                                        "--lock-dir", str(locks), str(job)])
        waited = time.monotonic() - t0
    assert res.exit_code == 4, res.output
    assert "job 'cam' is already running" in res.output and res.output.strip().count("\n") == 0
    assert waited >= 0.6  # it did wait before giving up
    assert read_history(load_job(job)) == []  # nothing ran


class FakeJobs:
    """The part of Ray's JobSubmissionClient that `jobs submit` uses; the job ends in ``final``."""

    def __init__(self, final: str):
        self.final, self.submitted, self.polls = final, [], 0

    def get_job_info(self, sid):
        if sid not in self.submitted:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return type("Info", (), {"status": "RUNNING"})()

    def submit_job(self, **kw):
        self.submitted.append(kw["submission_id"])

    def get_job_status(self, sid):
        self.polls += 1
        return "RUNNING" if self.polls < 2 else f"JobStatus.{self.final}"


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_wait_exits_0_only_for_succeeded(tmp_path, monkeypatch, final, code):
    import batchmask.jobs.submit as js

    fake = FakeJobs(final)
    monkeypatch.setattr(js, "_client", lambda address: fake)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # wait_for polls every second
    job = job_file(tmp_path, input="s3://bucket/in", output="s3://bucket/out", schedule="30 2 * * *")
    res = CliRunner().invoke(main, ["jobs", "submit", str(job), "--address", "http://head:8265",
                                    "--slot", "2026-01-05T02:30", "--wait"])
    assert res.exit_code == code, res.output
    sid = "batchmask-cam-20260105T0230Z"
    assert fake.submitted == [sid] and f"{sid}: {final}" in res.output and fake.polls == 2


def _unquote_systemd(word: str) -> str:
    """One ExecStart word back to the argument systemd passes (its quoting, '%%' and '$$')."""
    if word.startswith('"'):
        assert word.endswith('"')
        word = word[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return word.replace("%%", "%").replace("$$", "$")


def test_systemd_unit_treats_exit_4_as_success_and_quotes_paths(tmp_path):
    d = tmp_path / "my jobs 50%"
    job = job_file(d, timeout="10m", description="nightly 100% of uploads")
    exe = str(tmp_path / "venv bin" / "batchmask")
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "systemd", "--batchmask", exe, "--user", "svc",
                                    "--lock-dir", str(tmp_path / "lock dir"), str(job)])
    assert res.exit_code == 0, res.output
    service = res.output.split("### batchmask-cam.service\n", 1)[1].split("### ", 1)[0]
    lines = dict(ln.split("=", 1) for ln in service.splitlines() if "=" in ln and not ln.startswith("#"))
    assert lines["SuccessExitStatus"] == "4"  # the previous run still holding the lock is no failure
    assert lines["Type"] == "oneshot" and lines["User"] == "svc" and lines["TimeoutStartSec"] == "660s"
    assert lines["Description"] == "batchmask job cam: nightly 100%% of uploads"
    # Each argument is one word, quoted where it has spaces; '%' doubled (systemd specifiers).
    words, cur, quoted = [], "", False
    for ch in lines["ExecStart"]:
        if ch == '"' and not cur.endswith("\\"):
            quoted = not quoted
        if ch == " " and not quoted:
            words.append(cur)
            cur = ""
        else:
            cur += ch
    words.append(cur)
    assert [_unquote_systemd(w) for w in words] == [exe, "jobs", "run", "--quiet", "--lock-dir",
                                                   str(tmp_path / "lock dir"), str(job)]
    assert f'"{d}/cam.toml"'.replace("%", "%%") in lines["ExecStart"]


def test_k8s_cronjob_fields(tmp_path):
    d = tmp_path / "jobs"
    job_file(d, "remote", input="s3://b/in", output="s3://b/out", timeout="1h")
    job_file(d, "local")
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "k8s", "--image", "reg/bm:1",
                                    "--configmap", "bm-jobs", str(d)])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("# WARNING")]
    assert len(warnings) == 1 and "local" in warnings[0] and "remote" not in warnings[0]
    docs = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(res.output) if doc}
    assert set(docs) == {"batchmask-remote", "batchmask-local"}
    cj = docs["batchmask-remote"]["spec"]
    assert cj["concurrencyPolicy"] == "Forbid" and cj["startingDeadlineSeconds"] > 0
    js = cj["jobTemplate"]["spec"]
    assert js["backoffLimit"] == 0  # a failed run is not retried by Kubernetes: the next slot does it
    assert js["activeDeadlineSeconds"] == 3600 + 60
    pod = js["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "reg/bm:1" and pod["restartPolicy"] == "Never"
    # args: the image's entrypoint stays (it passes SIGTERM on); --locked-ok: tests/test_k8s.py
    assert c["args"] == ["batchmask", "jobs", "run", "--quiet", "--locked-ok", "/etc/batchmask/jobs/remote.toml"]
    mount = c["volumeMounts"][0]
    vol = pod["volumes"][0]
    assert mount == {"name": vol["name"], "mountPath": "/etc/batchmask/jobs", "readOnly": True}
    assert vol["configMap"] == {"name": "bm-jobs"}
    assert "activeDeadlineSeconds" not in docs["batchmask-local"]["spec"]["jobTemplate"]["spec"]  # no timeout


def test_jobs_list_next_n(tmp_path):
    job = job_file(tmp_path, schedule="5 */6 * * *", timezone="Europe/Paris")
    off = job_file(tmp_path, "off", enabled=False)
    res = CliRunner().invoke(main, ["jobs", "list", "--next", "4", "--json", str(job), str(off)])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in map(json.loads, res.output.splitlines())}
    times = [dt.datetime.fromisoformat(t) for t in rows["cam"]["next"]]
    assert len(times) == 4 and times == sorted(times) and times[0] > dt.datetime.now(dt.UTC)
    it = croniter("5 */6 * * *", times[0])
    assert [t.astimezone(times[0].tzinfo) for t in times[1:]] == [it.get_next(dt.datetime) for _ in range(3)]
    assert all(t.strftime("%M") == "05" and t.hour % 6 == 0 for t in times)  # read in Europe/Paris
    assert rows["off"]["next"] == [] and rows["off"]["enabled"] is False
    res = CliRunner().invoke(main, ["jobs", "list", "--next", "3", str(job)])
    (line,) = [ln for ln in res.output.splitlines() if ln.strip().startswith("next")]
    assert line.count(", ") == 2 and ("CET" in line or "CEST" in line)


@pytest.mark.parametrize("how", ["option", "env"])
def test_jobs_run_passes_address_or_ray_address_to_the_run(tmp_path, monkeypatch, how):
    import batchmask.jobs.execute as execute

    seen = []
    monkeypatch.setattr(execute, "_run_child", lambda job, *, quiet, address, wait=None: seen.append(address) or {
        "summary": {"ok": 0, "failed": 0, "skipped": 0, "total": 0, "exit_code": 0}})
    args = ["jobs", "run", "--quiet", "--lock-dir", str(tmp_path / "locks"), str(job_file(tmp_path))]
    if how == "option":
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        args[2:2] = ["--address", "ray://head:10001"]
    else:
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert seen == ["ray://head:10001"]


def test_jobs_run_exits_1_when_its_history_cannot_be_written(tmp_path, monkeypatch):
    """jobs/README: if the history cannot be written, the run's exit code becomes 1 (when it was 0)."""
    import batchmask.jobs.execute as execute

    monkeypatch.setattr(execute, "_run_child", lambda job, **kw: {
        "summary": {"ok": 2, "failed": 0, "skipped": 0, "total": 2, "exit_code": 0}})
    job = job_file(tmp_path)
    (tmp_path / "out").write_text("a file where the output folder should be")
    res = CliRunner().invoke(main, ["jobs", "run", "--quiet", "--lock-dir", str(tmp_path / "locks"), str(job)])
    assert res.exit_code == 1, res.output
    assert "2 new (2 ok, 0 failed)" in res.output and "exit 1" in res.output
