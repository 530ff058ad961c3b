"""Hostile names and paths (issue 12): nothing lost, nothing written where it must not be."""

from __future__ import annotations

import csv
import os

import pytest
from click.testing import CliRunner

from batchmask.cli import main
from batchmask.outputs import (
    COVERAGE,
    MaskNames,
    done_set,
    error_row,
    load_records,
    merge_parts,
    ok_row,
    part_name,
    rows_to_csv,
)
from batchmask.storage import StorageSpec, check_rel

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
    records = merge_parts(out)
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


@pytest.mark.parametrize("order", [["q.png", "q.png/r.jpg", "q.png/s.png"], ["a.png/x.jpg", "a.tif"]])
def test_a_name_that_is_both_file_and_folder_gets_masks_that_can_coexist(tmp_path, order):
    names = MaskNames()
    masks = [names.assign(r) for r in order]
    out = _out(tmp_path)
    for m in masks:  # a file where another mask needs a folder fails here
        out.write_bytes(m, b"x")
    assert len(set(masks)) == len(masks)
    assert sorted(out.iter_files("masks/")) == sorted(masks)
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
    from batchmask.jobs import load_job
    from batchmask.jobs_render import render_systemd

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
    import subprocess
    import sys

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from batchmask.storage import StorageSpec\n"
        "from batchmask.outlock import OutputLock\n"
        f"lock = OutputLock(StorageSpec({str(out)!r}).open()).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"])
        assert res.exit_code == 4, res.output
        assert f"pid {holder.pid}" in res.output and "--wait" in res.output and res.output.count("\n") == 1
        assert json.loads((out / "_lock.json").read_text())["pid"] == holder.pid
        assert not (out / "run.json").exists() and not (out / "coverage.csv").exists()
        res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                                        "--wait", "--wait-timeout", "1"])
        assert res.exit_code == 4, res.output
    finally:
        holder.kill()
        holder.wait()
    # the holder died: the kernel dropped its flock, the next run goes ahead
    res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "run.json").exists() and (out / "_lock.json").read_text() == ""


MERGER = """
import sys
from batchmask.outlock import OutputLock
from batchmask.outputs import merge_parts, ok_row, part_name, rows_to_csv
from batchmask.storage import StorageSpec

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
    n = 50
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

    from batchmask.outputs import Decoded
    from batchmask.worker import MaskWorker, WorkerOptions

    def full(rel, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = object.__new__(MaskWorker)
    w.threshold, w.opts = 0.5, WorkerOptions()
    w.model = SimpleNamespace(image_size=8)
    w.out = SimpleNamespace(write_bytes=full)
    d = Decoded("a.jpg", "masks/a.png", width=8, height=8)
    with pytest.raises(OSError, match="No space"):
        w._finish(d, np.zeros((8, 8), np.float32))
