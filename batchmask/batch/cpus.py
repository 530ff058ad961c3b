"""How many CPUs this process may use: the CPU affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` is the machine's count: in a Kubernetes pod with ``limits.cpu: 2`` on a 64-core
node it says 64, and a local Ray (or the in-process thread pool) sized from it runs 64 threads
on 2 CPUs' worth of time. The quota is read from cgroup v2 (``cpu.max`` of this process's cgroup
and its parents) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); a fractional limit is
rounded up (1.5 CPUs: 2 threads).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def available_cpus(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        n = min(n, math.ceil(quota - 1e-9))
    return max(1, n)


def cgroup_cpu_limit(root: str | os.PathLike = CGROUP_ROOT,
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroup and its parents, or None."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: one tree, cpu.max in each level that limits
            dirs = [root / rel, *(root / rel).parents] if rel else [root]
            limits += [_v2_limit(d / "cpu.max") for d in dirs if d == root or root in d.parents]
        elif "cpu" in controllers.split(","):
            for mount in (root / "cpu,cpuacct", root / "cpu"):
                for d in (mount / rel, mount):
                    limits.append(_v1_limit(d))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(d: Path) -> float | None:
    try:
        quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
