"""Resuming `batchmask run`: an interrupted CLI run, and a large already-done folder without Ray."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchmask.batch.outputs import COLUMNS, rows_to_csv
from batchmask.batch.runner import run


def test_already_done_folder_returns_fast_without_ray_or_model(tmp_path, tiny_model_dir):
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
    # The model is checked (files only) before anything is written, but never loaded: no Ray, no TF.
    t = time.perf_counter()
    s = run(str(inp), str(out), str(tiny_model_dir), workers=4, quiet=True)
    wall = time.perf_counter() - t
    assert (s.total, s.skipped, s.ok, s.failed, s.exit_code) == (10_000, 10_000, 0, 0, 0)
    assert not ray.is_initialized() and "ray" not in s.run_json
    assert wall < 10, f"10,000 done images took {wall:.1f} s"
    print(f"10,000 already-done images: {wall:.2f} s")


@pytest.mark.slow
def test_interrupted_cli_run_resumes_exactly_once(tmp_path, demo_wider, tiny_model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    for k in range(2):
        shutil.copytree(demo_wider / "images", inp / f"c{k}")
    env = dict(os.environ, BATCHMASK_TEST_SHARD_DELAY="1.0", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [str(Path(sys.executable).parent / "batchmask"), "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir),
           "--shard-size", "2", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list((out / "_parts").glob("*.csv")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGTERM)
    outp, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, outp.decode()[-2000:]
    first = list(csv.DictReader(io.StringIO((out / "coverage.csv").read_text())))
    assert 0 < len(first) < 20  # what finished was merged
    assert not [p for p in Path(out, "masks").rglob("*") if p.is_file() and p.name.startswith(".tmp")]
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    rows = list(csv.DictReader(io.StringIO((out / "coverage.csv").read_text())))
    assert len(rows) == len({r["image"] for r in rows}) == 20 and all(r["status"] == "ok" for r in rows)
    assert s.skipped == len(first) and s.ok == 20 - len(first)


def test_refusals_write_nothing_and_failed_runs_record_exit_1(tmp_path, monkeypatch):
    import json

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
    with pytest.raises(RunError):
        run(str(inp), str(tmp_path / "out"), quiet=True)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["exit_code"] == 1 and not info["interrupted"]
