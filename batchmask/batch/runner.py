"""``run()``: predict face masks for every image under a folder or bucket prefix, with Ray.

The driver lists images (streaming, sorted), skips those already done, groups the rest into
shards of relative paths and hands them to ``workers`` Ray actors (:mod:`batchmask.batch.worker`),
at most ``INFLIGHT_PER_ACTOR`` shards each. Actors read, predict and write; the driver only
sees counts. Outputs and their guarantees: :mod:`batchmask.batch.outputs`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import __version__
from ..data import IMAGE_EXTENSIONS
from ..inference import read_meta, resolve_model_dir
from .lock import OutputLock
from .modelcheck import check_model
from .outputs import (
    DEFAULT_MAX_PIXELS,
    RUN_JSON,
    MaskNames,
    done_set,
    error_row,
    merge_parts,
    part_name,
    recorded_masks,
    rows_to_csv,
)
from .plan import (
    DEFAULT_IN_PROCESS_MAX,
    DEVICE_KEYS,
    execute_in_process,
    in_process_reason,
    plan_shards,
    prepare_model_files,
    runtime_used,
)
from .quiet import ray_output_hidden
from .storage import Storage, StorageSpec, UnsafePathError, check_rel, matches, redact_urls
from .testhooks import TEST_HOOKS
from .worker import MaskWorker, WorkerOptions

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_IMAGES_FAILED = 0, 1, 3  # same values as batchmask.cli.common
#: Listed as images (case-insensitive): the training formats plus GIF (first frame).
RUN_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif")
INFLIGHT_PER_ACTOR = 2
#: The driver owns retries (Ray's max_task_retries is 0): a failed shard is tried again, alone
#: on its actor, up to this many attempts in all; a shard whose worker died every time is then
#: split into single images, each tried alone once, and an image that still kills its worker
#: becomes an error row.
MAX_SHARD_ATTEMPTS = 2
#: Ray restarts a dead actor (reloading the model) up to this many times.
ACTOR_MAX_RESTARTS = 10
#: ready() calls that may fail on an actor that died before it is given up as dead.
REVIVE_TRIES = 3
ACTOR_START_TIMEOUT_S = float(os.environ.get("BATCHMASK_ACTOR_START_TIMEOUT", "600"))
DEFAULT_SHARD_SIZE = 32
#: A shard whose actor returns nothing for this long (no result, no progress) is stopped (the
#: actor is killed and restarted by Ray) and tried again; twice in a row fails the run.
DEFAULT_SHARD_TIMEOUT_S = float(os.environ.get("BATCHMASK_SHARD_TIMEOUT", "300"))
#: An actor gets a second shard only once every starting actor has one, or this long after the
#: first actor was ready (an actor that cannot be placed must not hold the others back).
BALANCE_WAIT_S = 60.0
#: When a run is already failing (storage gone or stalled, interrupted), each remaining piece of
#: bookkeeping (driver rows and merge, run.json, the lock's release) gets this long: a stalled S3
#: endpoint held the exit for more than 14 minutes in a PUT despite the client's timeouts.
FAILING_IO_S = float(os.environ.get("BATCHMASK_FAILING_IO_TIMEOUT", "60"))


class RunError(RuntimeError):
    """The run could not be done (bad options, unreachable storage, no workers)."""


@dataclass
class RunSummary:
    total: int
    ok: int
    failed: int
    skipped: int
    wall_s: float
    images_per_s: float
    exit_code: int
    output: str
    run_json: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"batchmask run: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) "
                f"of {self.total} images in {self.wall_s:.1f} s ({self.images_per_s:.1f} images/s)")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _plan_cpus(workers: int, node_cpus: list[float]) -> tuple[float, int]:
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


def _start_ray(address: str | None) -> bool:
    """Connect to or start Ray; returns whether this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": log.isEnabledFor(logging.DEBUG),
              "configure_logging": False}
    if addr:
        log.info("joining Ray cluster at %s", addr)
        ray.init(address=addr, **kwargs)
    else:
        # "local": a Ray of our own, even when a `ray start` cluster runs on this machine (plain
        # ray.init() would join that one, and refuse num_cpus with a ValueError).
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
    return True


def _versions() -> dict:
    """Package versions from their metadata (importing TensorFlow here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    v = {"batchmask": __version__, "python": platform.python_version()}
    for dist in ("ray", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow", "s3fs", "fsspec", "onnxruntime",
                 "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            v[dist] = version(dist)
    return v


def run(input: str, output: str, model: str | None = None, *, workers: int = 1, batch_size: int = 8,
        glob: str | None = None, endpoint_url: str | None = None, threshold: float | None = None,
        overlays: bool = False, overwrite: bool = False, address: str | None = None,
        shared_fs: bool = False, quiet: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
        shard_size: int = DEFAULT_SHARD_SIZE, storage_options: dict | None = None,
        retry_errors: bool = False, draft: bool = True, wait: bool = False, wait_timeout: float | None = None,
        shard_timeout: float = DEFAULT_SHARD_TIMEOUT_S, runtime: str = "auto", gpus_per_worker: float = 0.0,
        in_process_max: int = DEFAULT_IN_PROCESS_MAX) -> RunSummary:
    """Predict masks for every image under ``input``; write masks, coverage.csv and run.json to ``output``.

    Returns a :class:`RunSummary` (exit code 0 when every image processed in this run is ok, 3
    when some failed); raises :class:`RunError`, :class:`~batchmask.batch.storage.StorageError` or
    :class:`~batchmask.inference.ModelNotFoundError` when the run cannot be done, and
    ``KeyboardInterrupt`` when interrupted (after saving what was finished). The model is checked
    (:func:`~batchmask.batch.modelcheck.check_model`) before anything is written; the output's lock
    (:mod:`batchmask.batch.lock`) is held from the first merge to run.json, and
    :class:`~batchmask.batch.lock.OutputLocked` raised when another run holds it (unless ``wait``).

    ``runtime``: "auto" (ONNX Runtime when installed, else Keras), "keras" or "onnx";
    ``gpus_per_worker``: GPUs Ray gives each actor (fractions share a card); runs with at most
    ``in_process_max`` images to do are processed in this process, without Ray (0: always Ray).
    """
    if workers < 1 or batch_size < 1 or shard_size < 1 or max_pixels < 1:
        raise RunError("--workers, --batch-size, --shard-size and --max-pixels must be at least 1")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise RunError(f"--threshold must be between 0 and 1, got {threshold}")
    if shard_timeout <= 0:
        raise RunError("--shard-timeout must be more than 0 seconds")
    if gpus_per_worker < 0 or in_process_max < 0:
        raise RunError("--gpus-per-worker and --in-process-max must not be negative")
    from ..runtime import RuntimeUnavailableError, check_runtime

    try:
        check_runtime(runtime)
    except (ValueError, RuntimeUnavailableError) as exc:
        raise RunError(str(exc)) from exc
    t0 = time.time()
    started = _now()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0)) + f"{int(t0 * 1e6) % 1_000_000:06d}-{uuid.uuid4().hex[:6]}"
    in_spec = StorageSpec(input, endpoint_url, dict(storage_options or {})).resolved()
    out_spec = StorageSpec(output, endpoint_url, dict(storage_options or {})).resolved()
    inp, out = in_spec.open(), out_spec.open()
    # Refusals first: nothing is written to --output before these checks.
    skip_prefix = inp.relative_prefix_of(out)
    if skip_prefix == "":
        raise RunError("--output must not be the same location as --input")
    inp.check_input()
    model_dir = resolve_model_dir(model)
    check_model(model_dir)  # a corrupt or mismatched model: one line, before anything is written
    out.ensure_root()
    if not inp.remote and not out.remote:
        inp.exclude_dir(out.root)  # the output, also where a symlink inside the input leads to it
    lock = OutputLock(out).acquire(wait=wait, wait_timeout=wait_timeout)
    try:
        records = merge_parts(out)  # leftovers of an interrupted run first
        done = set() if overwrite else done_set(out, records, retry_errors)
        recorded = recorded_masks(records)  # an image keeps its mask path; no new image takes one
        del records
    except BaseException:
        lock.release()
        raise

    driver_rows: list[dict] = []
    st = {"total": 0, "skipped": 0, "ok": 0, "failed": 0, "listed_all": False, "retried_shards": 0,
          "rows": driver_rows}
    names = MaskNames(recorded)

    def pending() -> Iterator[tuple[str, str]]:
        for rel in inp.iter_files():
            if skip_prefix and rel.startswith(skip_prefix):
                continue
            if not matches(rel, RUN_EXTENSIONS, glob):
                continue
            st["total"] += 1
            try:
                check_rel(rel)
            except UnsafePathError as exc:
                if rel not in done:
                    driver_rows.append(error_row(rel, str(exc)))
                    st["failed"] += 1
                else:
                    st["skipped"] += 1
                continue
            mask = names.assign(rel)
            if rel in done:
                st["skipped"] += 1
                continue
            yield rel, mask
        st["listed_all"] = True

    items = pending()
    first = None
    opts = {"workers": workers, "batch_size": batch_size, "shard_size": shard_size, "glob": glob,
            "threshold": threshold, "overlays": overlays, "overwrite": overwrite, "retry_errors": retry_errors,
            "max_pixels": max_pixels, "shared_fs": shared_fs, "draft": draft, "shard_timeout": shard_timeout,
            "runtime": runtime, "gpus_per_worker": gpus_per_worker, "in_process_max": in_process_max}
    info: dict = {"format_version": 1, "run_id": run_id, "input": in_spec.public(), "output": out_spec.public(),
                  "model": {"path": str(model_dir)}, "options": opts, "versions": _versions(), "start": started}
    try:
        meta = read_meta(model_dir)
        info["model"].update({"config": meta.get("model"), "trained": bool(meta.get("training")),
                              "metrics": meta.get("metrics")})
    except (OSError, ValueError):
        pass
    interrupted = failed_run = False
    try:
        # The listing starts here: its failure is recorded in run.json too.
        shards, n_todo, planned_shard = plan_shards(items, st, workers, batch_size, shard_size, INFLIGHT_PER_ACTOR)
        first = next(shards, None)
        if first is not None:
            files, info["runtime"] = prepare_model_files(model_dir, runtime)
            wopts = WorkerOptions(batch_size=batch_size, threshold=threshold, overlays=overlays,
                                  max_pixels=max_pixels, run_id=run_id, draft=draft, runtime=runtime,
                                  gpus=gpus_per_worker)
            why_ray = in_process_reason(n_todo, in_process_max, gpus_per_worker, address)
            info["plan"] = {"images_to_do": n_todo, "shard_size": planned_shard,
                            "mode": "ray" if why_ray else "in-process", "why_ray": why_ray}
            if why_ray is None:
                log.info("%d images to do (<= --in-process-max %d): processing them here, without Ray",
                         n_todo, in_process_max)
                execute_in_process(first, shards, st, info, in_spec, out_spec, files, wopts, quiet)
            else:
                with ray_output_hidden(not log.isEnabledFor(logging.INFO)):
                    _execute(first, shards, st, info, in_spec, out_spec, inp, out, model_dir, workers, batch_size,
                             threshold, overlays, max_pixels, address, shared_fs, quiet, run_id, draft,
                             files=files, wopts=wopts)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException as exc:
        failed_run = True
        info["error"] = f"{type(exc).__name__}: {redact_urls(str(exc)).strip()}"[:1000]
        raise
    finally:
        if "runtime" in info:
            runtime_used(info)
        try:
            _save_rows(out, run_id, driver_rows, first is not None or bool(driver_rows),
                       interrupted or failed_run, info)
        except BaseException:
            _release(lock, True)
            raise
        wall = time.time() - t0
        processed = st["ok"] + st["failed"]
        code = EXIT_IMAGES_FAILED if st["failed"] else EXIT_OK
        if interrupted or failed_run:  # the CLI exits 1: run.json says so too
            code = EXIT_FAILED
        info.update({"end": _now(), "wall_s": round(wall, 3), "interrupted": interrupted,
                     "counts": {k: st[k] for k in ("total", "skipped", "ok", "failed", "retried_shards")},
                     "listing_complete": st["listed_all"] or (first is None and not failed_run),
                     "exit_code": code})
        info.setdefault("throughput", {})["images_per_s"] = round(processed / wall, 3) if wall > 0 else 0.0
        try:
            _write_run_json(out, info, interrupted or failed_run)
        finally:
            _release(lock, interrupted or failed_run)
    return RunSummary(st["total"], st["ok"], st["failed"], st["skipped"], round(wall, 3),
                      info["throughput"]["images_per_s"], code, output, info)


def _save_rows(out: Storage, run_id: str, driver_rows: list[dict], merge: bool, failing: bool, info: dict) -> None:
    """Write the driver's rows and merge part files; when the run is already failing (e.g. the
    storage went away), a failure here is logged and recorded instead of hiding the first one."""
    def save() -> None:
        if driver_rows:
            out.write_bytes(part_name(run_id, 9_999_999), rows_to_csv(driver_rows))
        if merge:  # else no part files: coverage.csv is already merged
            merge_parts(out)

    try:
        _bounded(save, "merging the finished rows") if failing else save()
    except Exception as exc:
        if not failing:
            raise
        info["merge_error"] = redact_urls(str(exc))[:500]
        log.warning("could not merge the finished rows (%s); the next run merges them", redact_urls(str(exc)))


def _write_run_json(out: Storage, info: dict, failing: bool) -> None:
    data = (json.dumps(info, indent=2, default=str) + "\n").encode()
    try:
        _bounded(lambda: out.write_bytes(RUN_JSON, data), f"writing {RUN_JSON}") if failing \
            else out.write_bytes(RUN_JSON, data)
    except Exception as exc:
        if not failing:
            raise
        log.warning("could not write %s: %s", RUN_JSON, redact_urls(str(exc)))


def _release(lock: OutputLock, failing: bool) -> None:
    if not failing:
        lock.release()
        return
    try:
        _bounded(lock.release, "releasing the output lock")
    except Exception as exc:  # an S3 lock left behind expires by itself
        log.warning("could not release the output lock: %s", redact_urls(str(exc)))


def _bounded(fn, what: str) -> None:
    """Run ``fn`` (bookkeeping of a failing run) in a daemon thread; give up after FAILING_IO_S."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    t = threading.Thread(target=target, name="batchmask-finish", daemon=True)
    t.start()
    t.join(FAILING_IO_S)
    if t.is_alive():
        raise TimeoutError(f"{what}: the storage did not answer within {FAILING_IO_S:.0f} s")
    if errors:
        raise errors[0]


def _execute(first, shards, st, info, in_spec, out_spec, inp: Storage, out: Storage, model_dir, workers,
             batch_size, threshold, overlays, max_pixels, address, shared_fs, quiet, run_id, draft, *,
             files: dict[str, bytes], wopts: WorkerOptions) -> None:
    import ray

    t0 = time.time()
    owns_ray = _start_ray(address)
    actors: list = []
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        local = [s.spec.url for s in (inp, out) if not s.remote]
        if len(nodes) > 1 and local and not shared_fs:
            raise RunError(f"the Ray cluster has {len(nodes)} nodes but {', '.join(local)} is a local path that "
                           "workers on other nodes cannot see; use s3:// URLs, or --shared-fs if every node "
                           "mounts it at the same path")
        node_cpus = [float(n["Resources"].get("CPU", 0)) for n in nodes]
        cluster_gpus = sum(float(n["Resources"].get("GPU", 0)) for n in nodes)
        if wopts.gpus > cluster_gpus:
            raise RunError(f"--gpus-per-worker {wopts.gpus:g}, but the Ray cluster has {cluster_gpus:g} GPUs")
        per, threads = _plan_cpus(workers, node_cpus)
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
        actors = [remote_cls.remote([blob], in_spec, out_spec, wopts) for _ in range(workers)]
        info["ray"] = {"nodes": len(nodes), "cluster_cpus": sum(node_cpus), "cpus_per_actor": per,
                       "threads_per_actor": threads, "owns_cluster": owns_ray, "gpus_per_actor": wopts.gpus,
                       "cluster_gpus": cluster_gpus}
        _dispatch(actors, first, shards, st, info, quiet, t0)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if owns_ray:
            ray.shutdown()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _dispatch(actors, first, shards, st, info, quiet, t0) -> None:
    """Hand shards to ready actors and collect results; the driver owns every retry.

    A shard that failed is retried *alone* on an actor (nothing else in flight there), so a
    worker death during a retry is that shard's doing. After ``MAX_SHARD_ATTEMPTS`` deaths the
    shard is split into single images, each tried alone once; an image whose worker still dies
    becomes an error row. A dead actor is restarted by Ray (``ACTOR_MAX_RESTARTS``); the driver
    waits for it with ``ready()`` and then gives it work again.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError
    from tqdm import tqdm

    starting = {a.ready.remote(): i for i, a in enumerate(actors)}
    ready: list[int] = []
    inflight = {i: 0 for i in range(len(actors))}
    alone: set[int] = set()  # actors running a retried shard, with nothing else in flight
    revive_failures = dict.fromkeys(range(len(actors)), 0)
    restarting_since: dict[int, float] = {}  # actor index -> when Ray first said "restarting"
    tasks: dict = {}  # ref -> (actor index, shard id, items, attempt)
    retry: deque = deque()
    next_id = [0]
    first_box = [first]
    gen_done = [False]
    per_actor: dict[int, dict] = {}
    windows: list[tuple[float, float, int]] = []
    t_all_ready = None
    last_progress = t0
    start_errors: list[str] = []
    shard_timeout = float(info["options"].get("shard_timeout") or DEFAULT_SHARD_TIMEOUT_S)
    progress: dict[int, float] = {}  # actor index -> last time it started work or returned a result
    stalled: set[int] = set()  # actors killed because their shard made no progress
    bar = tqdm(total=None, unit="img", disable=quiet, dynamic_ncols=True, desc="batchmask run")
    given = dict.fromkeys(range(len(actors)), 0)  # shards handed to each actor
    first_ready = [0.0]

    def others_first(i: int) -> bool:
        """Actor i has work while another live actor has none yet: it waits (see BALANCE_WAIT_S)."""
        if not given[i] or time.time() - first_ready[0] > BALANCE_WAIT_S:
            return False
        live = set(ready) | set(starting.values())
        return any(not given[j] for j in live if j != i)

    def new_id() -> int:
        next_id[0] += 1
        return next_id[0] - 1

    def next_new():
        if first_box[0] is not None:
            items, first_box[0] = first_box[0], None
        else:
            items = next(shards, None)
            if items is None:
                gen_done[0] = True
                return None
        return new_id(), items, 1

    def fill() -> None:
        for i in list(ready):
            while inflight[i] < INFLIGHT_PER_ACTOR and i not in alone:
                if retry:
                    if inflight[i]:
                        break  # a retried shard waits until it can run alone
                    sid, items, attempt = retry.popleft()
                    alone.add(i)
                else:
                    if others_first(i):
                        break
                    job = next_new()
                    if job is None:
                        return
                    sid, items, attempt = job
                if not inflight[i]:
                    progress[i] = time.time()
                tasks[actors[i].process.remote(sid, items)] = (i, sid, items, attempt)
                inflight[i] += 1
                given[i] += 1

    def last_line(exc, n=300) -> str:
        text = redact_urls(str(exc)).strip()
        return text.splitlines()[-1][:n] if text else type(exc).__name__

    try:
        while True:
            if ready:
                fill()
            if st["listed_all"] and bar.total is None:
                bar.total = st["total"] - st["skipped"]
                bar.refresh()
            if gen_done[0] and not tasks and not retry:
                break
            if not ready and not starting:
                if per_actor:
                    raise RunError("all workers died; rerun to continue (finished images are kept): "
                                   + "; ".join(start_errors[-2:]))
                raise RunError("no worker could start: " + "; ".join(start_errors[:3]))
            for i in ready:  # bounded time: a shard that returns nothing for shard_timeout is stopped
                if inflight[i] and i not in stalled and time.time() - progress.get(i, time.time()) > shard_timeout:
                    log.warning("worker %d made no progress for %.0f s; restarting it and retrying its shards "
                                "(--shard-timeout)", i, shard_timeout)
                    stalled.add(i)
                    ray.kill(actors[i], no_restart=False)
            waiting = list(tasks) + list(starting)
            done_refs, _ = ray.wait(waiting, num_returns=1, timeout=5.0)
            if not done_refs:
                if not ready and time.time() - last_progress > ACTOR_START_TIMEOUT_S:
                    raise RunError(f"no worker started within {ACTOR_START_TIMEOUT_S:.0f} s; the cluster may lack "
                                   f"free CPUs ({info['ray']['cpus_per_actor']} per worker needed)")
                continue
            last_progress = time.time()
            ref = done_refs[0]
            if ref in starting:
                i = starting.pop(ref)
                try:
                    r = ray.get(ref)
                except RayError as exc:
                    # A known actor that died may still be restarting. While Ray says so
                    # (ActorUnavailableError; a restart loads TF and the model, slow on a busy
                    # machine) keep asking until the start timeout; other errors get a few tries.
                    restarting = (isinstance(exc, ActorUnavailableError)
                                  and time.time() - restarting_since.setdefault(i, time.time())
                                  < ACTOR_START_TIMEOUT_S)
                    if i in per_actor and (restarting or revive_failures[i] < REVIVE_TRIES):
                        if not restarting:
                            revive_failures[i] += 1
                        time.sleep(0.5 * max(1, revive_failures[i]))
                        starting[actors[i].ready.remote()] = i
                        continue
                    start_errors.append(f"worker {i}: {last_line(exc)}")
                    log.error("worker %d %s: %s", i, "is dead" if i in per_actor else "failed to start",
                              last_line(exc))
                    continue
                revive_failures[i] = 0
                restarting_since.pop(i, None)
                if i not in ready:
                    ready.append(i)
                    first_ready[0] = first_ready[0] or time.time()
                if i in per_actor:  # restarted after a death
                    if r["pid"] not in per_actor[i]["pids"]:
                        per_actor[i]["pids"].append(r["pid"])
                else:
                    per_actor[i] = {"actor": i, "node_id": r["node_id"], "pids": [r["pid"]],
                                    "startup_s": round(r["startup_s"], 2), "images": 0, "peak_rss_mb": r["peak_rss_mb"]}
                    per_actor[i].update({k: r[k] for k in DEVICE_KEYS if k in r})
                if not starting and t_all_ready is None:
                    t_all_ready = time.time()
                    info.setdefault("throughput", {})["startup_s"] = round(t_all_ready - t0, 2)
                continue
            i, sid, items, attempt = tasks.pop(ref)
            inflight[i] -= 1
            progress[i] = time.time()
            timed_out = i in stalled
            if timed_out and not inflight[i]:
                stalled.discard(i)
            if attempt > 1:
                alone.discard(i)
            try:
                r = ray.get(ref)
            except RayError as exc:
                dead = isinstance(exc, RayActorError)
                if timed_out and attempt >= MAX_SHARD_ATTEMPTS:  # not the image's fault: fail the run
                    raise RunError(f"shard {sid} made no progress for {shard_timeout:.0f} s, {attempt} times; is the "
                                   "storage reachable? (finished images are kept; raise --shard-timeout for "
                                   "very slow images)") from exc
                log.warning("shard %d (%d images, attempt %d) failed on worker %d: %s", sid, len(items), attempt,
                            i, last_line(exc, 200))
                if dead and i in ready:  # Ray restarts it; it gets work again once ready() answers
                    ready.remove(i)
                    alone.discard(i)
                    starting[actors[i].ready.remote()] = i
                if attempt < MAX_SHARD_ATTEMPTS:
                    st["retried_shards"] += 1
                    retry.append((sid, items, attempt + 1))
                elif dead and len(items) > 1:  # find the image(s) that kill the worker: one by one
                    st["retried_shards"] += 1
                    retry.extend((new_id(), [item], MAX_SHARD_ATTEMPTS) for item in items)
                elif dead:  # this image kills the worker process (e.g. crashes the decoder): error row
                    _fail_shard(sid, items, st, info, exc)
                    bar.update(len(items))
                else:  # an exception, e.g. storage unreachable or access denied: fail the run
                    raise RunError(f"shard {sid} failed {attempt} times: {last_line(exc)}") from exc
                continue
            st["ok"] += r["ok"]
            st["failed"] += r["failed"]
            for img, err in r["errors"]:
                log.info("failed: %s: %s", img, err)
            windows.append((r["start"], r["end"], r["n"]))
            a = per_actor.setdefault(i, {"actor": i, "pids": [], "images": 0})
            a["images"] += r["n"]
            a["peak_rss_mb"] = max(a.get("peak_rss_mb", 0), r["peak_rss_mb"])
            a["node_id"] = r["node_id"]
            if r["pid"] not in a["pids"]:
                a["pids"].append(r["pid"])
            bar.update(r["n"])
    finally:
        bar.close()
        for i, a in per_actor.items():
            a["restarts"] = max(0, len(a.get("pids", [])) - 1)
            with contextlib.suppress(GetTimeoutError, RayError):
                s = ray.get(actors[i].stats.remote(), timeout=10)
                a["peak_rss_mb"] = max(a.get("peak_rss_mb", 0), s["peak_rss_mb"])
                a["busy_s"] = s["busy_s"]
        info["actors"] = [per_actor[k] for k in sorted(per_actor)]
        info["nodes_used"] = sorted({a["node_id"] for a in per_actor.values() if a.get("images")})
        info.setdefault("throughput", {})["steady_images_per_s"] = _steady_rate(windows, t_all_ready)


def _fail_shard(sid, items, st, info, exc) -> None:
    """Record the images of a (one-image) shard whose worker kept dying as error rows (driver-side part)."""
    reason = f"the worker process died processing this image, also when it was processed alone ({type(exc).__name__})"
    rows = [error_row(rel, reason) for rel, _ in items]
    info.setdefault("failed_shards", []).append(sid)
    st["failed"] += len(rows)
    st["rows"].extend(rows)


def _steady_rate(windows: list[tuple[float, float, int]], t_ready: float | None) -> float | None:
    """Images/s between all actors being ready and the last shard ending (shards pro rata)."""
    if not windows or t_ready is None:
        return None
    t_end = max(e for _, e, _ in windows)
    if t_end <= t_ready:
        return None
    n = 0.0
    for s, e, k in windows:
        if e <= t_ready:
            continue
        n += k * (e - max(s, t_ready)) / max(e - s, 1e-9)
    return round(n / (t_end - t_ready), 3)
