"""Fleet-scale safety of `batchmask run` and `jobs`: coverage.csv the user touched, quiet runs,
silent empty runs, damaged models, outputs deleted or reused with another model, one wait
deadline, DST days in systemd timers, error texts that are the same on every run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, need, wait_until

from batchmask.batch.outputs import (
    COVERAGE,
    UNREADABLE,
    error_row,
    load_records,
    merge_parts,
    ok_row,
    part_name,
    rows_to_csv,
)
from batchmask.batch.storage import StorageSpec, matches
from batchmask.exits import EXIT_LOCK_LOST, EXIT_LOCKED

BATCHMASK = [sys.executable, "-c", "from batchmask.cli import main; main()"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    for k in ("RAY_ADDRESS", "TF_CPP_MIN_LOG_LEVEL"):  # the CLI itself must keep TensorFlow quiet
        env.pop(k, None)
    return env


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BATCHMASK, *args], capture_output=True, text=True, env=env or _env(), timeout=timeout)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- coverage.csv


def test_damaged_coverage_is_kept_beside_and_rebuilt(tmp_path):
    out = StorageSpec(str(tmp_path / "out")).open()
    out.ensure_root()
    damaged = b"image,status\n\x00\xff\xfe not utf-8 \x80\n"
    (tmp_path / "out" / COVERAGE).write_bytes(damaged)
    out.write_bytes(part_name("r1", 0), rows_to_csv([ok_row("a.jpg", "masks/a.png", 4, 4, 1, 1, 0.9)]))
    merge_parts(out)
    assert list(load_records(out)[0]) == ["a.jpg"]
    assert (tmp_path / "out" / (COVERAGE + UNREADABLE)).read_bytes() == damaged
    assert [r["image"] for r in _rows(tmp_path / "out" / COVERAGE)] == ["a.jpg"]
    # a second damaged one does not overwrite the first copy
    (tmp_path / "out" / COVERAGE).write_bytes(b"no,columns,we,know\n1,2,3,4\n")
    merge_parts(out)
    assert (tmp_path / "out" / (COVERAGE + UNREADABLE)).read_bytes() == damaged
    assert (tmp_path / "out" / (COVERAGE + UNREADABLE + "-1")).read_bytes().startswith(b"no,columns")


def test_extra_column_is_kept_through_merges_and_replaced_rows(tmp_path):
    out = StorageSpec(str(tmp_path / "out")).open()
    out.ensure_root()
    rows = [dict(ok_row(n, f"masks/{n}.png", 4, 4, 1, 1, 0.9), note=f"seen {n}") for n in ("a.jpg", "b.jpg")]
    out.write_bytes(COVERAGE, rows_to_csv(rows))
    out.write_bytes(part_name("r2", 0), rows_to_csv([ok_row("a.jpg", "masks/a.png", 4, 4, 2, 1, 0.8),
                                                    ok_row("c.jpg", "masks/c.png", 4, 4, 0, 0, None)]))
    merge_parts(out)
    got = {r["image"]: r for r in _rows(tmp_path / "out" / COVERAGE)}
    assert [got[k]["note"] for k in ("a.jpg", "b.jpg", "c.jpg")] == ["seen a.jpg", "seen b.jpg", ""]
    assert got["a.jpg"]["face_pixels"] == "2"  # the new row, with the user's note carried over


def test_error_rows_carry_no_object_addresses():
    from batchmask.batch.outputs import decode_for_model
    from batchmask.data import DataError

    with pytest.raises(DataError) as exc:
        decode_for_model(b"not an image at all", 64, 10**6, "x.jpg")
    assert " at 0x" in str(exc.value)  # what PIL says (the address differs on every run)
    assert " at 0x" not in error_row("x.jpg", str(exc.value))["error"]
    assert "<_io.BytesIO>" in error_row("x.jpg", str(exc.value))["error"]


# ----------------------------------------------------------------------------- the model


def _damaged_weights_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with zipfile.ZipFile(src / "model.keras") as z:
        members = {n: z.read(n) for n in z.namelist()}
    h5 = bytearray(members["model.weights.h5"])
    h5[800:1056] = b"\xff" * 256  # an object header: damaged before zipping, so every CRC is valid
    members["model.weights.h5"] = bytes(h5)
    with zipfile.ZipFile(dst / "model.keras", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return dst


def test_a_model_with_damaged_weights_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    model = _damaged_weights_model(tiny_model_dir, tmp_path / "m")
    with zipfile.ZipFile(model / "model.keras") as z:
        assert z.testzip() is None
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(next((REPO / "demo" / "wider" / "images").rglob("*.jpg")), inp / "a.jpg")
    p = _cli("run", "-i", str(inp), "-o", str(out), "-m", str(model), "-q", timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("Error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "model.weights.h5" in p.stderr and "damaged" in p.stderr and str(model) in p.stderr
    assert " at 0x" not in p.stderr
    assert not out.exists()


def _other_model(src: Path, dst: Path) -> Path:
    """The same network with another file hash (a zip comment): another model as far as hashes go."""
    shutil.copytree(src, dst)
    with zipfile.ZipFile(dst / "model.keras", "a") as z:
        z.comment = b"retrained"
    return dst


def test_a_rerun_with_another_model_is_refused_without_overwrite(tmp_path, tiny_model_dir):
    from batchmask.batch.options import RunError
    from batchmask.batch.runner import run

    other = _other_model(tiny_model_dir, tmp_path / "other")
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert s.run_json["model"]["sha256"]
    run(str(inp), str(out), str(other), quiet=True)  # no masks yet: nothing to mix
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    (out / "masks").mkdir()
    (out / "masks" / "a.png").write_bytes(b"a mask made with the first model")
    with pytest.raises(RunError, match="holds masks of another model.*--overwrite"):
        run(str(inp), str(out), str(other), quiet=True)
    assert json.loads((out / "run.json").read_text())["model"]["sha256"] == s.run_json["model"]["sha256"]
    s2 = run(str(inp), str(out), str(other), quiet=True, overwrite=True)
    assert s2.run_json["model"]["sha256"] != s.run_json["model"]["sha256"]
    run(str(inp), str(out), str(other), quiet=True)  # now the output's model


# ----------------------------------------------------------------------------- --glob and empty runs


def test_glob_is_case_insensitive_and_the_example_jobs_take_jpeg_in_any_case():
    from batchmask.batch.runner import RUN_EXTENSIONS
    from batchmask.jobs.spec import load_job

    assert matches("cam/IMG_0001.JPG", RUN_EXTENSIONS, "*.jpg")
    assert matches("cam/IMG_0001.jpg", RUN_EXTENSIONS, "CAM/*")
    assert not matches("cam/IMG_0001.png", RUN_EXTENSIONS, "*.jpg")
    for job_file in sorted((REPO / "jobs").glob("*.toml")):
        job = load_job(job_file)
        for name in ("a.jpg", "B.JPG", "c.jpeg", "D.JPEG"):
            assert matches(f"x/{name}", RUN_EXTENSIONS, job.runner_kwargs().get("glob")), (job_file.name, name)


def test_a_run_with_nothing_to_list_warns_even_quiet(tmp_path, tiny_model_dir):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "notes.txt").write_text("no images here")
    p = _cli("run", "-i", str(inp), "-o", str(tmp_path / "o1"), "-m", str(tiny_model_dir), "-q", timeout=120)
    assert p.returncode == 0 and "no images found under" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    shutil.copy(next((REPO / "demo" / "wider" / "images").rglob("*.jpg")), inp / "a.jpg")
    p = _cli("run", "-i", str(inp), "-o", str(tmp_path / "o2"), "-m", str(tiny_model_dir), "-q", "--glob", "*.png",
             timeout=120)
    assert p.returncode == 0 and "--glob '*.png' matched none of the 1 images" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1


@pytest.mark.slow  # four CLI runs loading the model (one exporting it to ONNX, one with Keras)
def test_quiet_runs_print_nothing_and_a_users_column_never_fails_a_run(tmp_path, tiny_model_dir, demo_wider):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    jpgs = sorted((demo_wider / "images").rglob("*.jpg"))
    for p in jpgs[:2]:
        shutil.copy(p, inp / p.name)
    env = _env(BATCHMASK_CACHE_DIR=str(tmp_path / "cache"))  # the first ONNX export happens in this run
    args = ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"]
    p = _cli(*args, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    # the user adds a column; a later run with something new keeps it and succeeds
    rows = _rows(out / COVERAGE)
    for r in rows:
        r["note"] = "checked by hand"
    (out / COVERAGE).write_bytes(rows_to_csv(rows))
    shutil.copy(jpgs[2], inp / "IMG_0003.JPG")
    p = _cli(*args, "--glob", "*.jpg", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    got = {r["image"]: r for r in _rows(out / COVERAGE)}
    assert len(got) == 3 and got["IMG_0003.JPG"]["status"] == "ok" and got["IMG_0003.JPG"]["note"] == ""
    assert [got[p.name]["note"] for p in jpgs[:2]] == ["checked by hand"] * 2
    assert json.loads((out / "run.json").read_text())["exit_code"] == 0
    p = _cli(*args, env=env)  # nothing new: normal for an incremental run, nothing said under -q
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    p = _cli(*args, "--runtime", "keras", "--overwrite", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


# ----------------------------------------------------------------------------- the output deleted


@pytest.mark.slow  # a CLI run loading the model (and one starting Ray)
@pytest.mark.parametrize("in_process_max", ["40", "0"], ids=["in-process", "ray"])
def test_output_deleted_mid_run_fails_instead_of_ok(tmp_path, tiny_model_dir, demo_wider, leftovers, in_process_max):
    inp, out, gate = tmp_path / "in", tmp_path / "out", tmp_path / "gate"
    shutil.copytree(demo_wider / "images", inp)
    leftovers.gates.append(gate)
    env = _env(BATCHMASK_TEST_GATE=str(gate), BATCHMASK_TEST_GATE_FREE="1")
    p = subprocess.Popen([*BATCHMASK, "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                          "-w", "1", "--shard-size", "2", "--in-process-max", in_process_max],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    leftovers.procs.append(p)
    wait_until(Path(f"{gate}.reached").exists, "the run reached its second shard", p)
    shutil.rmtree(out)
    gate.touch()
    _, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_LOCK_LOST, err
    assert err.startswith("Error: lost the lock of ") and err.count("\n") == 1, err
    assert "deleted" in err
    assert not (out / "run.json").exists() and not (out / COVERAGE).exists()


# ----------------------------------------------------------------------------- jobs


@pytest.mark.slow  # a `jobs run` child process waiting for a lock
def test_jobs_run_wait_timeout_is_one_deadline_for_both_locks(tmp_path, tiny_model_dir):
    """The job's lock is busy for 6 s, the output's all along: --wait-timeout 8 gives up after about
    8 s in all, not after 6 s plus another 8 s for the output's lock."""
    import threading

    from batchmask.batch.lock import OutputLock
    from batchmask.jobs.execute import job_lock, run_job
    from batchmask.jobs.spec import load_job

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    job_file = tmp_path / "j.toml"
    job_file.write_text(f'name = "j"\nschedule = "*/5 * * * *"\ninput = "in"\noutput = "out"\n'
                        f"model = {json.dumps(str(tiny_model_dir))}\n")
    job = load_job(job_file)
    out_lock = OutputLock(StorageSpec(str(tmp_path / "out")).open()).acquire()
    held = threading.Event()

    def hold_job_lock() -> None:
        with job_lock("j", tmp_path / "locks"):
            held.set()
            time.sleep(6)

    t = threading.Thread(target=hold_job_lock)
    t.start()
    try:
        held.wait(10)
        t0 = time.monotonic()
        res = run_job(job, quiet=True, lock_dir=tmp_path / "locks", wait=True, wait_timeout=8)
        took = time.monotonic() - t0
    finally:
        t.join()
        out_lock.release()
    assert res.exit_code == EXIT_LOCKED, res.record
    assert took < 6 + 8, took  # before: 6 s for the job's lock, then 8 s more for the output's


def test_systemd_timer_runs_on_the_spring_forward_day(tmp_path):
    import datetime as dt

    from batchmask.jobs.render import render_systemd
    from batchmask.jobs.schedule import next_runs
    from batchmask.jobs.spec import load_job

    job = load_job(REPO / "jobs" / "nightly-uploads.toml")  # 30 2 * * * Europe/Paris
    timer = render_systemd([job], batchmask="/usr/bin/batchmask", user=None)["batchmask-nightly-uploads.timer"]
    cals = [ln.split("=", 1)[1] for ln in timer.splitlines() if ln.startswith("OnCalendar=")]
    # the next last Sunday of March: no 02:30 in Paris; cron and `jobs list` run at 03:00 (01:00 UTC)
    year = dt.datetime.now(dt.UTC).year + 1
    sunday = max(dt.date(year, 3, d) for d in range(25, 32) if dt.date(year, 3, d).weekday() == 6)
    before = dt.datetime(sunday.year, sunday.month, sunday.day, tzinfo=dt.UTC) - dt.timedelta(hours=12)
    moved = next_runs(job.schedule, job.timezone, 1, now=before)[0].astimezone(dt.UTC)
    assert (moved.date(), moved.hour, moved.minute) == (sunday, 1, 0)
    assert f"{moved:%Y-%m-%d %H:%M}:00 UTC" in cals
    need(shutil.which("systemd-analyze"), "systemd-analyze not found (systemd)")
    elapses = []
    for cal in cals:  # what systemd itself makes of each line, from the evening before
        p = subprocess.run(["systemd-analyze", "calendar", f"--base-time={before:%Y-%m-%d %H:%M:%S} UTC", cal],
                           capture_output=True, text=True, check=True, env=dict(os.environ, TZ="UTC"))
        elapses += [ln.split(": ", 1)[1].strip() for ln in p.stdout.splitlines() if "Next elapse" in ln]
    assert f"{moved:%a %Y-%m-%d %H:%M}:00 UTC" in elapses, elapses
