"""README promises of `batchmask run` that no other test checked (issue 14), in the fast tier.

Every run here has a handful of 32x32 images, so it is processed in process (no Ray), with
the tiny untrained model and the default runtime (ONNX Runtime: the model is exported once per
session, then a run takes a few hundredths of a second; Keras would load for seconds each time). The untrained model's
probabilities all lie within 1e-4 of 0.5, which makes thresholds 0.4 and 0.6 exact: every
pixel is face, or none is.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from batchmask.batch.outputs import COLUMNS, ok_row, part_name, rows_to_csv
from batchmask.batch.runner import run
from batchmask.cli import main


def images(root: Path, names: list[str], size: tuple[int, int] = (32, 24)) -> Path:
    rng = np.random.default_rng(len(names))
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(p)
    return root


def rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len({r["image"] for r in got}), "an image has two rows"
    return {r["image"]: r for r in got}


def cli(*args: str):
    return CliRunner().invoke(main, ["run", *args])


def test_exit_3_when_some_images_failed_then_0_when_nothing_is_new(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    (inp / "bad.jpg").write_bytes(b"not an image")
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir))
    assert res.exit_code == 3, res.output
    assert f"1 images failed: see the 'error' column of {out}/coverage.csv" in res.output
    by = rows(out)
    assert {k: r["status"] for k, r in by.items()} == {"a.png": "ok", "b.png": "ok", "bad.jpg": "error"}
    assert json.loads((out / "run.json").read_text())["exit_code"] == 3
    # The error row is the image's record: the next run has nothing to do and exits 0.
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert (res.exit_code, res.output) == (0, "")


@pytest.mark.parametrize("args", [
    ["-o", "OUT"],  # no --input
    ["-i", "IN", "-o", "OUT", "--threshold", "1.5"],
    ["-i", "IN", "-o", "OUT", "--workers", "0"],
    ["-i", "IN", "-o", "OUT", "--runtime", "tflite"],
    ["-i", "IN", "-o", "OUT", "--no-such-option"],
])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, args):
    inp = images(tmp_path / "in", ["a.png"])
    args = [a.replace("IN", str(inp)).replace("OUT", str(tmp_path / "out")) for a in args]
    res = CliRunner().invoke(main, ["run", *args])
    assert res.exit_code == 2, res.output
    assert "Usage:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_storage_denied_mid_run_exits_1_and_leaves_the_images_for_the_next_run(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """README: a permission error while writing is the run's problem, not the image's: exit 1,
    no error rows for those images, and the next run does them."""
    from batchmask.batch.storage import Storage

    inp, out = images(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"]), tmp_path / "out"
    real_write = Storage.write_bytes

    def denied(self, rel, data):
        if rel.startswith("masks/c"):
            raise PermissionError(errno.EACCES, "Permission denied", rel)
        return real_write(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", denied)
    # --batch-size 1: shards of 2 images (a, b) and (c, d); the second cannot be written.
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", "--batch-size", "1")
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Permission denied" in lines[0], res.output
    by = rows(out)
    assert {k: r["status"] for k, r in by.items()} == {"a.png": "ok", "b.png": "ok"}  # no error row for c, d
    info = json.loads((out / "run.json").read_text())
    assert info["exit_code"] == 1 and "Permission denied" in info["error"]
    monkeypatch.setattr(Storage, "write_bytes", real_write)
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert (s.ok, s.failed, s.skipped, s.exit_code) == (2, 0, 2, 0)
    assert {k: r["status"] for k, r in rows(out).items()} == dict.fromkeys(["a.png", "b.png", "c.png", "d.png"], "ok")


def test_unreadable_storage_fails_the_run_but_a_vanished_file_is_an_error_row(tmp_path, tiny_model_dir, monkeypatch):
    """README: storage that cannot be read (access denied) fails the run (exit 1) and leaves the
    images to the next run; a file that disappears after listing becomes an error row."""
    from batchmask.batch.storage import Storage

    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    real_read = Storage.read_bytes

    def failing_on(name: str, exc_type: type[OSError], code: int, text: str):
        """Storage.read_bytes that raises ``exc_type`` for ``name`` and reads every other file."""
        def read(self, rel, max_bytes=None):
            if rel == name:
                raise exc_type(code, text, rel)
            return real_read(self, rel, max_bytes)

        return read

    monkeypatch.setattr(Storage, "read_bytes", failing_on("b.png", PermissionError, errno.EACCES, "Access Denied"))
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert res.exit_code == 1 and "Access Denied" in res.output, res.output
    assert "b.png" not in rows(out)  # no error row: done next time
    monkeypatch.setattr(Storage, "read_bytes", real_read)
    (inp / "c.png").write_bytes((inp / "a.png").read_bytes())
    monkeypatch.setattr(Storage, "read_bytes",
                        failing_on("c.png", FileNotFoundError, errno.ENOENT, "No such file or directory"))
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q")
    assert res.exit_code == 3, res.output
    by = rows(out)
    assert by["b.png"]["status"] == "ok" and by["c.png"]["status"] == "error" and "cannot read" in by["c.png"]["error"]


def test_max_pixels_and_overlays(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["small.png"], size=(20, 10)), tmp_path / "out"
    images(inp, ["sub/big.png"], size=(40, 30))
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", "--max-pixels", "1000",
              "--overlays")
    assert res.exit_code == 3, res.output  # 40x30 = 1200 pixels > 1000: an error row, not a crash
    by = rows(out)
    assert by["small.png"]["status"] == "ok"
    assert by["sub/big.png"]["status"] == "error" and "max-pixels" in by["sub/big.png"]["error"]
    with Image.open(out / "overlays" / "small.jpg") as ov:  # --overlays: a JPEG preview per ok image
        assert ov.format == "JPEG" and ov.size == (20, 10)
    assert not (out / "overlays" / "sub").exists()


def test_error_rows_have_the_size_when_the_image_header_was_read(tmp_path, tiny_model_dir):
    """README (coverage.csv): "On error rows the measurement columns are empty. width and height
    are filled in when the image header could be read." Over --max-pixels, and a PNG cut short
    after its header: both headers say 40x30."""
    inp, out = images(tmp_path / "in", ["big.png"], size=(40, 30)), tmp_path / "out"
    data = (inp / "big.png").read_bytes()
    (inp / "cut.png").write_bytes(data[: len(data) // 2])
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", "--max-pixels", "1000")
    assert res.exit_code == 3, res.output
    by = rows(out)
    assert [by[k]["status"] for k in ("big.png", "cut.png")] == ["error", "error"]
    assert [(by[k]["width"], by[k]["height"]) for k in ("big.png", "cut.png")] == [("40", "30")] * 2


def test_part_files_left_by_a_killed_run_are_merged_by_the_next_run(tmp_path, tiny_model_dir):
    """A run killed with SIGKILL leaves its finished shards as _parts/*.csv (masks written,
    coverage.csv not yet merged) and may leave no coverage.csv at all: the next run merges them
    first and does not redo those images."""
    inp, out = images(tmp_path / "in", ["a.png", "b.png", "c.png"]), tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    for name in ("a", "b"):
        (out / "masks" / f"{name}.png").write_bytes(b"mask of the killed run")
    killed = [ok_row("a.png", "masks/a.png", 32, 24, 10, 1, 0.9), ok_row("b.png", "masks/b.png", 32, 24, 0, 0, None)]
    (out / part_name("20260101T000000Z000000-dead00", 0)).parent.mkdir(parents=True)
    (out / part_name("20260101T000000Z000000-dead00", 0)).write_bytes(rows_to_csv(killed))
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert (s.total, s.skipped, s.ok, s.exit_code) == (3, 2, 1, 0)
    by = rows(out)
    assert sorted(by) == ["a.png", "b.png", "c.png"]
    assert (by["a.png"]["face_pixels"], by["a.png"]["mean_confidence"]) == ("10", "0.9000")  # the killed run's row
    assert (out / "masks" / "a.png").read_bytes() == b"mask of the killed run"  # not redone
    assert not list((out / "_parts").iterdir())


def test_corrupt_coverage_csv_does_not_stop_the_run(tmp_path, tiny_model_dir):
    """An unreadable coverage.csv is ignored with a warning: every image is done again and the
    file is written anew, one row per image."""
    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    out.mkdir()
    (out / "coverage.csv").write_bytes(b"image,status\n\"a.png\xff\xfe,ok\n")
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert (s.ok, s.skipped, s.exit_code) == (2, 0, 0)
    by = rows(out)
    assert sorted(by) == ["a.png", "b.png"] and list(next(iter(by.values()))) == list(COLUMNS)


def test_glob_matches_the_relative_path_or_the_file_name(tmp_path, tiny_model_dir):
    inp = images(tmp_path / "in", ["cam1/a.png", "cam1/deep/b.png", "cam2/c.png", "d.jpg"])
    s = run(str(inp), str(tmp_path / "o1"), str(tiny_model_dir), glob="cam1/*", quiet=True)
    assert sorted(rows(tmp_path / "o1")) == ["cam1/a.png", "cam1/deep/b.png"]  # '*' also matches '/'
    assert (s.total, s.ok) == (2, 2)
    res = cli("-i", str(inp), "-o", str(tmp_path / "o2"), "-m", str(tiny_model_dir), "-q", "--glob", "c.png")
    assert res.exit_code == 0, res.output
    assert sorted(rows(tmp_path / "o2")) == ["cam2/c.png"]  # by file name
    res = cli("-i", str(inp), "-o", str(tmp_path / "o3"), "-m", str(tiny_model_dir), "-q", "--glob", "*.jpg")
    assert sorted(rows(tmp_path / "o3")) == ["d.jpg"]


def test_threshold_option_and_the_models_threshold(tmp_path, tiny_model_dir):
    """--threshold decides which pixels are face; without it the model.json threshold does. The
    untrained model's probabilities are all within 1e-4 of 0.5."""
    inp = images(tmp_path / "in", ["a.png", "b.png"], size=(40, 30))
    for thr, expected in (("0.4", 40 * 30), ("0.6", 0)):
        out = tmp_path / f"out{thr}"
        res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", "--threshold", thr)
        assert res.exit_code == 0, res.output
        for r in rows(out).values():
            assert int(r["face_pixels"]) == expected
            m = np.asarray(Image.open(out / r["mask"]))
            assert np.count_nonzero(m) == expected
        assert json.loads((out / "run.json").read_text())["options"]["threshold"] == float(thr)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    meta = json.loads((model / "model.json").read_text())
    meta["model"]["threshold"] = 0.4
    (model / "model.json").write_text(json.dumps(meta))
    s = run(str(inp), str(tmp_path / "out-model"), str(model), quiet=True)
    assert s.ok == 2 and {r["coverage"] for r in rows(tmp_path / "out-model").values()} == {"1.000000"}


def test_overwrite_redoes_every_image(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    (inp / "bad.jpg").write_bytes(b"")
    run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    good = (out / "masks" / "a.png").read_bytes()
    (out / "masks" / "a.png").write_bytes(b"stale")
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert (s.skipped, s.ok, s.failed) == (3, 0, 0)  # without --overwrite: all done already
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", "--overwrite")
    assert res.exit_code == 3, res.output  # bad.jpg was redone too, and failed again
    info = json.loads((out / "run.json").read_text())
    assert info["counts"] | {"retried_shards": 0} == {"total": 3, "skipped": 0, "ok": 2, "failed": 1,
                                                      "retried_shards": 0, "left": 0}
    assert (out / "masks" / "a.png").read_bytes() == good
    assert sorted(rows(out)) == ["a.png", "b.png", "bad.jpg"]


@pytest.mark.parametrize(("extra", "env", "address", "why"), [
    (["--address", "10.1.2.3:6379"], None, "10.1.2.3:6379", "a Ray cluster was given"),
    ([], "10.1.2.3:6379", "10.1.2.3:6379", "a Ray cluster was given"),
    (["--gpus-per-worker", "0.5"], None, "local", "GPU workers asked for"),
    (["--in-process-max", "0"], None, "local", "many images"),
])
def test_small_runs_use_ray_when_told_where_or_how(tmp_path, tiny_model_dir, monkeypatch, extra, env, address, why):
    """README: --address (default $RAY_ADDRESS) joins an existing cluster; a small run is done in
    process except when joining a cluster, with GPU workers, or with --in-process-max 0. ray.init
    is replaced: the test records where the run would connect."""
    import ray

    import batchmask.batch.runner as runner

    calls = []

    def fake_init(**kw):
        calls.append(kw)
        raise ConnectionError(f"no cluster at {kw.get('address')}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(runner, "execute_in_process", lambda *a, **k: pytest.fail("ran in process"))
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inp, out = images(tmp_path / "in", ["a.png"]), tmp_path / "out"
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q", *extra)
    assert res.exit_code == 1, res.output
    assert f"no cluster at {address}" in res.output
    assert [c["address"] for c in calls] == [address]
    assert ("num_cpus" in calls[0]) == (address == "local")  # a cluster of its own is sized, a joined one not
    plan = json.loads((out / "run.json").read_text())["plan"]
    assert plan["mode"] == "ray" and plan["why_ray"] == why


def test_more_workers_than_cpus_get_fractional_cpus_that_fit():
    """README: with more workers than CPUs, actors get fractional CPUs; the run never waits for
    CPUs that do not exist (every actor fits on the nodes at once)."""
    from batchmask.batch.rayexec import plan_cpus

    for workers, nodes, expected in [
        (1, [2.0], (2.0, 2)),
        (2, [2.0], (1.0, 1)),
        (3, [2.0], (0.5, 1)),
        (4, [2.0], (0.5, 1)),
        (5, [2.0], (1 / 3, 1)),
        (3, [1.0, 1.0], (0.5, 1)),
        (4, [3.0, 1.0], (1.0, 1)),
    ]:
        per, threads = plan_cpus(workers, nodes)
        assert (per, threads) == pytest.approx(expected), (workers, nodes)
        assert sum(int(c / per + 1e-9) for c in nodes) >= workers  # all of them can be placed


def test_run_json_and_cli_summary_for_a_small_run(tmp_path, tiny_model_dir):
    """The summary line and run.json's plan for a run done in process (README: run.json)."""
    inp, out = images(tmp_path / "in", ["x/a.png", "b.png"]), tmp_path / "out"
    res = cli("-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir))
    assert res.exit_code == 0, res.output
    assert "batchmask run: 2 ok, 0 failed, 0 skipped (already done) of 2 images" in res.output
    info = json.loads(io.StringIO((out / "run.json").read_text()).read())
    assert info["plan"]["mode"] == "in-process" and info["plan"]["images_to_do"] == 2
    assert info["actors"][0]["actor"] == "driver" and info["runtime"]["used"] in ("onnx", "keras")
    assert (out / "_lock.json").read_text() == ""


def test_more_workers_than_cpus_start_every_actor_with_a_fraction_and_a_warning(tmp_path, tiny_model_dir,
                                                                                monkeypatch, caplog):
    """The same promise where the actors are made: 3 workers on a 2-CPU cluster are all created at
    once with 0.5 CPU each, and a warning says so. Ray itself is replaced (no cluster starts)."""
    import ray

    import batchmask.batch.rayexec as rayexec

    created = []

    class FakeActorClass:
        def options(self, **kw):
            self.kw = kw
            return self

        def remote(self, *args):
            created.append(self.kw)
            return object()

    monkeypatch.setattr(rayexec, "start_ray", lambda address: False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}, "NodeID": "n1"}])
    monkeypatch.setattr(ray, "put", lambda obj: "blob")
    monkeypatch.setattr(ray, "remote", lambda cls: FakeActorClass())
    monkeypatch.setattr(ray, "kill", lambda *a, **k: None)
    monkeypatch.setattr(rayexec, "RayPool", lambda actors, probe=None: None)

    class NoDispatch:  # no work is handed out
        def __init__(self, *a, **k):
            pass

        def run(self):
            pass

    monkeypatch.setattr(rayexec, "Dispatcher", NoDispatch)
    inp = images(tmp_path / "in", ["a.png"])
    with caplog.at_level("WARNING", logger="batchmask"):
        run(str(inp), str(tmp_path / "out"), str(tiny_model_dir), workers=3, in_process_max=0, quiet=True)
    assert [c["num_cpus"] for c in created] == [0.5, 0.5, 0.5]
    assert "3 workers > 2 CPUs in the cluster: each actor gets 0.50 CPU (fractional)" in caplog.text
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["ray"]["cpus_per_actor"] == 0.5 and info["ray"]["threads_per_actor"] == 1
