"""The CPUs a run plans for: the affinity mask and a cgroup CPU quota (a pod's CPU limit), not the
machine's core count. Fake cgroup trees for the quota parsing; the real kernel affinity (a child
process pinned to one CPU) for what a run does with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_WIDER

from batchmask.batch.cpus import available_cpus, cgroup_cpu_limit


def _tree(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


def test_cgroup_v2_quota_is_the_tightest_level(tmp_path):
    root, proc = _tree(tmp_path, {"kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/c1/cpu.max": "max 100000\n",
                                  "kubepods/cpu.max": "max 100000\n"}, "0::/kubepods/pod1/c1\n")
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert available_cpus(root, proc) == min(3, len(os.sched_getaffinity(0)))
    # a container's own cgroup namespace: its cgroup is the root of the mount
    root, proc = _tree(tmp_path / "ns", {"cpu.max": "150000 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) == 1.5 and available_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))
    root, proc = _tree(tmp_path / "none", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) is None and available_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path):
    root, proc = _tree(tmp_path, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                                  "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
                       "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_limit(root, proc) == 0.5 and available_cpus(root, proc) == 1
    root, proc = _tree(tmp_path / "unlimited", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
                       "3:cpu:/\n")
    assert cgroup_cpu_limit(root, proc) is None


def _pinned_run(tmp_path: Path, model_dir: Path, *args: str) -> dict:
    """``batchmask run`` in a child process pinned to CPU 0 (as a 1-CPU container would be)."""
    out = tmp_path / "out"
    code = ("import os, sys; os.sched_setaffinity(0, {0}); from batchmask.cli import main; "
            "sys.argv = ['batchmask'] + sys.argv[1:]; main()")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", code, "run", "-i", str(DEMO_WIDER / "images"), "-o", str(out),
                        "-m", str(model_dir), "-q", *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell one from all")
def test_in_process_threads_follow_the_cpus_this_process_may_use(tmp_path, tiny_model_dir):
    info = _pinned_run(tmp_path, tiny_model_dir)
    assert info["plan"]["mode"] == "in-process" and info["in_process"]["threads"] == 1, info["in_process"]


@pytest.mark.slow  # starts Ray
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell one from all")
def test_local_ray_gets_the_cpus_this_process_may_use(tmp_path, tiny_model_dir):
    info = _pinned_run(tmp_path, tiny_model_dir, "--in-process-max", "0")
    assert info["plan"]["mode"] == "ray" and info["ray"]["cluster_cpus"] == 1, info["ray"]
