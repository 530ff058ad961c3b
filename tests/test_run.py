"""`batchmask run` end to end on a local Ray: bad-input corpus, rerun skip, a dead actor."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchmask.batch.runner import run

MAX_PIXELS = 1_000_000  # the "huge" image below is over it


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def make_corpus(root: Path, demo: Path) -> dict[str, str]:
    """Write the bad-input corpus; returns {relative path: expected status}."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8))
    real = next(iter(sorted(demo.glob("images/*/*.jpg"))))
    exp = {}

    def put(rel, status, im=None, fmt=None, data=None, **kw):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            p.write_bytes(data)
        else:
            _save(p, im, fmt, **kw)
        exp[rel] = status

    put("real/wider.jpg", "ok", data=real.read_bytes())
    put("bad/zero.jpg", "error", data=b"")
    jpg = io.BytesIO()
    rgb.resize((256, 192)).save(jpg, "JPEG")
    put("bad/truncated.jpg", "error", data=jpg.getvalue()[: len(jpg.getvalue()) // 3])
    put("bad/text.jpg", "error", data=b"this is not an image\n" * 10)
    put("modes/gray.png", "ok", rgb.convert("L"), "PNG")
    put("modes/rgba.png", "ok", rgb.convert("RGBA"), "PNG")
    put("modes/palette.png", "ok", rgb.convert("P"), "PNG")
    put("modes/16bit.png", "ok", Image.fromarray(rng.integers(0, 65535, (30, 40), np.uint16)), "PNG")
    put("modes/cmyk.jpg", "ok", rgb.convert("CMYK"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 40x20, shown 20x40
    put("modes/exif_rot.jpg", "ok", rgb.resize((40, 20)), "JPEG", exif=exif.tobytes())
    put("frames/anim.gif", "ok", rgb.convert("P"), "GIF", save_all=True,
        append_images=[rgb.rotate(90).convert("P")], duration=50)
    put("frames/multi.tif", "ok", rgb, "TIFF", save_all=True, append_images=[rgb.rotate(90)])
    put("sizes/tiny.png", "ok", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    put("sizes/huge.png", "error", Image.new("L", (1100, 1000)), "PNG")
    put("names/with space/ü ñame.JPG", "ok", rgb, "JPEG")
    put("names/dup.jpg", "ok", rgb, "JPEG")
    put("names/dup.png", "ok", rgb, "PNG")
    put("fmt/x.bmp", "ok", rgb, "BMP")
    put("fmt/x.webp", "ok", rgb, "WEBP")
    (root / "fmt" / "readme.txt").write_text("not listed")
    return exp


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this module's own, in this process. (Joining the session's Ray head instead was
    tried: under load the head's node was sometimes not yet registered, and the failed join left
    this process's Ray unable to start a local cluster for the next modules.)"""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # Ray in this process
def test_bad_input_corpus_then_rerun_skips(tmp_path, demo_wider, tiny_model_dir, local_ray, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    exp = make_corpus(inp, demo_wider)
    # Each actor's first shard waits until both actors are there: two actors really work at once.
    met = tmp_path / "rendezvous"
    monkeypatch.setenv("BATCHMASK_TEST_RENDEZVOUS", f"2:{met}")
    s = run(str(inp), str(out), str(tiny_model_dir), workers=2, batch_size=3, shard_size=4,
            max_pixels=MAX_PIXELS, quiet=True, overlays=True, in_process_max=0)
    rows = read_csv(out / "coverage.csv")
    got = {r["image"]: r["status"] for r in rows}
    assert got == exp, {k: (got.get(k), v) for k, v in exp.items() if got.get(k) != v}
    assert len(rows) == len(exp)
    assert (s.total, s.ok, s.failed, s.skipped, s.exit_code) == (len(exp), 15, 4, 0, 3)
    by = {r["image"]: r for r in rows}
    assert "0 bytes" in by["bad/zero.jpg"]["error"] and "max-pixels" in by["sizes/huge.png"]["error"]
    assert "cannot decode" in by["bad/text.jpg"]["error"]
    assert by["modes/exif_rot.jpg"]["width"] == "20" and by["modes/exif_rot.jpg"]["height"] == "40"
    assert by["names/dup.jpg"]["mask"] != by["names/dup.png"]["mask"]
    for r in rows:
        if r["status"] != "ok":
            assert r["mask"] == "" and r["error"]
            continue
        m = Image.open(out / r["mask"])
        assert m.mode == "L" and m.size == (int(r["width"]), int(r["height"]))
        vals = set(np.unique(np.asarray(m)).tolist())
        assert vals <= {0, 255}
        fp = int(np.count_nonzero(np.asarray(m)))
        assert fp == int(r["face_pixels"])
        assert float(r["coverage"]) == pytest.approx(fp / (m.size[0] * m.size[1]), abs=1e-6)
        assert (r["mean_confidence"] == "") == (fp == 0)
        assert int(r["faces"]) >= 0 and r["error"] == ""
    assert (out / "overlays" / "real" / "wider.jpg").is_file()
    assert not list((out / "_parts").glob("*.csv"))
    info = json.loads((out / "run.json").read_text())
    assert info["counts"]["ok"] == 15 and info["counts"]["failed"] == 4 and info["exit_code"] == 3
    assert info["ray"]["cpus_per_actor"] == 1.0 and len(info["actors"]) == 2
    assert sum(a["images"] for a in info["actors"]) == len(exp) and all(a["images"] > 0 for a in info["actors"])
    assert all(a["busy_s"] > 0 and a["peak_rss_mb"] > 0 for a in info["actors"])  # the actors' stats, asked at the end
    met_pids = {int(p.name) for p in met.iterdir()}
    assert len(met_pids) == 2 and met_pids == {pid for a in info["actors"] for pid in a["pids"]}
    monkeypatch.delenv("BATCHMASK_TEST_RENDEZVOUS")

    # rerun: everything done -> no Ray work, nothing rewritten
    mtime = (out / "coverage.csv").stat().st_mtime_ns
    s2 = run(str(inp), str(out), str(tiny_model_dir), workers=2, quiet=True, max_pixels=MAX_PIXELS)
    assert (s2.total, s2.ok, s2.failed, s2.skipped, s2.exit_code) == (len(exp), 0, 0, len(exp), 0)
    assert "ray" not in s2.run_json and (out / "coverage.csv").stat().st_mtime_ns == mtime

    # a deleted mask and --retry-errors bring exactly those images back
    (out / by["modes/gray.png"]["mask"]).unlink()
    s3 = run(str(inp), str(out), str(tiny_model_dir), quiet=True, max_pixels=MAX_PIXELS, retry_errors=True)
    assert (s3.ok, s3.failed, s3.skipped) == (1, 4, len(exp) - 5)
    assert len(read_csv(out / "coverage.csv")) == len(exp)


@pytest.mark.slow  # Ray in this process
def test_dead_actor_is_replaced_and_output_is_exactly_once(tmp_path, demo_wider, tiny_model_dir, local_ray,
                                                           monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        shutil.copytree(demo_wider / "images", inp / f"copy{k}")
    n = 30
    marker = tmp_path / "crashed"
    monkeypatch.setenv("BATCHMASK_TEST_CRASH_AFTER", f"6:{marker}")
    s = run(str(inp), str(out), str(tiny_model_dir), workers=1, batch_size=2, shard_size=4, quiet=True)
    assert marker.exists(), "the test hook did not kill the actor"
    rows = read_csv(out / "coverage.csv")
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)) == n and s.ok == n and s.exit_code == 0
    masks = sorted(p.relative_to(out).as_posix() for p in (out / "masks").rglob("*") if p.is_file())
    assert masks == sorted(r["mask"] for r in rows)  # no partial or temporary files
    info = json.loads((out / "run.json").read_text())
    assert info["actors"][0]["restarts"] >= 1
    assert int(marker.read_text()) in info["actors"][0]["pids"]


@pytest.mark.slow  # Ray in this process
def test_new_image_never_takes_a_recorded_mask_name(tmp_path, tiny_model_dir, local_ray):
    inp, out = tmp_path / "in", tmp_path / "out"
    _save(inp / "a.png", Image.new("RGB", (20, 10), (200, 10, 10)), "PNG")
    run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    before = (out / "masks" / "a.png").read_bytes()
    _save(inp / "a.jpg", Image.new("RGB", (30, 16), (10, 200, 10)), "JPEG")  # sorts before a.png
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    by = {r["image"]: r for r in read_csv(out / "coverage.csv")}
    assert (s.ok, s.skipped) == (1, 1) and by["a.png"]["mask"] == "masks/a.png"
    assert by["a.jpg"]["mask"] not in ("", "masks/a.png") and (out / by["a.jpg"]["mask"]).is_file()
    assert (out / "masks" / "a.png").read_bytes() == before
    assert Image.open(out / by["a.jpg"]["mask"]).size == (30, 16)


@pytest.mark.slow  # Ray in this process
def test_image_that_kills_the_only_worker_becomes_an_error_row(tmp_path, demo_wider, tiny_model_dir, local_ray,
                                                                 monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    real = sorted(demo_wider.glob("images/*/*.jpg"))[:3]
    inp.mkdir()
    for k, p in enumerate(real):
        shutil.copy(p, inp / f"{k}.jpg")
    shutil.copy(real[0], inp / "1b-poison.jpg")  # shares a shard with 1.jpg
    monkeypatch.setenv("BATCHMASK_TEST_CRASH_ON", "poison")
    s = run(str(inp), str(out), str(tiny_model_dir), workers=1, batch_size=2, shard_size=2, quiet=True)
    by = {r["image"]: r for r in read_csv(out / "coverage.csv")}
    assert sorted(by) == ["0.jpg", "1.jpg", "1b-poison.jpg", "2.jpg"]
    assert by["1b-poison.jpg"]["status"] == "error" and "decoder crashed" in by["1b-poison.jpg"]["error"]
    assert all(by[k]["status"] == "ok" for k in ("0.jpg", "1.jpg", "2.jpg"))
    assert (s.ok, s.failed, s.exit_code) == (3, 1, 3)
    assert json.loads((out / "run.json").read_text())["actors"][0]["restarts"] >= 2


def test_without_an_address_run_starts_a_ray_of_its_own(monkeypatch):
    """README: --address defaults to $RAY_ADDRESS, else a local Ray of batchmask's own. A plain
    ray.init() joins the latest `ray start` cluster on the machine and then fails on num_cpus
    (seen: "When connecting to an existing cluster, num_cpus and num_gpus must not be provided")."""
    import ray

    from batchmask.batch.rayexec import start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert start_ray(None) is True
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= 1
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    start_ray(None)
    assert calls[-1]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[-1]


def test_a_failing_run_gives_up_on_stalled_bookkeeping(monkeypatch, caplog):
    """A stalled S3 endpoint held a failing run's exit for 14+ minutes in the run.json PUT: the
    failing path's storage writes are bounded; a healthy run's are not, and errors still surface."""
    import threading

    from batchmask.batch import finish, runner

    monkeypatch.setattr(finish, "FAILING_IO_S", 0.3)
    never = threading.Event()
    started, finished = threading.Event(), threading.Event()

    class StalledStorage:
        def write_bytes(self, rel, data):
            started.set()
            never.wait(30)
            finished.set()

    runner._write_run_json(StalledStorage(), {"exit_code": 1}, failing=True)
    # it gave up on the write: returned while the write was still stalled (no clock involved)
    assert started.is_set() and not finished.is_set()
    assert "could not write run.json" in caplog.text and "did not answer within" in caplog.text

    class BrokenStorage:
        def write_bytes(self, rel, data):
            raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        runner._write_run_json(BrokenStorage(), {}, failing=False)
    runner._write_run_json(BrokenStorage(), {}, failing=True)  # logged, not raised
    assert "disk on fire" in caplog.text
    never.set()
