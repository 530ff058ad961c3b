"""Planning a ``batchmask run``: the model files to ship, shard sizes, and Ray or this process.

* Model files: ``model.keras`` and ``model.json``, plus the cached ``model.onnx`` when the
  runtime may be ONNX Runtime (:mod:`batchmask.inference.backends`); actors get the bytes, never a path.
* Shards: sized from the number of images to do and of workers (when the listing is short
  enough to know it up front), so a small run is spread over every worker.
* Small runs (at most ``in_process_max`` images to do) are processed in the driver process by
  the same :class:`~batchmask.batch.worker.MaskWorker` code, without starting Ray or any actor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from ..inference import META_FILE, MODEL_FILE
from ..inference.backends import (
    ONNX_FILE,
    cached_onnx,
    onnxruntime_installed,
    onnxruntime_version,
    wants_onnx,
)
from .cpus import available_cpus
from .dispatch import RunCounts, raise_interrupt, steady_rate
from .options import RunError
from .policy import Action, ErrorKind, decide
from .storage import StorageSpec
from .testhooks import RAY_ONLY_TEST_HOOKS
from .worker import MaskWorker, WorkerOptions

log = logging.getLogger(__name__)


def check_int8_file(model: str | None, runtime: str, precision: str) -> None:
    """With ``precision`` "int8": the runtime allows it and the model has its checked int8 file."""
    from ..inference import precision_of, read_meta, resolve_model_dir
    from ..inference.int8 import int8_path

    if precision_of(runtime, precision) == "int8":
        model_dir = resolve_model_dir(model)
        int8_path(model_dir, read_meta(model_dir))


def run_precision(model_dir, runtime: str, precision: str, gpus_per_worker: float) -> str:
    """The precision actors use: "auto" resolved for this model (int8 on CPU workers only: ONNX
    Runtime's int8 kernels are CPU kernels)."""
    from ..inference import read_meta
    from ..inference.int8 import auto_precision

    if precision != "auto":
        return precision
    cpu_onnx = gpus_per_worker == 0 and wants_onnx(runtime)
    return auto_precision(model_dir, read_meta(model_dir), cpu_onnx)


def prepare_model_files(model_dir, runtime: str, precision: str = "fp32") -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files actors load, and what run.json says about the runtime.

    With ``precision`` "int8", ``model.onnx`` is the model's checked int8 file (never exported here).

    ``model.onnx`` is added unless the runtime is "keras" or onnxruntime is missing; an actor
    (or the driver) still decides whether to use it (a GPU actor without the CUDA provider uses
    Keras). The ONNX file comes from the cache; a miss exports it once (seconds, needs Keras).
    """
    files = {n: (model_dir / n).read_bytes() for n in (MODEL_FILE, META_FILE)}
    info: dict[str, Any] = {"requested": runtime, "precision": precision}
    if precision == "int8":
        from ..inference import read_meta
        from ..inference.int8 import META_KEY, int8_path

        meta = read_meta(model_dir)
        files[ONNX_FILE] = int8_path(model_dir, meta).read_bytes()
        rec = meta[META_KEY]
        info["int8"] = {"sha256": rec.get("sha256"), "onnxruntime": onnxruntime_version(),
                        "validation": {k: v for k, v in (rec.get("validation") or {}).items()
                                       if k in ("images", "dice_fp32", "dice_int8", "dice_diff", "dice_diff_ci95")}}
    elif runtime != "keras" and onnxruntime_installed():
        found = cached_onnx(model_dir)
        if found is not None:
            path, record = found
            files[ONNX_FILE] = path.read_bytes()
            info["onnx"] = {"keras_sha256": record.get("keras_sha256"), "cached": record.get("cached", False),
                            "file": str(path),
                            "parity_max_abs_diff": record.get("parity_max_abs_diff"),
                            "export_s": record.get("export_s"), "onnxruntime": onnxruntime_version()}
        else:
            info["onnx"] = {"export_failed": True}
    return files, info


def runtime_used(info: dict) -> None:
    """run.json's runtime.used / runtime.version: what the actors (or the driver) predicted with."""
    rows = info.get("actors") or []
    used = sorted({a["runtime"] for a in rows if a.get("runtime")})
    versions = sorted({a["runtime_version"] for a in rows if a.get("runtime_version")})
    rt = info.setdefault("runtime", {})
    rt["used"] = used[0] if len(used) == 1 else (used or None)
    rt["version"] = versions[0] if len(versions) == 1 else (versions or None)


#: A worker's memory, measured (docs/design.md): the process with its model loaded (MB), plus
#: what each image of a prediction batch adds at a 512 px input (MB; it grows with the input's
#: area). The default model, batch 8, 1024 px photos: ONNX Runtime 224 MB loaded, peak 1588 MB
#: alone and 1650 MB with 3 others in a 7 GB cgroup (so 250 + 8 x 175); Keras 710 + 8 x 100
#: (peak 1515 MB).
WORKER_BASE_MB = {"onnx": 250, "keras": 750}
WORKER_PER_IMAGE_MB = {"onnx": 175, "keras": 100}


def worker_memory_mb(runtime: str, batch_size: int, image_size: int) -> int:
    """About how much memory one worker needs at its peak (MB)."""
    return round(WORKER_BASE_MB[runtime] + batch_size * WORKER_PER_IMAGE_MB[runtime] * (image_size / 512) ** 2)


def cap_workers(requested: int, node_memory: list[float], per_worker_mb: int) -> int:
    """At most as many workers as the nodes' memory (bytes each; Ray's ``memory`` resource) holds,
    and at least one; nodes that report no memory put no cap."""
    if not any(node_memory):
        return requested
    fits = sum(int(m // (per_worker_mb * 2**20)) for m in node_memory)
    return max(1, min(requested, fits))


def cgroup_memory_free(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """Bytes this process's memory cgroups (its own and their parents, v1 or v2) still allow, or
    None without a limit. Ray reads only the limit at the cgroup mount's root, so a run confined
    to a cgroup below it (``systemd-run -p MemoryMax=``, a nested container) would see the host's."""
    free: list[float] = []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_f, usage_f = Path(root), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            base, limit_f, usage_f = Path(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        d = base / path.lstrip("/")
        while True:
            try:
                limit = (d / limit_f).read_text().strip()
                if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                    free.append(max(0.0, int(limit) - int((d / usage_f).read_text())))
            except (OSError, ValueError):
                pass
            if d == base:
                break
            d = d.parent
    return min(free) if free else None


def model_image_size(files: dict[str, bytes]) -> int:
    """The model's input size, from the ``model.json`` among its files."""
    return int(json.loads(files[META_FILE])["model"]["image_size"])


def capped_workers(requested: int, files: dict[str, bytes], batch_size: int, node_memory: list[float],
                   own_ray: bool) -> tuple[int, int]:
    """(workers, MB per worker): ``requested``, or fewer when the nodes' memory (bytes each) cannot
    hold them, with one warning. ``own_ray``: the run started this (one-node) Ray, inside its cgroup."""
    confined = cgroup_memory_free() if own_ray else None
    if confined is not None and len(node_memory) == 1:
        node_memory = [min(node_memory[0], confined) if node_memory[0] else confined]
    runtime = "onnx" if ONNX_FILE in files else "keras"
    per_mb = worker_memory_mb(runtime, batch_size, model_image_size(files))
    workers = cap_workers(requested, node_memory, per_mb)
    if workers < requested:
        log.warning("--workers %d capped to %d: each worker needs about %d MB (%s, batch %d) and there is %.1f GB "
                    "of memory for workers", requested, workers, per_mb, runtime, batch_size,
                    sum(node_memory) / 2**30)
    return workers, per_mb


def shard_size_for(n: int, workers: int, batch_size: int, cap: int, inflight: int) -> int:
    """Images per shard for ``n`` images to do: every worker gets ``inflight`` shards if it can,
    no shard smaller than a batch unless that would leave a worker without work, none over ``cap``."""
    even = math.ceil(n / (workers * inflight))
    floor = min(batch_size, math.ceil(n / workers))
    return max(1, min(cap, max(even, floor)))


class Shards:
    """The run's shards, cut from the listing as they are handed out: ``size`` may change on the way
    (fewer workers than planned started: fewer, larger shards)."""

    def __init__(self, items: Iterator[tuple[str, str]], size: int):
        self._items, self.size = items, size

    def __iter__(self) -> Shards:
        return self

    def __next__(self) -> list:
        shard = list(islice(self._items, self.size))
        if not shard:
            raise StopIteration
        return shard


def plan_shards(items: Iterator[tuple[str, str]], counts: RunCounts, workers: int, batch_size: int,
                shard_size: int, inflight: int) -> tuple[Shards, int | None, int]:
    """(shards, number of images to do if the listing ended early, shard size).

    ``counts.listed_all`` says whether ``items`` has ended (the listing sets it).

    Lists ahead up to ``workers * inflight * shard_size`` images; when the listing ends there,
    the shard size comes from :func:`shard_size_for`, else it is ``shard_size``.
    """
    head = list(islice(items, workers * inflight * shard_size + 1))
    n = len(head) if counts.listed_all else None
    size = shard_size if n is None else shard_size_for(n, workers, batch_size, shard_size, inflight)
    rest = chain(head, items)
    return Shards(rest, size), n, size


def ray_address(address: str | None) -> str | None:
    """The Ray cluster a run joins: ``--address``, else ``$RAY_ADDRESS``, else None (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def in_process_reason(n: int | None, in_process_max: int, gpus_per_worker: float,
                      address: str | None) -> str | None:
    """Why this run must use Ray even though it is small, or None if it may run in this process.

    Only a run that would start its own local Ray is done in process: joining a cluster
    (``--address``, ``$RAY_ADDRESS``, or Ray already running in this process) says where the
    work should run, and GPU workers need the GPUs Ray hands out.
    """
    if n is None or n > in_process_max:
        return "many images"
    if gpus_per_worker > 0:
        return "GPU workers asked for"
    ray = sys.modules.get("ray")
    if ray_address(address) or (ray is not None and ray.is_initialized()):
        return "a Ray cluster was given"
    if any(os.environ.get(h) for h in RAY_ONLY_TEST_HOOKS):
        return "test hooks simulate worker deaths, which only Ray actors survive"
    return None


def execute_in_process(first: list, shards: Iterator[list], counts: RunCounts, info: dict, in_spec: StorageSpec,
                       out_spec: StorageSpec, files: dict[str, bytes], wopts: WorkerOptions, quiet: bool) -> None:
    """Process every shard here with one :class:`MaskWorker` using all cores (no Ray, no actor)."""
    old_term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: save what is done, as with Ray
        old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        _in_process(first, shards, counts, info, in_spec, out_spec, files, wopts, quiet)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _in_process(first: list, shards: Iterator[list], counts: RunCounts, info: dict, in_spec: StorageSpec,
                out_spec: StorageSpec, files: dict[str, bytes], wopts: WorkerOptions, quiet: bool) -> None:
    from tqdm import tqdm

    wopts.threads = available_cpus()  # a pod's CPU limit, not the node's core count
    worker = MaskWorker(files, in_spec, out_spec, wopts)
    t_ready = time.time()
    info["in_process"] = {"startup_s": round(worker.startup_s, 2), **worker.device()}
    info.setdefault("throughput", {})["startup_s"] = round(worker.startup_s, 2)
    windows: list[tuple[float, float, int]] = []
    bar = tqdm(total=None, unit="img", disable=quiet, dynamic_ncols=True, desc="batchmask run (in process)")
    finished = False
    try:
        for sid, items in enumerate(chain([first], shards)):
            r = _process_with_retries(worker, sid, items, counts)
            counts.add_result(r)
            windows.append((r["start"], r["end"], r["n"]))
            bar.update(r["n"])
        finished = True
    finally:
        bar.close()
        # Interrupted (SIGTERM, Ctrl-C) or failed: queued reads are cancelled, not waited for.
        worker.pool.shutdown(wait=finished, cancel_futures=not finished)
        s = worker.stats()
        info["actors"] = [{"actor": "driver", "pids": [s["pid"]], "images": s["images"], "busy_s": s["busy_s"],
                           "peak_rss_mb": s["peak_rss_mb"], "startup_s": round(worker.startup_s, 2),
                           **worker.device()}]
        info.setdefault("throughput", {})["steady_images_per_s"] = steady_rate(windows, t_ready)


def _process_with_retries(worker: MaskWorker, sid: int, items: list, counts: RunCounts) -> dict:
    """One shard in this process, retried as the Ray dispatcher would (:func:`~.policy.decide`): an
    exception is retried, then fails the run (no worker process here can die and be split out)."""
    attempt = 1
    while True:
        try:
            return worker.process(sid, items)
        except Exception as exc:
            if decide(attempt, len(items), ErrorKind.ERROR) is not Action.RETRY:
                raise RunError(f"shard {sid} failed {attempt} times: {type(exc).__name__}: {exc}") from exc
            counts.retried_shards += 1
            log.warning("shard %d (%d images) failed: %s; trying it again", sid, len(items), exc)
            attempt += 1
