"""A run that lost its output lock stops before its next write or merge (exit 5, one line).

Against the real SeaweedFS (conditional writes and the settle fallback) and with a real paused
process (SIGSTOP/SIGCONT); a local output whose folder is deleted mid-run is the same case.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_until

from batchmask.batch.lock import LOCK_FILE, LockLost, OutputLock
from batchmask.batch.storage import StorageSpec
from batchmask.exits import EXIT_LOCK_LOST

BATCHMASK = [sys.executable, "-c", "from batchmask.cli import main; main()"]


def _spec(s3_server, bucket: str) -> StorageSpec:
    return StorageSpec(f"s3://{bucket}/out/", s3_server.endpoint_url, s3_server.storage_options)


@pytest.mark.slow  # the S3 server
@pytest.mark.parametrize("conditional", ["1", "0"])
def test_s3_lock_taken_over_is_lost_and_not_deleted(s3_server, monkeypatch, conditional):
    monkeypatch.setenv("BATCHMASK_S3_CONDITIONAL", conditional)
    bucket = s3_server.new_bucket("lost")
    a = OutputLock(_spec(s3_server, bucket).open()).acquire()
    assert a._conditional is (conditional == "1")  # SeaweedFS honours If-None-Match / If-Match
    a.check(renew=True)  # still ours
    key = f"{bucket}/out/{LOCK_FILE}"
    fs = s3_server.fs()
    rec = json.loads(fs.cat_file(key))
    other = dict(rec, token="someone-else", pid=4242, host="elsewhere", expires=time.time() + 60)
    fs.pipe_file(key, json.dumps(other).encode())  # another run took it over (as after a pause past the TTL)
    with pytest.raises(LockLost, match="taken over by pid 4242 on elsewhere"):
        a.check(renew=True)
    a.release()
    assert json.loads(fs.cat_file(key))["token"] == "someone-else"  # the new holder's lock is left alone


@pytest.mark.slow  # the S3 server
def test_s3_conditional_create_refuses_a_second_creator(s3_server):
    """Two runs that both saw no lock: only one create (If-None-Match: *) succeeds, whatever the timing."""
    bucket = s3_server.new_bucket("race")
    a, b = (OutputLock(_spec(s3_server, bucket).open()) for _ in range(2))
    a._conditional = b._conditional = True
    assert a._take_conditional(None) is None
    holder = b._take_conditional(None)
    assert holder is not None and holder["token"] == a.token


def _run_cli(inp: Path, out: str, model: Path, s3_server, gate: Path, gate_free: int) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BATCHMASK_S3_LOCK_TTL="6", BATCHMASK_TEST_GATE=str(gate),
               BATCHMASK_TEST_GATE_FREE=str(gate_free), AWS_ACCESS_KEY_ID=s3_server.key,
               AWS_SECRET_ACCESS_KEY=s3_server.secret)
    env.pop("RAY_ADDRESS", None)
    cmd = [*BATCHMASK, "run", "-i", str(inp), "-o", out, "-m", str(model), "--endpoint-url", s3_server.endpoint_url,
           "-w", "1", "--shard-size", "2", "-q"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


@pytest.mark.slow  # the S3 server, two CLI runs loading the model
def test_a_paused_holder_that_lost_its_s3_lock_stops_without_merging(s3_server, tiny_model_dir, demo_wider,
                                                                      tmp_path, leftovers):
    inp = tmp_path / "in"
    shutil.copytree(demo_wider / "images", inp)
    n_images = sum(1 for _ in inp.rglob("*.jpg"))
    bucket = s3_server.new_bucket("pause")
    out = f"s3://{bucket}/out/"
    fs = s3_server.fs()
    key = f"{bucket}/out/{LOCK_FILE}"
    gate_a, gate_b = tmp_path / "gate-a", tmp_path / "gate-b"
    leftovers.gates += [gate_a, gate_b]
    # A: its first shard (2 images) goes through, the second waits at the gate; there it is paused
    a = _run_cli(inp, out, tiny_model_dir, s3_server, gate_a, 1)
    leftovers.procs.append(a)
    wait_until(Path(f"{gate_a}.reached").exists, "run A reached its second shard", a)
    assert fs.ls(f"{bucket}/out/_parts/")  # A's first part file
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: json.loads(fs.cat_file(key))["expires"] < time.time(), "A's lock expired")
        # B takes the expired lock over and holds it (at its first shard) while A resumes
        b = _run_cli(inp, out, tiny_model_dir, s3_server, gate_b, 0)
        leftovers.procs.append(b)
        wait_until(Path(f"{gate_b}.reached").exists, "run B holds the lock and works", b)
        assert json.loads(fs.cat_file(key))["pid"] == b.pid
        coverage_before = fs.cat_file(f"{bucket}/out/coverage.csv")  # B merged A's first part at its start
        gate_a.touch()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == EXIT_LOCK_LOST, a_err
    lines = a_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: lost the lock of "), a_err
    assert f"taken over by pid {b.pid}" in lines[0] and "Traceback" not in a_err
    # A wrote no coverage.csv, no run.json, and left B's lock alone
    assert fs.cat_file(f"{bucket}/out/coverage.csv") == coverage_before
    assert not fs.exists(f"{bucket}/out/run.json")
    assert json.loads(fs.cat_file(key))["pid"] == b.pid
    gate_b.touch()
    b_out, b_err = b.communicate(timeout=300)
    assert b.returncode == 0, b_err
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{bucket}/out/coverage.csv").decode())))
    assert sorted(r["image"] for r in rows) == sorted({r["image"] for r in rows}) and len(rows) == n_images
    info = json.loads(fs.cat_file(f"{bucket}/out/run.json"))
    assert info["exit_code"] == 0 and not fs.exists(key)
