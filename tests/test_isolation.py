"""One bad entry costs only itself: special files, oversized files, names too long for the output,
unreadable folders and bugs in our own per-image code (real files, FIFOs, symlinks, processes)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchmask.batch.storage import EntryError, Storage, StorageError, StorageSpec
from batchmask.batch.testhooks import NoHooks

BATCHMASK = str(Path(sys.executable).parent / "batchmask")
#: A stem of 251 bytes: "<stem>.jpg" and "<stem>.png" are legal names (255 bytes), but the second
#: image's mask, "<stem>.png.png", would be 259.
LONG_STEM = "x" * 251


def _jpeg(path: Path, colour=(120, 80, 40), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG" if path.suffix == ".jpg" else "PNG")


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def _hostile_input(inp: Path) -> list[str]:
    """Ordinary images beside a FIFO, a symlink to /dev/zero, a 300 MB sparse TIFF and a name
    whose second mask would be too long; returns the ordinary ones."""
    ordinary = ["a.jpg", "b/c.jpg", "d.jpg", f"{LONG_STEM}.jpg"]
    for k, rel in enumerate(ordinary):
        _jpeg(inp / rel, (40 * k, 90, 160))
    _jpeg(inp / f"{LONG_STEM}.png", (10, 200, 10))
    os.mkfifo(inp / "pipe.jpg")
    os.symlink("/dev/zero", inp / "zero.jpg")
    with open(inp / "huge.tif", "wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: costs no disk, but more than --max-bytes' default
    return ordinary


# ----------------------------------------------------------------------------- storage (fast)


def test_read_bytes_refuses_special_and_oversized_files_before_reading(tmp_path):
    _jpeg(tmp_path / "ok.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    with open(tmp_path / "big.jpg", "wb") as f:
        f.truncate(10_000)
    st = Storage(StorageSpec(str(tmp_path)))
    assert st.read_bytes("ok.jpg", 10_000) == (tmp_path / "ok.jpg").read_bytes()
    # A writer waiting for a reader: had read_bytes opened the FIFO, the writer's open() would return.
    writer = threading.Thread(target=lambda: os.close(os.open(tmp_path / "pipe.jpg", os.O_WRONLY)), daemon=True)
    writer.start()
    with pytest.raises(EntryError, match="not a regular file \\(a FIFO\\)"):
        st.read_bytes("pipe.jpg", 10_000)  # returns at once: a FIFO is never opened, never waited on
    writer.join(0.5)
    assert writer.is_alive()  # still waiting: nobody opened the FIFO
    os.close(os.open(tmp_path / "pipe.jpg", os.O_RDONLY | os.O_NONBLOCK))  # let it go
    writer.join(5)
    with pytest.raises(EntryError, match="a character device"):
        st.read_bytes("zero.jpg", 10_000)
    with pytest.raises(EntryError, match="10000 bytes, over the limit of 9999 \\(--max-bytes\\)"):
        st.read_bytes("big.jpg", 9_999)
    assert len(st.read_bytes("big.jpg", 10_000)) == 10_000


def test_check_name_refuses_a_name_longer_than_the_file_system_allows(tmp_path):
    st = Storage(StorageSpec(str(tmp_path)))
    st.check_name(f"masks/{LONG_STEM}.png")  # 255 bytes: fine
    with pytest.raises(EntryError, match="259 bytes, over the file system's limit of 255"):
        st.check_name(f"masks/{LONG_STEM}.png.png")


def test_an_unreadable_subfolder_fails_the_listing(tmp_path):
    """README: unreadable storage fails the run. A subfolder that cannot be listed was skipped with
    a warning, and the run said its listing was complete."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bm-unreadable-"))  # traversable by an unprivileged user
    try:
        root.chmod(0o755)
        _jpeg(root / "a.jpg")
        _jpeg(root / "locked" / "b.jpg")
        _jpeg(root / "z.jpg")
        (root / "locked").chmod(0o000)
        st = Storage(StorageSpec(str(root)))
        with _unprivileged(), pytest.raises(StorageError, match="locked: cannot list \\(Permission denied\\)"):
            list(st.iter_files())
    finally:
        (root / "locked").chmod(0o755)
        import shutil

        shutil.rmtree(root)


@contextlib.contextmanager
def _unprivileged():
    """As root, permissions are not checked: list as 'nobody' (the effective uid only, and back)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


# ----------------------------------------------------------------------------- the worker (fast)


class _BuggyHooks(NoHooks):
    """A ValueError raised from inside the per-image path: what a bug in our own code looks like."""

    def image(self, rel: str) -> None:
        raise ValueError("a bug, not a bad image")


def test_a_value_error_from_our_code_fails_the_shard_not_the_images(tmp_path, tiny_model_dir):
    from batchmask.batch.worker import MaskWorker, WorkerOptions
    from batchmask.inference import META_FILE, MODEL_FILE

    inp, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        _jpeg(inp / f"{k}.jpg")
    files = {n: (tiny_model_dir / n).read_bytes() for n in (MODEL_FILE, META_FILE)}
    w = MaskWorker(files, StorageSpec(str(inp)), StorageSpec(str(out)), WorkerOptions(run_id="r"),
                   hooks=_BuggyHooks())
    try:
        with pytest.raises(ValueError, match="a bug"):
            w.process(0, [(f"{k}.jpg", f"masks/{k}.png") for k in range(3)])
    finally:
        w.pool.shutdown()
    assert not (out / "_parts").exists()  # no rows: the shard failed


# ----------------------------------------------------------------------------- whole runs


def _run_cli(inp: Path, out: Path, model: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Bounded memory: before the fix the driver read /dev/zero until the machine ran out.
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30))

    return subprocess.run([BATCHMASK, "run", "-i", str(inp), "-o", str(out), "-m", str(model), "-q", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=limit)


@pytest.mark.parametrize("mode", ["in-process", pytest.param("ray", marks=pytest.mark.slow)])
def test_each_bad_entry_is_its_own_error_row_and_the_rest_is_done(tmp_path, tiny_model_dir, mode):
    """A FIFO (open() used to block: in process SIGTERM could not end the run; with Ray its shard
    timed out on every run), /dev/zero and a 300 MB sparse file (read whole), a mask name too long
    (the shard failed, forever): each is its own row now, and every ordinary image is done."""
    inp, out = tmp_path / "in", tmp_path / "out"
    ordinary = _hostile_input(inp)
    extra = ["--shard-timeout", "60"] + (["--in-process-max", "0"] if mode == "ray" else [])
    p = _run_cli(inp, out, tiny_model_dir, *extra)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Error" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    rows = _rows(out)
    assert sorted(rows) == sorted([*ordinary, f"{LONG_STEM}.png", "huge.tif", "pipe.jpg", "zero.jpg"])
    for rel in ordinary:
        assert rows[rel]["status"] == "ok" and (out / rows[rel]["mask"]).is_file(), rows[rel]
    assert "not a regular file (a FIFO)" in rows["pipe.jpg"]["error"]
    assert "not a regular file (a character device)" in rows["zero.jpg"]["error"]
    assert f"{300 * 1024 * 1024} bytes, over the limit of {256 * 1024 * 1024} (--max-bytes)" in rows["huge.tif"]["error"]
    assert "over the file system's limit of 255" in rows[f"{LONG_STEM}.png"]["error"]
    info = json.loads((out / "run.json").read_text())
    assert info["plan"]["mode"] == mode and info["options"]["max_bytes"] == 256 * 1024 * 1024
    assert info["counts"]["retried_shards"] == 0  # nothing failed a shard
    # the rerun has nothing to do: the rows are permanent (they are the entries' own properties)
    p2 = _run_cli(inp, out, tiny_model_dir)
    assert p2.returncode == 0 and json.loads((out / "run.json").read_text())["counts"]["skipped"] == 8


@pytest.mark.slow  # the S3 server
def test_an_s3_object_over_max_bytes_is_an_error_row_and_never_read(s3_server, tiny_model_dir, tmp_path):
    from batchmask.batch.runner import run

    bucket = s3_server.new_bucket("size")
    fs = s3_server.fs()
    small, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (20, 20), (90, 60, 30)).save(small, "PNG")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(big, "PNG")
    fs.pipe_file(f"{bucket}/in/small.png", small.getvalue())
    fs.pipe_file(f"{bucket}/in/big.png", big.getvalue())
    limit = len(small.getvalue()) + 10
    s = run(f"s3://{bucket}/in/", str(tmp_path / "out"), str(tiny_model_dir), endpoint_url=s3_server.endpoint_url,
            storage_options=s3_server.storage_options, quiet=True, max_bytes=limit)
    rows = _rows(tmp_path / "out")
    assert (s.ok, s.failed, s.exit_code) == (1, 1, 3)
    assert rows["small.png"]["status"] == "ok"
    assert f"{len(big.getvalue())} bytes, over the limit of {limit} (--max-bytes)" in rows["big.png"]["error"]
