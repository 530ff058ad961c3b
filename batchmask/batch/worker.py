"""The Ray actor of ``batchmask run``: loads the model once, then processes shards.

A shard is a list of ``(relative image path, mask path)``; pixels never pass through the
driver. For each shard the actor reads and decodes images on a small thread pool (JPEG
draft mode), predicts in batches, writes masks (and overlays) on the same pool while the
next batch is predicted, and finally writes the shard's rows as one part file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataError
from ..inference.pixels import decode_for_model, encode_overlay, encode_png, measure
from .entries import EntryReader, ListSource
from .options import RunOptions
from .outputs import Decoded, error_row, ok_row, overlay_of, part_name, rows_to_csv
from .storage import EntryError, StorageSpec, UnsafePathError, check_rel, redact_urls
from .tablerow import table_fields
from .testhooks import NO_HOOKS, NoHooks, hooks_from_env

#: What makes an image its own error row: the decoder's errors (as DataError), a name that cannot
#: be read or written, a special or oversized file. Not ValueError at large: a bug in our code
#: must fail the shard, not mark a whole folder as errors.
IMAGE_ERRORS = (DataError, UnsafePathError, EntryError)


@dataclass
class WorkerOptions:
    """What a worker needs of the run's :class:`~batchmask.batch.options.RunOptions` (same defaults),
    plus its threads (set by the driver once it knows the CPUs) and the run id."""

    batch_size: int = RunOptions.batch_size
    threshold: float | None = RunOptions.threshold
    overlays: bool = RunOptions.overlays
    max_pixels: int = RunOptions.max_pixels
    max_bytes: int = RunOptions.max_bytes
    threads: int = 1
    io_threads: int = 2
    draft: bool = RunOptions.draft
    run_id: str = ""
    #: "auto", "keras" or "onnx" (see batchmask.inference.backends); onnx needs "model.onnx" among the model files.
    runtime: str = "keras"
    #: GPUs Ray gave this actor (fractional allowed); > 0: predict on the GPU.
    gpus: float = 0.0
    #: "fp32", or "int8": "model.onnx" among the model files is then the int8 file (never Keras).
    #: Set by the driver ("auto" resolved).
    precision: str = "fp32"

    @classmethod
    def of(cls, options: RunOptions, run_id: str) -> WorkerOptions:
        return cls(batch_size=options.batch_size, threshold=options.threshold, overlays=options.overlays,
                   max_pixels=options.max_pixels, max_bytes=options.max_bytes, run_id=run_id, draft=options.draft,
                   runtime=options.runtime,
                   gpus=options.gpus_per_worker, precision=options.precision)


def _set_threads(n: int, tf_too: bool = True) -> None:
    """Intra-op threads for TF (env and, with ``tf_too``, its config); ONNX Runtime gets them per session."""
    for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    if not tf_too:  # importing TensorFlow costs seconds an ONNX Runtime actor does not need
        return
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except (ImportError, RuntimeError):  # another backend, or TF already initialised
        pass


def onnx_streams(threads: int, gpu: bool) -> int:
    """Batches ONNX Runtime predicts at once on the CPU, each with ``threads // streams`` threads.

    Two single-threaded streams instead of one stream on two threads: ONNX Runtime's threads
    meet after every operator, so when decode or PNG work takes one core, the other waits;
    two independent streams keep both cores busy and spend 7% less CPU per image (int8, 2 cores;
    docs/benchmarks.md). The masks are the same: each image's probabilities do not depend on its
    batch or on the thread count (checked bit for bit).
    """
    return 2 if threads >= 2 and not gpu else 1


def prediction_chunks(n: int, batch_size: int, streams: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each prediction of a shard of ``n`` images.

    With several streams each predicts ``batch_size / streams`` images at a time (as many in
    flight as one batch), except at the shard's ends, one image at a time: its first ``streams``
    images, so that every stream starts after one decode, and its last ``batch_size``, so that
    the streams finish together (a stream left without work waits for the next shard). An
    image costs the same CPU alone or in a batch (ONNX Runtime, one thread).
    """
    if streams <= 1:
        step = max(1, batch_size)
        return [(i, min(i + step, n)) for i in range(0, n, step)]
    step = max(1, math.ceil(max(1, batch_size) / streams))
    head = min(n, streams)
    tail = max(head, n - step * streams)
    bounds = list(range(head)) + list(range(head, tail, step)) + list(range(tail, n))
    return list(zip(bounds, [*bounds[1:], n], strict=True)) if n else []


def _load_worker_model(model_files: dict[str, bytes], opts: WorkerOptions):
    """The model from its shipped files: an ONNX Runtime session when asked for and possible, else Keras."""
    from ..inference import META_FILE, FaceMaskModel, load_model
    from ..inference.backends import (
        ONNX_FILE,
        cuda_provider_available,
        make_session,
        set_keras_gpu_memory_growth,
        wants_onnx,
    )

    gpu = opts.gpus > 0
    int8 = opts.precision == "int8"  # int8 runs on ONNX Runtime, on the CPU if CUDA is missing
    if ONNX_FILE in model_files and (int8 or wants_onnx(opts.runtime, gpu) and (not gpu or cuda_provider_available())):
        meta = json.loads(model_files[META_FILE])
        threads = max(1, opts.threads // onnx_streams(opts.threads, gpu))
        m = FaceMaskModel(None, meta, None, make_session(model_files[ONNX_FILE], threads, gpu))
        m.precision = opts.precision
        return m
    if gpu:
        set_keras_gpu_memory_growth()
    _set_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="batchmask-model-") as d:
        for name, blob in model_files.items():
            if name != ONNX_FILE:
                Path(d, name).write_bytes(blob)
        return load_model(d, runtime="keras")


def _in_ray() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def set_pixel_limit(max_pixels: int) -> None:
    """Make PIL's decompression-bomb limit follow ``--max-pixels`` in this process.

    PIL refuses to open images over ``2 * Image.MAX_IMAGE_PIXELS`` (default about 179 M pixels),
    which would cap ``--max-pixels`` and give PIL's limit in the error; with this, images up to
    ``max_pixels`` open and larger ones get the documented ``--max-pixels`` error.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


class MaskWorker:
    """Plain class; :func:`batchmask.batch.runner.run` wraps it with ``ray.remote``."""

    #: Called at start, per shard, per image and per batch: nothing happens unless a test sets one.
    hooks: NoHooks = NO_HOOKS

    def __init__(self, model_files, inp: StorageSpec | ListSource, out: StorageSpec, opts: WorkerOptions,
                 hooks: NoHooks | None = None):
        """``model_files``: {file name: bytes} of the model directory, or ``[ray ObjectRef]`` of it.

        ``hooks``: called at start, per shard, per image and per batch; by default the no-op
        hooks, or the tests' ``BATCHMASK_TEST_*`` hooks when one is set (see :mod:`.testhooks`).
        """
        t0 = time.time()
        self.hooks = hooks_from_env() if hooks is None else hooks
        if isinstance(model_files, list):
            import ray

            model_files = ray.get(model_files[0])
        self.hooks.start()
        _set_threads(opts.threads, tf_too=False)
        set_pixel_limit(opts.max_pixels)
        self.model = _load_worker_model(model_files, opts)
        self.threshold = opts.threshold if opts.threshold is not None else self.model.threshold
        #: Batches predicted at once (:func:`onnx_streams`); Keras predicts one at a time.
        self.streams = onnx_streams(opts.threads, opts.gpus > 0) if self.model.session is not None else 1
        self.opts = opts
        self.inp = inp.open()
        self.out = out.open()
        self.pool = ThreadPoolExecutor(max(1, opts.io_threads), thread_name_prefix="batchmask-io")
        self.images = 0
        self.busy_s = 0.0
        # warm up: the first predict builds the graph
        s = self.model.image_size
        self.model.predict_batch(np.zeros((1, s, s, 3), np.float32))
        self.startup_s = time.time() - t0

    def ready(self) -> dict:
        return {"startup_s": self.startup_s, **self._ident(), **self.device()}

    def _ident(self) -> dict:
        node = ""
        if _in_ray():  # get_runtime_context() would start Ray in a process that has none
            import ray

            node = ray.get_runtime_context().get_node_id()
        return {"pid": os.getpid(), "node_id": node, "peak_rss_mb": round(peak_rss_mb(), 1)}

    def device(self) -> dict:
        """What predicts here: runtime, its version, and the device (the GPU ids Ray assigned)."""
        gpu_ids: list[str] = []
        if self.opts.gpus > 0 and _in_ray():
            import ray

            gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        d = {"runtime": self.model.runtime, "precision": self.model.precision, "device": f"gpu:{','.join(gpu_ids)}" if self.opts.gpus > 0 else "cpu",
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": self.opts.threads,
             "streams": self.streams}
        if self.model.session is not None:
            from ..inference.backends import onnxruntime_version

            d["runtime_version"] = onnxruntime_version()
            d["providers"] = list(self.model.session.get_providers())
        else:
            import keras

            d["runtime_version"] = f"keras {keras.__version__} ({keras.backend.backend()})"
        return d

    # ------------------------------------------------------------------ per image
    def _overlay_rel(self, rel: str, mask: str) -> str:
        """An image's overlay is named after its mask path (collision-free: MaskNames, entry_mask), so
        ``a.jpg`` and ``a.png`` never share one. Without a mask path (``--no-masks``) only a list run,
        whose mask paths depend on the key alone, can name one; RunOptions refuses the rest."""
        if mask:
            return overlay_of(mask)
        if isinstance(self.inp, EntryReader):
            return self.inp.overlay_rel(rel)
        raise ValueError(f"{rel}: an overlay needs the image's mask path (a folder run refuses --no-masks --overlays)")

    def _load(self, rel: str, mask: str, src: str | None = None) -> Decoded:
        """``src``: where to read ``rel`` when it is not ``rel`` itself (a listed URL whose secret,
        a signature, is kept out of the image column and out of error rows)."""
        d = Decoded(rel, mask)
        try:
            # a list run's input (EntryReader) reads each entry from its own storage, by its key
            getattr(self.inp, "check_entry", check_rel)(src or rel)
            if mask:  # "": --no-masks
                check_rel(mask)
                self.out.check_name(mask)
            if self.opts.overlays:
                self.out.check_name(self._overlay_rel(rel, mask))
            self.hooks.image(rel)
            data = self.inp.read_bytes(src or rel, self.opts.max_bytes)
            if self.opts.overlays:
                d.data = data
            d.x, d.width, d.height = decode_for_model(
                data, self.model.image_size, self.opts.max_pixels, rel, self.opts.draft
            )
        except IMAGE_ERRORS as exc:
            d.error = str(exc)
            d.width, d.height = getattr(exc, "size", None) or (0, 0)  # the header's, when it was read
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:  # this entry only
            d.error = f"{rel}: cannot read ({type(exc).__name__}: {exc})"  # e.g. deleted since listed
        except OSError as exc:
            if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO):  # this name, or a socket
                raise
            d.error = f"{rel}: cannot read ({type(exc).__name__}: {exc.strerror or exc})"
        # Anything else (PermissionError, e.g. S3 AccessDenied, connection errors, and bugs: a
        # ValueError from our own code) fails the shard, and then the run, instead of recording
        # every image as a permanent error row.
        if src is not None and d.error:
            d.error = redact_urls(d.error.replace(src, rel))
        return d

    def _finish(self, d: Decoded, prob: np.ndarray) -> dict:
        try:
            r = measure(prob, d.width, d.height, self.threshold, self.model.image_size)
            m, face_pixels, faces, conf, table = r.mask, r.face_pixels, r.faces, r.mean_conf, table_fields(r)
            if d.mask:  # "": --no-masks
                self.out.write_bytes(d.mask, encode_png(m))
            if self.opts.overlays:
                self.out.write_bytes(self._overlay_rel(d.rel, d.mask), encode_overlay(d.data, m, d.rel))
                d.data = None
        except (MemoryError, DataError) as exc:  # the image's own problem (too big for memory)
            return error_row(d.rel, f"cannot make the mask ({type(exc).__name__}: {exc})", d.width, d.height)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            return error_row(d.rel, f"cannot write its mask ({exc.strerror}: {d.mask})", d.width, d.height)
        # Anything else (disk full, permission denied, storage unreachable) is the run's problem, not
        # the image's: it fails the shard, and then the run, and the image is done next time.
        return {**ok_row(d.rel, d.mask, d.width, d.height, face_pixels, faces, conf), **table}

    # ------------------------------------------------------------------ per shard
    def process(self, shard: int, items: list[tuple[str, str]]) -> dict:
        t0 = time.time()
        self.hooks.shard(shard)
        loads = [self.pool.submit(self._load, *item) for item in items]
        rows: list[dict] = []
        chunks = prediction_chunks(len(loads), self.opts.batch_size, self.streams)
        writes: list[list[Future]] = [[] for _ in chunks]  # per chunk: the part file keeps the shard's order
        with ThreadPoolExecutor(self.streams, thread_name_prefix="batchmask-predict") as predictor:
            running: dict[Future, tuple[int, list[Decoded], list[Decoded]]] = {}
            for k, (i, j) in enumerate(chunks):
                ds = [f.result() for f in loads[i:j]]
                good = [d for d in ds if not d.error]
                rows += [error_row(d.rel, d.error, d.width, d.height) for d in ds if d.error]
                if good:
                    running[predictor.submit(self.model.predict_batch, np.stack([d.x for d in good]))] = (k, ds, good)
                else:
                    self._predicted(ds)
                # One chunk more than streams: a stream that finishes takes the next at once
                while len(running) > self.streams:
                    self._collect(running, writes)
            while running:
                self._collect(running, writes)
        rows += [f.result() for ws in writes for f in ws]
        self.out.write_bytes(part_name(self.opts.run_id, shard), rows_to_csv(rows))
        self.hooks.shard_done(shard)
        t1 = time.time()
        self.busy_s += t1 - t0
        ok = sum(r["status"] == "ok" for r in rows)
        return {"shard": shard, "n": len(rows), "ok": ok, "failed": len(rows) - ok, "start": t0, "end": t1,
                "errors": [(r["image"], r["error"]) for r in rows if r["status"] != "ok"][:5], **self._ident()}

    def _collect(self, running: dict, writes: list[list[Future]]) -> None:
        """Hand the images of the predictions done first (any order) to the I/O pool."""
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for probs in done:
            k, ds, good = running.pop(probs)
            for d, p in zip(good, probs.result(), strict=True):
                d.x = None
                writes[k].append(self.pool.submit(self._finish, d, p))
            self._predicted(ds)

    def _predicted(self, ds: list[Decoded]) -> None:
        self.images += len(ds)
        self.hooks.batch_done(self.images)

    def stats(self) -> dict:
        return {"images": self.images, "busy_s": round(self.busy_s, 3), **self._ident()}
