"""``run()``: predict face masks for every image under a folder or bucket prefix, with Ray.

The driver lists images (streaming, sorted), skips those already done, groups the rest into
shards of relative paths and hands them to ``workers`` Ray actors (:mod:`batchmask.batch.worker`),
at most ``INFLIGHT_PER_ACTOR`` shards each (:mod:`batchmask.batch.dispatch`). Actors read,
predict and write; the driver only sees counts. What a run can be asked to do:
:class:`~batchmask.batch.options.RunOptions`. Outputs and their guarantees: :mod:`batchmask.batch.outputs`.
The end of a run's bookkeeping (driver rows, merge, run.json, the lock's release; bounded in time
when the run is failing): :mod:`batchmask.batch.finish`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import platform
import time
import uuid
from collections.abc import Container, Iterator
from dataclasses import dataclass, field

from ..data import IMAGE_EXTENSIONS
from ..exits import EXIT_FAILED, EXIT_IMAGES_FAILED, EXIT_OK
from ..inference import read_meta, resolve_model_dir
from ..version import __version__
from .dispatch import RunCounts
from .entries import check_same_input_kind, entry_key, entry_mask, entry_problem, require_store
from .finish import _bounded, _release, _save_rows, _write_run_json
from .lock import LockLost, OutputLock
from .manifest import EntryList
from .modelcheck import check_model, check_same_model
from .options import RunError, RunOptions
from .outputs import (
    MaskNames,
    error_row,
    folder_mask,
    merge_parts,
    read_records,
    stable_text,
)
from .plan import (
    Shards,
    check_int8_file,
    execute_in_process,
    in_process_reason,
    plan_shards,
    prepare_model_files,
    run_precision,
    runtime_used,
)
from .policy import INFLIGHT_PER_ACTOR
from .quiet import ray_output_hidden
from .rayexec import execute as _execute
from .seen import SeenKeys
from .storage import StorageSpec, UnsafePathError, check_rel, matches, redact_urls
from .worker import WorkerOptions

log = logging.getLogger(__name__)

__all__ = ["RunError", "RunOptions", "RunSummary", "run"]

#: Listed as images (case-insensitive): the training formats plus GIF (first frame).
RUN_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif")


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


def _versions() -> dict:
    """Package versions from their metadata (importing TensorFlow here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    v = {"batchmask": __version__, "python": platform.python_version()}
    for dist in ("ray", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow", "s3fs", "gcsfs", "adlfs", "fsspec",
                 "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            v[dist] = version(dist)
    return v


def _as_options(options: RunOptions | str | os.PathLike | None, kwargs: dict) -> RunOptions:
    """``run()``'s third argument and keywords as one :class:`RunOptions`."""
    if isinstance(options, RunOptions):
        return dataclasses.replace(options, **kwargs) if kwargs else options
    if options is not None:  # the model directory, positionally (as before RunOptions existed)
        if "model" in kwargs:
            raise TypeError("run() got the model twice (positionally and as model=)")
        kwargs = {**kwargs, "model": options}
    return RunOptions(**kwargs)


def run(input: str | None, output: str, options: RunOptions | str | os.PathLike | None = None,
        **kwargs) -> RunSummary:
    """Predict masks for every image under ``input``; write masks, coverage.csv and run.json to ``output``.

    ``input`` None and the option ``input_list`` (a .txt, .csv or .parquet file of local paths and
    URLs, :mod:`batchmask.batch.manifest`): the images listed there instead.

    ``options``: a :class:`~batchmask.batch.options.RunOptions`; or, for convenience, the model
    directory, with any other option as a keyword (``run(inp, out, "models/m", workers=4)``);
    keywords given with a ``RunOptions`` replace its fields.

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
    opts = _as_options(options, kwargs)
    if bool(input) == bool(opts.input_list):
        raise RunError("--input and --input-list are mutually exclusive" if input else
                       "give an input: --input (a folder or prefix) or --input-list (a list of images)")
    from ..inference.backends import RuntimeUnavailableError, check_runtime

    try:
        check_runtime(opts.runtime)
        check_int8_file(opts.model, opts.runtime, opts.precision)  # before anything is written
    except (ValueError, RuntimeUnavailableError) as exc:  # QuantizationError is a ValueError
        raise RunError(str(exc)) from exc
    return _BatchRun(input, output, opts).execute()


class _BatchRun:
    """One ``run()``: the refusals, the lock and the resume state when built; :meth:`execute` does the rest."""

    def __init__(self, input: str | None, output: str, opts: RunOptions):
        self.opts, self.output = opts, output
        self.t0 = time.time()
        started = _now()
        self.run_id = (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.t0))
                       + f"{int(self.t0 * 1e6) % 1_000_000:06d}-{uuid.uuid4().hex[:6]}")
        self.out_spec = StorageSpec(output, opts.endpoint_url, dict(opts.storage_options or {})).resolved()
        self.out = self.out_spec.open()
        # Refusals first: nothing is written to --output before these checks.
        self.in_list = None if input else EntryList(opts.input_list, opts.list_column, opts.endpoint_url,
                                                    opts.storage_options)
        if self.in_list is not None:
            self.in_spec, self.inp, self.skip_prefix = self.in_list.source(), None, None
            self.in_list.check()  # opens the list and reads its header or schema
        else:
            self.in_spec = StorageSpec(input, opts.endpoint_url, dict(opts.storage_options or {})).resolved()
            self.inp = self.in_spec.open()
            self.skip_prefix = self.inp.relative_prefix_of(self.out)
            if self.skip_prefix == "":
                raise RunError("--output must not be the same location as --input")
            self.inp.check_input()
        self.model_dir = resolve_model_dir(opts.model)
        check_model(self.model_dir)  # a corrupt or mismatched model: one line, before anything is written
        self.out.ensure_root()
        if self.inp is not None and not self.inp.remote and not self.out.remote:
            self.inp.exclude_dir(self.out.root)  # the output, also where a symlink inside the input leads to it
        self.lock = OutputLock(self.out).acquire(wait=opts.wait, wait_timeout=opts.wait_timeout)
        try:
            self.model_sha256 = check_same_model(self.out, self.model_dir, opts.overwrite)
            check_same_input_kind(self.out, self.in_list is not None)
            merge_parts(self.out)  # leftovers of an interrupted run first
            records = read_records(self.out, opts.retry_errors, masks=not opts.no_masks,
                                   default_mask=entry_mask if self.in_list is not None else folder_mask)
            self.done: Container[str] = set() if opts.overwrite else records
            self.names = MaskNames(records)  # an image keeps its mask path; no new image takes one
            self.recorded_mask = records.get  # a list entry too (an older version's entry_mask may differ)
        except BaseException:
            self.lock.release()
            raise
        self.counts = RunCounts()
        self.n_images = 0  # images listed before --glob
        self.first: list | None = None
        self.shard_plan: Shards | None = None
        self.info = self._info(started)

    def _info(self, started: str) -> dict:
        info: dict = {"format_version": 1, "run_id": self.run_id, "input": self.in_spec.public(),
                      "output": self.out_spec.public(),
                      "model": {"path": str(self.model_dir), "sha256": self.model_sha256},
                      "options": self.opts.recorded(), "versions": _versions(), "start": started}
        try:
            meta = read_meta(self.model_dir)
            info["model"].update({"config": meta.get("model"), "trained": bool(meta.get("training")),
                                  "metrics": meta.get("metrics")})
        except (OSError, ValueError):
            pass
        return info

    def _pending(self) -> Iterator[tuple[str, str]]:
        """(relative path, mask path) of each image to do, in listing order; counts the others."""
        if self.in_list is not None:
            yield from self._pending_listed()
            return
        c = self.counts
        for rel in self.inp.iter_files():
            if self.skip_prefix and rel.startswith(self.skip_prefix):
                continue
            if not matches(rel, RUN_EXTENSIONS, None):
                continue
            self.n_images += 1
            if self.opts.glob is not None and not matches(rel, RUN_EXTENSIONS, self.opts.glob):
                continue
            c.total += 1
            try:
                check_rel(rel)
            except UnsafePathError as exc:
                if rel not in self.done:
                    c.rows.append(error_row(rel, str(exc)))
                    c.failed += 1
                else:
                    c.skipped += 1
                continue
            mask = "" if self.opts.no_masks else self.names.assign(rel)  # "": the worker writes no PNG
            if rel in self.done:
                c.skipped += 1
                continue
            yield rel, mask
        c.listed_all = True

    def _pending_listed(self) -> Iterator[tuple[str, ...]]:
        """(key, mask path) of each entry of the input list to do, in the list's order; counts the others.
        A key is the entry without credentials (batch/entries.py); its mask path depends on it alone.
        An entry whose key is not what it says (a signed URL) comes as (key, mask path, entry)."""
        c, base, seen, twice, schemes = self.counts, self.in_spec.base, SeenKeys(), 0, set()
        for raw in self.in_list:
            self.n_images += 1
            c.total += 1
            key = entry_key(raw)
            if key in self.done or not seen.add(key):  # done before, or listed twice (done once)
                twice += key not in self.done
                c.skipped += 1
                continue
            problem = entry_problem(raw, base)
            if problem is not None:
                c.rows.append(error_row(key, problem))
                c.failed += 1
                continue
            require_store(key, schemes)  # "install batchmask[gcs]" before any worker meets one
            mask = "" if self.opts.no_masks else (self.recorded_mask(key) or entry_mask(key))
            yield (key, mask) if key == raw else (key, mask, raw)  # the worker reads the URL with its secret
        self.info["input"]["duplicates"] = twice  # counted as skipped
        c.listed_all = True

    def execute(self) -> RunSummary:
        interrupted = failed = False
        try:
            self._process()
        except KeyboardInterrupt:
            interrupted = True
            raise
        except BaseException as exc:
            failed = True
            self.info["error"] = stable_text(f"{type(exc).__name__}: {redact_urls(str(exc)).strip()}")[:1000]
            raise
        finally:
            self._finish(interrupted, failed)
        c = self.counts
        return RunSummary(c.total, c.ok, c.failed, c.skipped, round(self.wall, 3),
                          self.info["throughput"]["images_per_s"], self.code, self.output, self.info)

    def _process(self) -> None:
        opts, info = self.opts, self.info
        # The listing starts here: its failure is recorded in run.json too.
        shards, n_todo, planned_shard = plan_shards(self._pending(), self.counts, opts.workers, opts.batch_size,
                                                    opts.shard_size, INFLIGHT_PER_ACTOR)
        self.first = next(shards, None)
        if self.first is None:
            self._warn_if_empty()
            return
        self.lock.check()
        self.shard_plan = shards  # resized when the memory cap starts fewer workers (rayexec.reshard)
        shards = self._guarded(shards)
        precision = run_precision(self.model_dir, opts.runtime, opts.precision, opts.gpus_per_worker)
        files, info["runtime"] = prepare_model_files(self.model_dir, opts.runtime, precision)
        wopts = dataclasses.replace(WorkerOptions.of(opts, self.run_id), precision=precision)
        why_ray = in_process_reason(n_todo, opts.in_process_max, opts.gpus_per_worker, opts.address)
        info["plan"] = {"images_to_do": n_todo, "shard_size": planned_shard,
                        "mode": "ray" if why_ray else "in-process", "why_ray": why_ray}
        if why_ray is None:
            log.info("%d images to do (<= --in-process-max %d): processing them here, without Ray",
                     n_todo, opts.in_process_max)
            execute_in_process(self.first, shards, self.counts, info, self.in_spec, self.out_spec, files, wopts,
                               opts.quiet)
        else:
            with ray_output_hidden(not log.isEnabledFor(logging.INFO)):
                _execute(self, shards, files, wopts)

    def _warn_if_empty(self) -> None:
        """Nothing to do: normal for an incremental run (all done), but a listing without images, or
        a --glob that matched none of them, usually means a wrong path, prefix or pattern."""
        if not self.counts.listed_all:
            return
        if self.in_list is not None:
            if self.n_images == 0:
                log.warning("the input list %s has no entries", self.in_list.where)
            else:
                log.info("nothing new: all %d listed images are done", self.counts.total)
            return
        where = self.in_spec.public()["url"]
        if self.n_images == 0:
            log.warning("no images found under %s (extensions %s); is the path or prefix right?", where,
                        " ".join(RUN_EXTENSIONS))
        elif self.counts.total == 0:
            log.warning("--glob %r matched none of the %d images under %s", self.opts.glob, self.n_images, where)
        else:
            log.info("nothing new: all %d images are done", self.counts.total)

    def _guarded(self, shards: Iterator[list]) -> Iterator[list]:
        """``shards``, each handed out only while the output's lock is still ours (LockLost otherwise)."""
        for shard in shards:
            self.lock.check()
            yield shard

    def _lock_lost(self, failing: bool) -> LockLost | None:
        """Renew the lock now (proof that it is still ours before merging); the LockLost if it is not."""
        try:
            if failing:
                _bounded(lambda: self.lock.check(renew=True), "checking the output lock")
            else:
                self.lock.check(renew=True)
        except LockLost as exc:
            return exc
        except Exception as exc:
            if not failing:
                raise
            log.warning("could not renew the output lock: %s", redact_urls(str(exc)))
        return None

    def _finish(self, interrupted: bool, failed: bool) -> None:
        """Driver rows, merge, run.json and the lock's release: also when the run failed (bounded then).
        A run that lost its lock does none of these: the output is another run's now."""
        failing, info, c = interrupted or failed, self.info, self.counts
        if "runtime" in info:
            runtime_used(info)
        try:
            lost = self._lock_lost(failing)
        except BaseException:
            _release(self.lock, True)
            raise
        if lost is not None:
            _release(self.lock, True)
            raise lost
        try:
            _save_rows(self.out, self.run_id, c.rows, self.first is not None or bool(c.rows), failing, info)
        except BaseException:
            _release(self.lock, True)
            raise
        self.wall = time.time() - self.t0
        self.code = EXIT_FAILED if failing else EXIT_IMAGES_FAILED if c.failed else EXIT_OK  # run.json says so too
        info.update({"end": _now(), "wall_s": round(self.wall, 3), "interrupted": interrupted,
                     "counts": c.recorded(), "listing_complete": c.listed_all or (self.first is None and not failed),
                     "exit_code": self.code})
        processed = c.ok + c.failed
        info.setdefault("throughput", {})["images_per_s"] = round(processed / self.wall, 3) if self.wall > 0 else 0.0
        try:
            _write_run_json(self.out, info, failing)
        finally:
            _release(self.lock, failing)
