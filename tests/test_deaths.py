"""Worker deaths caused by the machine (the kernel's OOM killer under a real memory limit, a SIGKILL
from outside) never become an image's error row; a crash of the decoder on an image still does.
Real Ray, real processes, real signals, a real memory cgroup where the machine has one."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from batchmask.batch.plan import cap_workers, cgroup_memory_free, worker_memory_mb
from batchmask.batch.probe import probe_image, verdict_of
from batchmask.batch.storage import StorageSpec

BATCHMASK = str(Path(sys.executable).parent / "batchmask")


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def _images(inp: Path, demo_wider: Path, names: list[str]) -> None:
    real = sorted(demo_wider.glob("images/*/*.jpg"))
    inp.mkdir(parents=True)
    for k, name in enumerate(names):
        shutil.copy(real[k % len(real)], inp / name)


NAMES = ["a.jpg", "b.jpg", "c-victim.jpg", "d.jpg", "e.jpg", "f.jpg"]


# ----------------------------------------------------------------------------- pure (fast)


def test_verdicts_blame_the_image_only_for_a_crash_signal():
    assert verdict_of(-signal.SIGSEGV) == {"crashed": True, "how": "SIGSEGV"}
    assert verdict_of(-signal.SIGABRT)["crashed"]
    for rc in (-signal.SIGKILL, -signal.SIGTERM, 0, 1):  # OOM killer / outside / fine / in doubt
        assert not verdict_of(rc)["crashed"]
    assert verdict_of(-signal.SIGKILL)["how"] == "killed by SIGKILL"


def test_the_probe_sees_a_crash_and_a_kill_for_what_they_are(tmp_path, demo_wider, monkeypatch):
    """The child really runs: a decoder crash (SIGSEGV) is the image's; the same image decodes fine
    without the crash hook; a SIGKILL is not the image's."""
    _images(tmp_path / "in", demo_wider, ["x.jpg"])
    spec = StorageSpec(str(tmp_path / "in"))
    settings = {"max_bytes": 1 << 28, "max_pixels": 50_000_000, "image_size": 64, "draft": True}
    assert probe_image(spec, "x.jpg", settings) == {"crashed": False, "how": "decoded alone without a crash"}
    monkeypatch.setenv("BATCHMASK_TEST_CRASH_ON", "x.jpg")
    assert probe_image(spec, "x.jpg", settings) == {"crashed": True, "how": "SIGSEGV"}
    monkeypatch.delenv("BATCHMASK_TEST_CRASH_ON")
    killer = _Killer(tmp_path / "pids")
    monkeypatch.setenv("BATCHMASK_TEST_KILL_ON", f"x.jpg:{killer.dir}")
    try:
        assert probe_image(spec, "x.jpg", settings) == {"crashed": False, "how": "killed by SIGKILL"}
    finally:
        killer.stop()
    assert len(killer.killed) == 1


def test_workers_are_capped_by_the_memory_of_each_node():
    per = worker_memory_mb("onnx", 8, 512)
    assert per == 250 + 8 * 175  # the default model's measured figure (docs/design.md)
    assert worker_memory_mb("onnx", 8, 64) < 300  # a small input needs little beyond the process
    gib = 2**30
    assert cap_workers(64, [7 * gib], per) == 4  # the 7 GB cgroup: 4, not 64
    assert cap_workers(64, [3 * gib, 3 * gib], per) == 2  # per node: 1.5 workers fit nowhere twice
    assert cap_workers(2, [100 * gib], per) == 2 and cap_workers(5, [0.5 * gib], per) == 1
    assert cap_workers(64, [0.0], per) == 64  # no memory figure from Ray: no cap


def test_cgroup_memory_free_reads_v1_and_v2_limits_and_their_parents(tmp_path):
    proc = tmp_path / "cgroup"
    v1 = tmp_path / "memory" / "outer" / "inner"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("100")
    (v1.parent / "memory.limit_in_bytes").write_text("5000")  # the parent's limit applies
    (v1.parent / "memory.usage_in_bytes").write_text("1000")
    proc.write_text("4:memory:/outer/inner\n1:cpu:/\n")
    assert cgroup_memory_free(str(proc), str(tmp_path)) == 4000
    v2 = tmp_path / "job"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("7")
    proc.write_text("0::/job\n")
    assert cgroup_memory_free(str(proc), str(tmp_path)) is None


def test_a_run_confined_to_a_memory_cgroup_sees_its_limit():
    """In a real cgroup of 1 GB: what Ray cannot see below the mount's root (docs/design.md)."""
    cg = _memory_cgroup(1 << 30)
    if cg is None:
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1 or v2's memory controller)")
    d, _ = cg
    try:
        p = subprocess.run([sys.executable, "-c", "from batchmask.batch.plan import cgroup_memory_free as f; "
                            "print(f())"], capture_output=True, text=True, timeout=120,
                           preexec_fn=lambda: (d / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        d.rmdir()
    assert p.returncode == 0, p.stderr
    assert 0 < float(p.stdout) < 1 << 30


# ----------------------------------------------------------------------------- with Ray (slow)


class _Killer:
    """Kills, with SIGKILL and from outside, every process that announces itself in ``dir``
    (the BATCHMASK_TEST_KILL_ON hook), as the OOM killer or an operator would."""

    def __init__(self, d: Path):
        self.dir, self.killed, self._stop = d, [], threading.Event()
        d.mkdir(parents=True, exist_ok=True)
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for p in self.dir.iterdir():
                pid = int(p.name)
                p.unlink()
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def small_ray():
    """Ray in this process with 2 CPUs and 600 MB of memory for workers (two of the tiny model's)."""
    import ray

    ray.init(num_cpus=2, _memory=600 * 2**20, include_dashboard=False, logging_level="WARNING",
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # Ray in this process
def test_a_worker_killed_from_outside_every_time_leaves_the_image_for_the_next_run(
        tmp_path, demo_wider, tiny_model_dir, small_ray, monkeypatch):
    """Before: 'the worker process died processing this image, also when it was processed alone
    (ActorUnavailableError)', a permanent error row that every later run skipped."""
    from batchmask.batch.runner import RunError, run

    inp, out = tmp_path / "in", tmp_path / "out"
    _images(inp, demo_wider, NAMES)
    killer = _Killer(tmp_path / "pids")
    monkeypatch.setenv("BATCHMASK_TEST_KILL_ON", f"victim:{killer.dir}")
    try:
        with pytest.raises(RunError, match=r"1 image left for the next run \(c-victim.jpg\)"):
            run(str(inp), str(out), str(tiny_model_dir), workers=1, batch_size=3, shard_size=3, quiet=True,
                in_process_max=0)
    finally:
        killer.stop()
    # attempt 1, the retry alone, the image alone, and its probe: each killed
    assert len(killer.killed) == 4, killer.killed
    rows = _rows(out)
    assert sorted(rows) == sorted(n for n in NAMES if n != "c-victim.jpg")
    assert all(r["status"] == "ok" for r in rows.values())
    info = json.loads((out / "run.json").read_text())
    assert info["exit_code"] == 1 and info["counts"]["left"] == 1 and info["counts"]["failed"] == 0
    monkeypatch.delenv("BATCHMASK_TEST_KILL_ON")
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)  # the rerun does it
    assert (s.ok, s.failed, s.skipped, s.exit_code) == (1, 0, 5, 0)
    assert _rows(out)["c-victim.jpg"]["status"] == "ok"


@pytest.mark.slow  # Ray in this process
def test_workers_beyond_the_clusters_memory_are_not_started(tmp_path, demo_wider, tiny_model_dir, small_ray,
                                                             caplog):
    from batchmask.batch.runner import run

    _images(tmp_path / "in", demo_wider, NAMES)
    with caplog.at_level(logging.WARNING, logger="batchmask"):
        s = run(str(tmp_path / "in"), str(tmp_path / "out"), str(tiny_model_dir), workers=8, quiet=True,
                in_process_max=0)
    assert s.ok == len(NAMES)
    per = worker_memory_mb("onnx", 8, 64)
    assert s.run_json["ray"]["workers"] == 600 // per == len(s.run_json["actors"])
    assert s.run_json["ray"]["memory_per_worker_mb"] == per
    assert s.run_json["plan"]["shard_size"] == 3  # planned for 8 workers (1), cut for the 2 that started
    lines = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"--workers 8 capped to {600 // per}: each worker needs about")


def _memory_cgroup(limit: int) -> tuple[Path, str] | None:
    """A new memory cgroup limited to ``limit`` bytes (no swap): (folder, name of the limit file),
    or None where this machine does not let us make one (not root, no memory controller)."""
    name = f"batchmask-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup")
    try:
        if "memory" in (v2 / "cgroup.controllers").read_text().split():
            d = v2 / name
            d.mkdir()
            (d / "memory.max").write_text(str(limit))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            return d, "memory.max"
    except OSError:
        pass
    v1 = Path("/sys/fs/cgroup/memory")
    try:
        d = v1 / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
        if (d / "memory.memsw.limit_in_bytes").exists():
            (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return d, "memory.limit_in_bytes"
    except OSError:
        return None


def _oom_kills(d: Path) -> int:
    for name in ("memory.events", "memory.oom_control"):  # v2, v1
        f = d / name
        if f.exists():
            for line in f.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return 0


@pytest.mark.slow  # a CLI run with its own Ray, in a memory cgroup
def test_the_kernel_oom_killer_never_writes_an_error_row(tmp_path, demo_wider, tiny_model_dir):
    """The run in a 2.5 GB memory cgroup; reading one ordinary image makes its worker (and the probe)
    allocate 4 GB, so the kernel's OOM killer ends it every time. Before: an error row for it,
    exit 3, and the rerun skipped it."""
    cg = _memory_cgroup(2560 * 2**20)
    if cg is None:
        pytest.skip("no writable memory cgroup here (needs root and cgroup v1 or v2's memory controller)")
    d, _ = cg
    inp, out = tmp_path / "in", tmp_path / "out"
    _images(inp, demo_wider, NAMES)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", BATCHMASK_TEST_ALLOC_ON="victim:4096")

    def enter() -> None:
        (d / "cgroup.procs").write_text(str(os.getpid()))

    try:
        p = subprocess.run([BATCHMASK, "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                            "-w", "1", "-b", "3", "--shard-size", "3", "--in-process-max", "0"],
                           capture_output=True, text=True, env=env, timeout=600, preexec_fn=enter)
        kills = _oom_kills(d)
    finally:
        for _ in range(50):  # empty once the run's Ray processes are gone
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.2)
    assert p.returncode == 1, p.stderr[-3000:]
    assert kills >= 3, (kills, p.stderr[-3000:])  # the shard, its retry, the image alone (and the probe)
    last = [x for x in p.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("Error: 1 image left for the next run (c-victim.jpg)"), p.stderr[-3000:]
    rows = _rows(out)
    assert "c-victim.jpg" not in rows and all(r["status"] == "ok" for r in rows.values()) and len(rows) == 5
    p2 = subprocess.run([BATCHMASK, "run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q"],
                        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                        timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert _rows(out)["c-victim.jpg"]["status"] == "ok"
