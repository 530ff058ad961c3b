"""`batchmask jobs submit` against a real local Ray head (dashboard on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from batchmask.cli.common import EXIT_LOCKED
from batchmask.jobs.execute import read_history
from batchmask.jobs.spec import load_job

BATCHMASK = [sys.executable, "-c", "from batchmask.cli import main; main()"]
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own (unique ports and temp dir), stopped by process group, not `ray stop`
    (which would stop every Ray on the machine)."""
    ray = VENV_BIN / "ray"
    if not ray.exists():
        pytest.skip("the `ray` command is not installed next to this Python")
    temp = tempfile.mkdtemp(prefix="bmjr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    locks = tmp_path_factory.mktemp("locks")
    gcs, dash, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr, client = _free_ports(9)
    cmd = [
        str(ray), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=1",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               TF_CPP_MIN_LOG_LEVEL="3", BATCHMASK_LOCK_DIR=str(locks), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("raylog") / "ray-start.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:  # noqa: S310 (loopback)
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):  # answering, with Ray's token authentication on
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # `ray start --block` stops the processes it started on SIGTERM; then the group goes
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_once_per_slot(ray_head, tmp_path, tiny_model_dir, demo_wider):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted((demo_wider / "images").rglob("*.jpg"))[:2]:
        shutil.copy(p, inp / p.name)
    job_file = tmp_path / "ray.toml"
    job_file.write_text(
        'name = "ray-submitted"\nschedule = "30 2 * * *"\ntimezone = "Europe/Paris"\n'
        f'input = "in"\noutput = "out"\nmodel = {json.dumps(str(tiny_model_dir))}\n'
    )
    exe = str(VENV_BIN / "batchmask")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RAY_ADDRESS", None)
    submit = [*BATCHMASK, "jobs", "submit", str(job_file), "--address", ray_head, "--slot", "2026-01-05T02:30",
              "--batchmask", exe]
    res = subprocess.run([*submit, "--wait", "--wait-timeout", "300"], capture_output=True, text=True, env=env,
                         timeout=400)
    sid = "batchmask-ray-submitted-20260105T0130Z"  # 02:30 Paris = 01:30 UTC in winter
    if res.returncode != 0:
        from batchmask.jobs.submit import job_logs

        try:
            logs = job_logs(ray_head, sid)
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            logs = f"(no logs: {exc})"
        pytest.fail(f"{res.stdout}\n{res.stderr}\n--- job logs ---\n{logs[-4000:]}")
    assert f"submitted {sid}" in res.stdout
    assert f"{sid}: SUCCEEDED" in res.stdout
    hist = read_history(load_job(job_file))
    assert [(r["new"], r["ok"], r["status"]) for r in hist] == [(2, 2, "ok")]
    assert (tmp_path / "out" / "coverage.csv").read_text().count("\n") == 3  # header + 2 images

    # the same slot again: refused, nothing runs
    again = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == EXIT_LOCKED, again.stderr
    assert f"{sid}: already submitted" in again.stderr
    assert len(read_history(load_job(job_file))) == 1
