"""The options of one ``batchmask run``: one frozen dataclass, its defaults and its checks.

:class:`RunOptions` is the single list of what a run can be asked to do. Everything else is
derived from it: ``run(input, output, options)`` takes it (or builds it from keywords), the
``batchmask run`` command takes its click defaults from it, ``run.json``'s ``options`` is
:meth:`RunOptions.recorded` (the fields marked ``recorded``, in this order), a job file's run
fields are the fields marked ``job`` (:mod:`batchmask.jobs.spec`), and the worker's settings
come from it (:meth:`~batchmask.batch.worker.WorkerOptions.of`).

The checks are :meth:`RunOptions.problems`: ``RunOptions(...)`` raises :class:`RunError` with
them, and a job file reports them as its own problems, so both say the same thing.

This module imports nothing heavy (no Ray, Keras, fsspec, click; numpy through the runtime names): the CLI, the job files and
the workers all read it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..exits import EXIT_FAILED
from ..inference.backends import RUNTIMES  # what predicts (numpy is the heaviest thing this imports)
from ..inference.int8 import PRECISIONS


class RunError(RuntimeError):
    """The run could not be done (bad options, unreachable storage, no workers)."""

    exit_code = EXIT_FAILED


def _opt(default: Any, *, recorded: bool = False, job: tuple[type, ...] = ()) -> Any:
    """A field: ``recorded`` ones go to run.json's ``options``; ``job`` gives the TOML types a job file
    may use for it (no types: not a job-file field)."""
    return field(default=default, metadata={"recorded": recorded, "job": job})


@dataclass(frozen=True)
class RunOptions:
    """Everything a run can be asked to do, besides its input and output.

    Defaults are written here only. ``shard_timeout``'s default comes from
    ``$BATCHMASK_SHARD_TIMEOUT`` (read once, at import).
    """

    # run.json "options", in this order (README: "Files written").
    #: Ray actors, each with its own copy of the model.
    workers: int = _opt(1, recorded=True, job=(int,))
    #: Images per prediction batch.
    batch_size: int = _opt(8, recorded=True, job=(int,))
    #: Images per unit of work handed to an actor.
    shard_size: int = _opt(32, recorded=True)
    #: Only images whose path or name matches.
    glob: str | None = _opt(None, recorded=True, job=(str,))
    #: Face probability threshold (None: the model's).
    threshold: float | None = _opt(None, recorded=True, job=(float, int))
    #: Also write overlays/<mask path>.jpg (masks/X.png -> overlays/X.jpg).
    overlays: bool = _opt(False, recorded=True, job=(bool,))
    #: Process every image again.
    overwrite: bool = _opt(False, recorded=True)
    #: Process images recorded as errors again.
    retry_errors: bool = _opt(False, recorded=True)
    #: Images with more pixels are error rows.
    max_pixels: int = _opt(50_000_000, recorded=True)
    #: Files (objects) larger than this are error rows, never read.
    max_bytes: int = _opt(256 * 1024 * 1024, recorded=True, job=(int,))
    #: Local paths are the same on every node.
    shared_fs: bool = _opt(False, recorded=True)
    #: JPEG draft-mode decoding.
    draft: bool = _opt(True, recorded=True)
    #: Seconds a shard may go without progress.
    shard_timeout: float = _opt(float(os.environ.get("BATCHMASK_SHARD_TIMEOUT", "300")), recorded=True)
    #: What predicts: "auto" (ONNX Runtime when installed), "keras" or "onnx".
    runtime: str = _opt("auto", recorded=True, job=(str,))
    #: "auto" (int8 when the model's int8 file is within 0.003 Dice of fp32 and ONNX Runtime runs
    #: on the CPU), "fp32", or "int8" (the model's int8 ONNX file; ONNX Runtime only).
    precision: str = _opt("auto", recorded=True, job=(str,))
    #: GPUs Ray gives each actor.
    gpus_per_worker: float = _opt(0.0, recorded=True, job=(float, int))
    #: Runs with at most this many images skip Ray.
    in_process_max: int = _opt(40, recorded=True)
    #: No PNG masks: results.parquet (mask_rle) and coverage.csv only.
    no_masks: bool = _opt(False, recorded=True, job=(bool,))
    # Not in run.json's options (where the model and storage are recorded otherwise, or not at all).
    #: A .txt, .csv or .parquet list of images to do (local paths or URLs) instead of run()'s input;
    #: recorded as run.json's "input".
    input_list: str | None = _opt(None, job=(str,))
    #: The list's column of entries (.csv, .parquet; None: "path").
    list_column: str | None = _opt(None, job=(str,))
    #: Model directory (None: the packaged model).
    model: str | None = _opt(None, job=(str,))
    #: S3 endpoint.
    endpoint_url: str | None = _opt(None, job=(str,))
    #: fsspec options, e.g. {"profile": name} (a job file's `profile`).
    storage_options: dict | None = _opt(None)
    #: Ray cluster to join.
    address: str | None = _opt(None)
    #: No progress bar.
    quiet: bool = _opt(False)
    #: Wait for another run's lock instead of failing.
    wait: bool = _opt(False)
    #: With wait: give up after this many seconds.
    wait_timeout: float | None = _opt(None)

    def __post_init__(self) -> None:
        for name in ("shard_timeout", "gpus_per_worker"):  # ints from Python or TOML are fine
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if self.model is not None and not isinstance(self.model, str):
            object.__setattr__(self, "model", os.fspath(self.model))
        if self.storage_options is not None:
            object.__setattr__(self, "storage_options", dict(self.storage_options))
        problems = self.problems(dataclasses.asdict(self))
        if problems:
            raise RunError("; ".join(f"--{name.replace('_', '-')} {why}, got {getattr(self, name)!r}"
                                     for name, why in problems))

    @staticmethod
    def problems(values: dict[str, Any]) -> list[tuple[str, str]]:
        """(field, why) for each value in ``values`` (any subset of the fields) that a run refuses."""
        out: list[tuple[str, str]] = []

        def check(name: str, ok, why: str) -> None:
            if name in values and values[name] is not None and not ok(values[name]):
                out.append((name, why))

        for name in ("workers", "batch_size", "shard_size", "max_pixels", "max_bytes"):
            check(name, lambda v: v >= 1, "must be at least 1")
        check("threshold", lambda v: 0.0 < float(v) < 1.0, "must be between 0 and 1 (exclusive)")
        check("shard_timeout", lambda v: v > 0, "must be more than 0 seconds")
        check("gpus_per_worker", lambda v: v >= 0, "must be 0 or more")
        check("in_process_max", lambda v: v >= 0, "must be 0 or more")
        check("runtime", lambda v: v in RUNTIMES, "must be auto, keras or onnx")
        check("precision", lambda v: v in PRECISIONS, "must be auto, fp32 or int8")
        check("input_list", lambda v: bool(v.strip()), "must not be empty")
        check("list_column", lambda v: bool(v.strip()), "must not be empty")
        if values.get("list_column") is not None and not values.get("input_list"):
            out.append(("list_column", "is the column of --input-list's entries; give --input-list too"))
        if values.get("no_masks") and values.get("overlays") and not values.get("input_list"):
            # A folder run names an overlay after its image's mask path (overlays/X.jpg for masks/X.png),
            # which keeps a.jpg's and a.png's apart; --no-masks records none (docs/design.md).
            out.append(("no_masks", "cannot go with --overlays in a folder run: an overlay is named after its "
                                    "image's mask path, which --no-masks does not record; drop --no-masks (a mask "
                                    "PNG costs a small part of what its overlay's JPEG does)"))
        if values.get("input_list") is not None and values.get("glob") is not None:
            out.append(("glob", "filters a folder's listing; with --input-list, filter the list instead"))
        return out

    def recorded(self) -> dict[str, Any]:
        """run.json's ``options``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["recorded"]}

    def to_kwargs(self) -> dict[str, Any]:
        """Every field, as keywords for ``run()`` (JSON-serialisable: a job's child process reads them)."""
        return dataclasses.asdict(self)


#: The fields a job file may set, with the TOML types each accepts, in RunOptions order.
JOB_FIELDS: dict[str, tuple[type, ...]] = {
    f.name: f.metadata["job"] for f in dataclasses.fields(RunOptions) if f.metadata["job"]
}
