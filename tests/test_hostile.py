"""Hostile names and paths (issue 12): nothing lost, nothing written where it must not be."""

from __future__ import annotations

import csv
import io
import os

import pytest
from click.testing import CliRunner

from batchmask.batch.outputs import (
    COVERAGE,
    MaskNames,
    done_set,
    error_row,
    load_records,
    merge_parts,
    ok_row,
    overlay_of,
    part_name,
    rows_to_csv,
)
from batchmask.batch.storage import StorageSpec, check_rel
from batchmask.cli import main

GOOD_JOB = """\
name = "cam"
schedule = "*/5 * * * *"
input = "in"
output = "out"
"""


def _out(tmp_path):
    st = StorageSpec(str(tmp_path / "out")).open()
    st.ensure_root()
    return st


def test_carriage_return_in_an_image_name_survives_the_part_file(tmp_path):
    out = _out(tmp_path)
    rows = [ok_row("cam\rera/a.jpg", "masks/cam\rera/a.png", 4, 2, 1, 1, 0.9), ok_row("b.jpg", "masks/b.png", 4, 2, 0, 0, None)]
    out.write_bytes(part_name("r1", 0), rows_to_csv(rows))
    merge_parts(out)
    records, _ = load_records(out)
    assert sorted(records) == ["b.jpg", "cam\rera/a.jpg"]
    with open(tmp_path / "out" / COVERAGE, newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["b.jpg", "cam\rera/a.jpg"]
    assert b'"cam\rera/a.jpg"' in (tmp_path / "out" / COVERAGE).read_bytes()  # quoted
    assert b"\nb.jpg," in (tmp_path / "out" / COVERAGE).read_bytes()  # other rows unchanged: minimal quoting


def test_an_unreadable_part_file_is_kept_not_deleted(tmp_path):
    out = _out(tmp_path)
    bad = part_name("r1", 3)
    out.write_bytes(bad, b'image,status\n"a.jpg\xff,ok\n')
    records, parts = load_records(out)
    assert records == {} and parts == []
    kept = tmp_path / "out" / (bad + ".unreadable")
    assert kept.read_bytes() == b'image,status\n"a.jpg\xff,ok\n'
    assert not (tmp_path / "out" / bad).exists()


def test_storage_failures_recorded_by_older_versions_are_retried(tmp_path):
    out = _out(tmp_path)
    records = {"a.jpg": error_row("a.jpg", "cannot write outputs (OSError: [Errno 28] No space left on device)"),
               "b.jpg": error_row("b.jpg", "b.jpg: cannot decode image")}
    assert done_set(out, records) == {"b.jpg"}


def test_long_file_names_are_written(tmp_path):
    out = _out(tmp_path)
    name = "m" * 251 + ".png"  # 255 bytes: the longest legal name
    out.write_bytes(f"masks/{name}", b"x")
    assert (tmp_path / "out" / "masks" / name).read_bytes() == b"x"
    assert os.listdir(tmp_path / "out" / "masks") == [name]


def test_drive_letter_is_an_ordinary_name_on_posix(tmp_path):
    assert check_rel("c:/drive.jpg") == "c:/drive.jpg"
    out = _out(tmp_path)
    out.write_bytes("masks/c:/drive.png", b"x")
    assert (tmp_path / "out" / "masks" / "c:" / "drive.png").exists()


@pytest.mark.parametrize("order", [["q.png", "q.png/r.jpg", "q.png/s.png"], ["a.png/x.jpg", "a.tif"],
                                   ["a.png", "a.jpg/b.jpg", "a.jpg/c.jpg"], ["a.jpg/b.jpg", "a.jpg/c.jpg", "a.tif"]])
def test_a_name_that_is_both_file_and_folder_gets_masks_that_can_coexist(tmp_path, order):
    names = MaskNames()
    masks = [names.assign(r) for r in order]
    out = _out(tmp_path)
    for m in masks:  # a file where another mask (or overlay) needs a folder fails here
        out.write_bytes(m, b"x")
        out.write_bytes(overlay_of(m), b"x")
    assert len(set(masks)) == len(masks)
    assert sorted(out.iter_files("masks/")) == sorted(masks)
    assert sorted(out.iter_files("overlays/")) == sorted(map(overlay_of, masks))
    again = MaskNames(dict(zip(order, masks, strict=True)))  # a rerun keeps them
    assert [again.assign(r) for r in order] == masks


def test_newline_in_a_job_path_is_refused_everywhere(tmp_path):
    d = tmp_path / "jobs\n* * * * * root touch pwned #"
    d.mkdir()
    (d / "cam.toml").write_text(GOOD_JOB)
    res = CliRunner().invoke(main, ["jobs", "validate", str(d)])
    assert res.exit_code == 1 and "control character" in res.output, res.output
    res = CliRunner().invoke(main, ["jobs", "crontab", str(d), "--batchmask", "/usr/bin/batchmask"])
    assert res.exit_code == 1
    assert not any(line.startswith("* * * * * root") for line in res.output.splitlines()), res.output


@pytest.mark.parametrize("opt", ["--log-dir", "--lock-dir"])
def test_newline_in_log_or_lock_dir_is_refused(tmp_path, opt):
    (tmp_path / "cam.toml").write_text(GOOD_JOB)
    evil = str(tmp_path / "x\n* * * * * root touch /tmp/pwned")
    res = CliRunner().invoke(main, ["jobs", "crontab", str(tmp_path), "--batchmask", "/usr/bin/batchmask", opt, evil])
    assert res.exit_code == 1 and "control character" in res.output, res.output
    assert "* * * * * root" not in res.output.replace(repr(evil)[1:-1], "")


def test_systemd_escapes_dollar_and_refuses_newlines(tmp_path):
    from batchmask.jobs.render import render_systemd
    from batchmask.jobs.spec import load_job

    d = tmp_path / "$HOME jobs"
    d.mkdir()
    (d / "cam.toml").write_text(GOOD_JOB)
    job = load_job(d / "cam.toml")
    units = render_systemd([job], batchmask="/usr/bin/batchmask", user=None)
    exec_line = next(line for line in units["batchmask-cam.service"].splitlines() if line.startswith("ExecStart="))
    assert "$$HOME jobs/cam.toml" in exec_line and "$HOME" not in exec_line.replace("$$HOME", "")
    with pytest.raises(ValueError, match="control character"):
        render_systemd([job], batchmask="/usr/bin/batch\nmask", user=None)


def test_output_reached_through_a_symlink_in_the_input_is_not_listed(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    (inp / "sub" / "a.jpg").write_bytes(b"x")
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "m.png").write_bytes(b"x")
    os.symlink(out, inp / "link")
    st = StorageSpec(str(inp)).open()
    st.exclude_dir(str(out))
    assert list(st.iter_files()) == ["sub/a.jpg"]
    # the input named through a symlink, the output inside the real folder
    os.symlink(inp, tmp_path / "in-link")
    assert StorageSpec(str(tmp_path / "in-link")).open().relative_prefix_of(StorageSpec(str(inp / "sub")).open()) == "sub/"



# ----------------------------------------------------------------------------- model, lock, errors


def _bad_models(tmp_path, good):
    import shutil

    def copy(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    cases = {}
    d = copy("truncated")
    (d / "model.keras").write_bytes((good / "model.keras").read_bytes()[:50_000])
    cases["truncated"] = (d, "model.keras: not a readable Keras archive")
    d = copy("garbage-json")
    (d / "model.json").write_text("{not json")
    cases["garbage-json"] = (d, "model.json: not valid JSON")
    d = copy("empty-json")
    (d / "model.json").write_text("{}")
    cases["empty-json"] = (d, "model.json: no model configuration")
    d = copy("wrong-size")
    import json

    meta = json.loads((good / "model.json").read_text())
    meta["model"]["image_size"] = 96
    (d / "model.json").write_text(json.dumps(meta))
    cases["wrong-size"] = (d, "input is 64x64 but")
    return cases


def test_a_bad_model_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir):
    import ray

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(b"x")
    for name, (model, expected) in _bad_models(tmp_path, tiny_model_dir).items():
        out = tmp_path / f"out-{name}"
        res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(model), "-q"])
        assert res.exit_code == 1, (name, res.output)
        assert res.output.startswith("Error: ") and res.output.count("\n") == 1, (name, res.output)
        assert expected in res.output, (name, res.output)
        assert not out.exists(), name  # nothing written, not even the folder
    assert not ray.is_initialized()


def test_second_run_on_a_locked_output_is_refused_naming_the_holder(tmp_path, tiny_model_dir):
    import json

    from conftest import output_lock_held

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    with output_lock_held(out, seconds=60) as holder:
        res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"])
        assert res.exit_code == 4, res.output
        assert f"pid {holder.pid}" in res.output and "--wait" in res.output and res.output.count("\n") == 1
        assert json.loads((out / "_lock.json").read_text())["pid"] == holder.pid
        assert not (out / "run.json").exists() and not (out / "coverage.csv").exists()
        res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                                        "--wait", "--wait-timeout", "1"])
        assert res.exit_code == 4, res.output
    # the holder died: the kernel dropped its flock, the next run goes ahead
    res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "run.json").exists() and (out / "_lock.json").read_text() == ""


MERGER = """
import sys
from batchmask.batch.lock import OutputLock
from batchmask.batch.outputs import merge_parts, ok_row, part_name, rows_to_csv
from batchmask.batch.storage import StorageSpec

out = StorageSpec(sys.argv[1]).open()
who, n = sys.argv[2], int(sys.argv[3])
for k in range(n):
    rows = [ok_row(f"{who}/{k:04d}-{j}.jpg", f"masks/{who}/{k:04d}-{j}.png", 1, 1, 0, 0, None) for j in range(200)]
    out.write_bytes(part_name(f"run-{who}", k), rows_to_csv(rows))
    with OutputLock(out).acquire(wait=True):
        merge_parts(out)
"""


def test_two_processes_merging_parts_under_the_lock_lose_no_row(tmp_path):
    import subprocess
    import sys

    out = _out(tmp_path)
    script = tmp_path / "merger.py"
    script.write_text(MERGER)
    n = 25
    procs = [subprocess.Popen([sys.executable, str(script), out.root, who, str(n)], stderr=subprocess.PIPE, text=True)
             for who in ("a", "b")]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    records, parts = load_records(out)
    assert parts == [] and len(records) == 2 * n * 200


def test_disk_full_while_writing_a_mask_fails_the_shard_not_the_image():
    import errno
    from types import SimpleNamespace

    import numpy as np

    from batchmask.batch.outputs import Decoded
    from batchmask.batch.worker import MaskWorker, WorkerOptions

    def full(rel, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = object.__new__(MaskWorker)
    w.threshold, w.opts = 0.5, WorkerOptions()
    w.model = SimpleNamespace(image_size=8)
    w.out = SimpleNamespace(write_bytes=full)
    d = Decoded("a.jpg", "masks/a.png", width=8, height=8)
    with pytest.raises(OSError, match="No space"):
        w._finish(d, np.zeros((8, 8), np.float32))


def _hold_lock(url: str, env: dict | None = None):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from batchmask.batch.storage import StorageSpec\n"
        "from batchmask.batch.lock import OutputLock\n"
        f"lock = OutputLock(StorageSpec({url!r}).open()).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_jobs_run_respects_the_output_lock_of_a_manual_run(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    job = tmp_path / "cam.toml"
    job.write_text(GOOD_JOB + f'model = "{tiny_model_dir}"\n')
    holder = _hold_lock(str(out))
    try:
        res = CliRunner().invoke(main, ["jobs", "run", str(job), "--quiet", "--lock-dir", str(tmp_path / "locks")])
    finally:
        holder.kill()
        holder.wait()
    assert res.exit_code == 4, res.output
    assert "in use" in res.output and f"pid {holder.pid}" in res.output


@pytest.mark.slow  # the S3 server
def test_s3_url_with_credentials_is_refused_without_echoing_them(s3_server):
    from batchmask.batch.runner import run
    from batchmask.batch.storage import StorageError

    bucket = s3_server.new_bucket("cred")
    url = f"s3://AKIAEXAMPLE:{s3_server.secret}@{bucket}/in/"
    with pytest.raises(StorageError) as ei:
        run(url, f"s3://{bucket}/out/", endpoint_url=s3_server.endpoint_url, quiet=True)
    assert s3_server.secret not in str(ei.value) and "AKIAEXAMPLE" not in str(ei.value)
    assert "credentials in the URL" in str(ei.value)
    res = CliRunner().invoke(main, ["run", "-i", url, "-o", f"s3://{bucket}/out/", "--endpoint-url",
                                    s3_server.endpoint_url])
    assert res.exit_code == 1 and s3_server.secret not in res.output and res.output.count("\n") == 1


@pytest.mark.slow  # the S3 server
def test_s3_lock_is_exclusive_renewed_and_expires(s3_server, monkeypatch):
    import json
    import time

    import batchmask.batch.lock as outlock
    from batchmask.batch.lock import LOCK_FILE, OutputLock, OutputLocked

    bucket = s3_server.new_bucket("lock")
    spec = StorageSpec(f"s3://{bucket}/out/", s3_server.endpoint_url, s3_server.storage_options)
    a = OutputLock(spec.open()).acquire()
    with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        OutputLock(spec.open()).acquire()
    a.release()
    assert not s3_server.fs().exists(f"{bucket}/out/{LOCK_FILE}")
    # a crashed holder: its lock object stays, and blocks others until it expires
    crashed = OutputLock(spec.open())
    crashed._write_s3()
    with pytest.raises(OutputLocked):
        OutputLock(spec.open()).acquire()
    key = f"{bucket}/out/{LOCK_FILE}"
    rec = json.loads(s3_server.fs().cat_file(key))
    s3_server.fs().pipe_file(key, json.dumps(dict(rec, expires=time.time() - 1)).encode())  # its TTL has passed
    monkeypatch.setattr(outlock, "S3_LOCK_TTL_S", 0.6)  # renewed every 0.2 s
    b = OutputLock(spec.open()).acquire()
    first = json.loads(s3_server.fs().cat_file(key))
    assert first["token"] == b.token
    deadline = time.monotonic() + 60  # renewal: the record's expiry moves forward, still ours
    while (rec := json.loads(s3_server.fs().cat_file(key)))["expires"] <= first["expires"]:
        assert time.monotonic() < deadline, "the lock was never renewed"
        time.sleep(0.05)
    assert rec["token"] == b.token
    b.release()


# ----------------------------------------------------------------------------- with Ray (slow)


@pytest.mark.slow  # the S3 server
def test_s3_keys_that_look_odd_are_processed_into_a_local_output(s3_server, tiny_model_dir, demo_wider, tmp_path):
    """'c:/drive.jpg' is a name, not a drive; 'q.png' and 'q.png/r.jpg' both get masks on disk."""
    from batchmask.batch.runner import run

    bucket = s3_server.new_bucket("keys")
    fs = s3_server.fs()
    jpg = next(demo_wider.glob("images/*/*.jpg")).read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 60, 30)).save(buf, "PNG")
    for key, data in {"c:/drive.jpg": jpg, "q.png": buf.getvalue(), "q.png/r.jpg": jpg, "cr\rname.jpg": jpg}.items():
        fs.pipe_file(f"{bucket}/in/{key}", data)
    out = tmp_path / "out"
    s = run(f"s3://{bucket}/in/", str(out), str(tiny_model_dir), endpoint_url=s3_server.endpoint_url,
            storage_options=s3_server.storage_options, quiet=True)
    assert (s.total, s.ok, s.failed, s.exit_code) == (4, 4, 0, 0), s.run_json
    with open(out / "coverage.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["c:/drive.jpg", "cr\rname.jpg", "q.png", "q.png/r.jpg"]
    for r in rows.values():
        assert (out / r["mask"]).is_file(), r
    s2 = run(f"s3://{bucket}/in/", str(out), str(tiny_model_dir), endpoint_url=s3_server.endpoint_url,
             storage_options=s3_server.storage_options, quiet=True)
    assert (s2.skipped, s2.ok) == (4, 0)  # the \r row was kept: nothing redone


@pytest.mark.slow  # two CLI runs, each starting its own Ray (the default local-Ray path)
def test_quiet_run_prints_nothing_and_a_stalled_shard_fails_the_run_in_bounded_time(tmp_path, tiny_model_dir,
                                                                                    demo_wider):
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    inp = tmp_path / "in"
    shutil.copytree(demo_wider / "images", inp)
    exe = str(Path(sys.executable).parent / "batchmask")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("BATCHMASK_TEST_SHARD_DELAY", None)
    p = subprocess.run([exe, "run", "-i", str(inp), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir), "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    # every shard sleeps 600 s (a stalled storage): stopped after --shard-timeout, retried, then the run fails
    env["BATCHMASK_TEST_SHARD_DELAY"] = "600"
    out = tmp_path / "out2"
    # (the bound is behaviour, not speed: without the shard timeout the run would take > 600 s and
    # this subprocess's 400 s timeout fails the test; how long it takes is not asserted)
    p = subprocess.run([exe, "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                        "--shard-timeout", "4"], capture_output=True, text=True, env=env, timeout=400)
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("Error: shard") and "no progress for 4 s" in lines[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["exit_code"] == 1 and "no progress" in info["error"]
