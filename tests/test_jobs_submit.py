"""`batchmask jobs submit` against a real local Ray head (the session's ``ray_head``, dashboard on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchmask.cli.common import EXIT_LOCKED
from batchmask.jobs.execute import read_history
from batchmask.jobs.spec import load_job

BATCHMASK = [sys.executable, "-c", "from batchmask.cli import main; main()"]
VENV_BIN = Path(sys.executable).parent


@pytest.mark.slow  # a Ray job on the Ray head
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
    submit = [*BATCHMASK, "jobs", "submit", str(job_file), "--address", ray_head.dashboard, "--slot", "2026-01-05T02:30",
              "--batchmask", exe]
    res = subprocess.run([*submit, "--wait", "--wait-timeout", "300"], capture_output=True, text=True, env=env,
                         timeout=400)
    sid = "batchmask-ray-submitted-20260105T0130Z"  # 02:30 Paris = 01:30 UTC in winter
    if res.returncode != 0:
        from batchmask.jobs.submit import job_logs

        try:
            logs = job_logs(ray_head.dashboard, sid)
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
