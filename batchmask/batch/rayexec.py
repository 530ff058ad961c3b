"""The Ray side of ``run()``: start or join Ray, place the actors over the cluster's CPUs, GPUs and
memory, dispatch the shards to them, and always stop what was started. The in-process path
(no Ray) is :func:`batchmask.batch.plan.execute_in_process`; the run's bookkeeping stays in
:mod:`batchmask.batch.runner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .dispatch import Dispatcher, raise_interrupt
from .options import RunError
from .plan import Shards, capped_workers, model_image_size, ray_address, shard_size_for
from .policy import INFLIGHT_PER_ACTOR
from .probe import probe_image
from .raypool import RayPool
from .testhooks import TEST_HOOKS
from .worker import MaskWorker, WorkerOptions

#: ``batch`` below is runner's ``_BatchRun`` (not imported: runner imports this module).
_BatchRun = Any

log = logging.getLogger("batchmask.batch.runner")  # one logger for a run's messages, as before the split

#: Ray restarts a dead actor (reloading the model) up to this many times.
ACTOR_MAX_RESTARTS = 10


def plan_cpus(workers: int, node_cpus: list[float]) -> tuple[float, int]:
    """CPUs per actor so that all ``workers`` actors fit on the nodes, and TF threads per actor."""
    total = sum(node_cpus)
    if total <= 0:
        raise RunError("the Ray cluster has no CPUs")
    for per in range(max(1, int(total // workers)), 0, -1):
        if sum(int(c // per) for c in node_cpus) >= workers:
            return float(per), per
    k = 2
    while sum(int(c * k + 1e-9) for c in node_cpus) < workers:
        k += 1
    return 1.0 / k, 1


def start_ray(address: str | None) -> bool:
    """Connect to or start Ray; returns whether this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    addr = ray_address(address)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": log.isEnabledFor(logging.DEBUG),
              "configure_logging": False}
    if addr:
        log.info("joining Ray cluster at %s", addr)
        ray.init(address=addr, **kwargs)
    else:
        # "local": a Ray of our own, even when a `ray start` cluster runs on this machine (plain
        # ray.init() would join that one, and refuse num_cpus with a ValueError). The CPUs this
        # process may use (a pod's CPU limit), not the machine's count.
        from .cpus import available_cpus

        ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, **kwargs)
    return True


def execute(batch: _BatchRun, shards: Shards, files: dict[str, bytes], wopts: WorkerOptions) -> None:
    """Start (or join) Ray, start the actors, dispatch ``batch.first`` and ``shards``; always stop what was started."""
    import ray
    from tqdm import tqdm

    t0 = time.time()
    opts = batch.opts
    owns_ray = start_ray(opts.address)
    actors: list = []
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        # The model's ref stays alive here until the dispatch ends: restarted actors fetch it again.
        actors, model_ref, probe = start_actors(batch, files, wopts, owns_ray)
        reshard(batch, batch.shard_plan, len(actors))
        bar = tqdm(total=None, unit="img", disable=opts.quiet, dynamic_ncols=True, desc="batchmask run")
        Dispatcher(RayPool(actors, probe), batch.first, shards, batch.counts, batch.info,
                   shard_timeout=opts.shard_timeout, t0=t0, bar=bar).run()
        del model_ref
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if owns_ray:
            ray.shutdown()


def reshard(batch: _BatchRun, shards: Shards, workers: int) -> None:
    """Shards sized for the workers that really started, when the memory cap started fewer."""
    n, opts = batch.info["plan"]["images_to_do"], batch.opts
    if n and workers < opts.workers:
        shards.size = shard_size_for(n, workers, opts.batch_size, opts.shard_size, INFLIGHT_PER_ACTOR)
        batch.info["plan"]["shard_size"] = shards.size


def start_actors(batch: _BatchRun, files: dict[str, bytes], wopts: WorkerOptions,
                  owns_ray: bool) -> tuple[list, object, Callable]:
    """``opts.workers`` MaskWorker actors (at most what the cluster's memory holds) placed over its
    CPUs (and GPUs), the ref of the model files they load (the caller keeps it alive for restarts),
    and a function that starts a probe of one image (a Ray task); info["ray"] says how."""
    import ray

    opts, info = batch.opts, batch.info
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = [s.spec.url for s in (batch.inp, batch.out) if s is not None and not s.remote]
    if len(nodes) > 1 and batch.in_list is not None and not opts.shared_fs:
        # which entries are local shows only as they are read: a worker given one fails the run
        batch.in_spec = dataclasses.replace(batch.in_spec, local_entries=False)
    if len(nodes) > 1 and local and not opts.shared_fs:
        raise RunError(f"the Ray cluster has {len(nodes)} nodes but {', '.join(local)} is a local path that "
                       "workers on other nodes cannot see; use s3://, gs:// or az:// URLs, or --shared-fs if every node "
                       "mounts it at the same path")
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in nodes]
    cluster_gpus = sum(float(n["Resources"].get("GPU", 0)) for n in nodes)
    if wopts.gpus > cluster_gpus:
        raise RunError(f"--gpus-per-worker {wopts.gpus:g}, but the Ray cluster has {cluster_gpus:g} GPUs")
    node_memory = [float(n["Resources"].get("memory", 0)) for n in nodes]
    workers, per_mb = capped_workers(opts.workers, files, wopts.batch_size, node_memory, owns_ray)
    per, threads = plan_cpus(workers, node_cpus)
    if per < 1:
        log.warning("%d workers > %g CPUs in the cluster: each actor gets %.2f CPU (fractional) and 1 thread",
                    workers, sum(node_cpus), per)
    log.info("starting %d actors, %g CPU, %g GPU and %d threads each, on %d node(s)", workers, per, wopts.gpus, threads,
             len(nodes))
    blob = ray.put(files)
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
           "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow"),
           "TF_NUM_INTRAOP_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "TF_NUM_INTEROP_THREADS": "1"}
    for hook in TEST_HOOKS:  # test hooks only
        if os.environ.get(hook):
            env[hook] = os.environ[hook]
    remote_cls = ray.remote(MaskWorker).options(
        num_cpus=per, num_gpus=wopts.gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=0,
        scheduling_strategy="SPREAD", runtime_env={"env_vars": env})
    wopts.threads = threads
    # The ref goes inside a list: the actor fetches it itself, and the driver keeps it alive
    # for restarts (a top-level ref argument makes Ray warn about restartability).
    actors = [remote_cls.remote([blob], batch.in_spec, batch.out_spec, wopts) for _ in range(workers)]
    info["ray"] = {"nodes": len(nodes), "cluster_cpus": sum(node_cpus), "cpus_per_actor": per,
                   "threads_per_actor": threads, "owns_cluster": owns_ray, "gpus_per_actor": wopts.gpus,
                   "cluster_gpus": cluster_gpus, "workers": workers, "memory_per_worker_mb": per_mb}
    # Probes are short and run beside the actors, which hold every CPU: no CPU of their own.
    remote_probe = ray.remote(probe_image).options(num_cpus=0, max_retries=0, runtime_env={"env_vars": env})
    settings = {"max_bytes": wopts.max_bytes, "max_pixels": wopts.max_pixels, "draft": wopts.draft,
                "image_size": model_image_size(files)}
    return actors, blob, lambda rel: remote_probe.remote(batch.in_spec, rel, settings)
