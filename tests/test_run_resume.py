"""Resuming `batchmask run`: an interrupted CLI run, and a large already-done folder without Ray."""

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

from batchmask.batch.outputs import COLUMNS, rows_to_csv
from batchmask.batch.runner import run


def test_already_done_folder_returns_fast_without_ray_or_model(tmp_path, tiny_model_dir, monkeypatch):
    import ray

    inp, out = tmp_path / "in", tmp_path / "out"
    rows = []
    for d in range(100):
        (inp / f"d{d:03d}").mkdir(parents=True)
        (out / "masks" / f"d{d:03d}").mkdir(parents=True)
        for i in range(100):
            rel = f"d{d:03d}/img {i:03d}.jpg"
            (inp / rel).write_bytes(b"")
            (out / "masks" / rel.replace(".jpg", ".png")).write_bytes(b"")
            rows.append(dict.fromkeys(COLUMNS, "") | {"image": rel, "mask": f"masks/{rel[:-4]}.png", "status": "ok"})
    (out / "coverage.csv").write_bytes(rows_to_csv(rows))
    # The model is checked (files only) before anything is written, but never loaded: no Ray, no
    # worker, no TF. (How fast that is is a benchmark's business: the time is printed, not asserted.)
    import batchmask.batch.worker as worker

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a folder with nothing to do")

    monkeypatch.setattr(worker, "_load_worker_model", no_model)
    t = time.perf_counter()
    s = run(str(inp), str(out), str(tiny_model_dir), workers=4, quiet=True)
    wall = time.perf_counter() - t
    assert (s.total, s.skipped, s.ok, s.failed, s.exit_code) == (10_000, 10_000, 0, 0, 0)
    assert not ray.is_initialized() and "ray" not in s.run_json
    print(f"10,000 already-done images: {wall:.2f} s")


@pytest.mark.parametrize("where", ["in-process", pytest.param("ray", marks=pytest.mark.slow)])
def test_interrupted_cli_run_resumes_exactly_once(where, tmp_path, demo_wider, tiny_model_dir):
    """SIGTERM while the run is held at a gate (after each worker's first shard): what finished is
    merged, nothing half-written is left, and the next run does exactly the rest. In process (20
    images: no Ray), and on the Ray the run starts itself (--in-process-max 0). (Joining the
    session's Ray head with --address works too, but the run then took ~12 s from SIGTERM to exit.)"""
    inp, out, gate = tmp_path / "in", tmp_path / "out", tmp_path / "gate"
    for k in range(2):
        shutil.copytree(demo_wider / "images", inp / f"c{k}")
    env = dict(os.environ, BATCHMASK_TEST_GATE=str(gate), BATCHMASK_TEST_GATE_FREE="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "batchmask"), "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir),
           "-q"]
    if where == "ray":
        cmd += ["--in-process-max", "0", "--workers", "1", "--shard-size", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(Path(f"{gate}.reached").exists, "a shard reached the gate", proc)
        proc.send_signal(signal.SIGTERM)
        outp, _ = proc.communicate(timeout=120)
    finally:
        gate.touch()  # never leave a worker waiting
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, outp[-2000:]
    first = list(csv.DictReader(io.StringIO((out / "coverage.csv").read_text())))
    info = json.loads((out / "run.json").read_text())
    assert info["interrupted"] is True and info["exit_code"] == 1
    if where == "in-process":
        # 20 images, one worker: two shards of 10; the first is done, the second held at the gate
        assert info["plan"]["mode"] == "in-process" and len(first) == info["plan"]["shard_size"] == 10, info["plan"]
    else:  # the actor did its free shard (2 images) and is held at the gate with the second
        assert info["plan"]["mode"] == "ray" and len(first) == 2, first
    assert not [p for p in Path(out, "masks").rglob("*") if p.is_file() and p.name.startswith(".tmp")]
    masks = sorted(p.relative_to(out).as_posix() for p in Path(out, "masks").rglob("*") if p.is_file())
    assert masks == sorted(r["mask"] for r in first)
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    rows = list(csv.DictReader(io.StringIO((out / "coverage.csv").read_text())))
    assert len(rows) == len({r["image"] for r in rows}) == 20 and all(r["status"] == "ok" for r in rows)
    assert s.skipped == len(first) and s.ok == 20 - len(first)


def test_refusals_write_nothing_and_failed_runs_record_exit_1(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import batchmask.batch.runner as runner
    from batchmask.batch.runner import RunError
    from batchmask.batch.storage import StorageError
    from batchmask.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(b"")
    with pytest.raises(RunError, match="same location"):
        run(str(inp), str(inp), quiet=True)
    with pytest.raises(StorageError, match="is a file"):
        run(str(inp / "a.jpg"), str(tmp_path / "out"), quiet=True)
    with pytest.raises(StorageError, match="no such directory"):
        run(str(tmp_path / "nope"), str(tmp_path / "out"), quiet=True)
    assert not (inp / "coverage.csv").exists() and not (tmp_path / "out").exists()

    res = CliRunner().invoke(main, ["run", "-i", str(inp / "a.jpg"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and res.output.startswith("Error: ")

    def boom(*a, **k):
        raise RunError("all workers died")

    monkeypatch.setattr(runner, "_execute", boom)
    monkeypatch.setattr(runner, "execute_in_process", boom)  # one image: done in process, without Ray
    with pytest.raises(RunError):  # (runtime keras: the shipped model's ONNX export is not this test's subject)
        run(str(inp), str(tmp_path / "out"), quiet=True, runtime="keras")
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["exit_code"] == 1 and not info["interrupted"]
