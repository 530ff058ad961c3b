"""RunOptions: one frozen list of a run's options, its defaults written once, its checks in one
place, and everything else derived from it (run(), the CLI, run.json, job files, workers). Fast:
no Ray, no model."""

from __future__ import annotations

import dataclasses

import pytest

from batchmask.batch.options import JOB_FIELDS, RunError, RunOptions
from batchmask.batch.runner import _as_options
from batchmask.batch.worker import WorkerOptions

#: run.json's "options" keys, in order (README.md, "Files written"; kept from before RunOptions).
RUN_JSON_OPTIONS = ["workers", "batch_size", "shard_size", "glob", "threshold", "overlays", "overwrite",
                    "retry_errors", "max_pixels", "max_bytes", "shared_fs", "draft", "shard_timeout", "runtime",
                    "precision", "gpus_per_worker", "in_process_max", "no_masks"]


def test_defaults():
    o = RunOptions()
    assert (o.workers, o.batch_size, o.shard_size, o.max_pixels, o.in_process_max) == (1, 8, 32, 50_000_000, 40)
    assert (o.runtime, o.gpus_per_worker, o.threshold, o.model, o.draft) == ("auto", 0.0, None, None, True)
    assert o.shard_timeout > 0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunOptions().workers = 2  # type: ignore[misc]


def test_run_json_options_keep_their_keys_and_values():
    rec = RunOptions(workers=3, threshold=0.4, glob="*.jpg").recorded()
    assert list(rec) == RUN_JSON_OPTIONS
    assert rec["workers"] == 3 and rec["threshold"] == 0.4 and rec["glob"] == "*.jpg" and rec["batch_size"] == 8
    assert isinstance(rec["shard_timeout"], float) and isinstance(rec["gpus_per_worker"], float)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "--workers must be at least 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"shard_size": -1}, "--shard-size must be at least 1"),
        ({"max_pixels": 0}, "--max-pixels must be at least 1"),
        ({"max_bytes": 0}, "--max-bytes must be at least 1"),
        ({"threshold": 1.0}, "--threshold must be between 0 and 1"),
        ({"threshold": 0}, "--threshold must be between 0 and 1"),
        ({"shard_timeout": 0}, "--shard-timeout must be more than 0 seconds"),
        ({"gpus_per_worker": -0.5}, "--gpus-per-worker must be 0 or more"),
        ({"in_process_max": -1}, "--in-process-max must be 0 or more"),
        ({"runtime": "tensorrt"}, "--runtime must be auto, keras or onnx"),
    ],
)
def test_checks_in_one_place(kwargs, message):
    with pytest.raises(RunError, match=message):
        RunOptions(**kwargs)
    assert [k for k, _ in RunOptions.problems(kwargs)] == list(kwargs)


def test_problems_of_a_subset_only():
    assert RunOptions.problems({"workers": 2}) == []
    assert RunOptions.problems({}) == []


def test_run_takes_options_or_keywords(tmp_path):
    o = RunOptions(workers=2, model="m")
    assert _as_options(o, {}) is o
    assert _as_options(o, {"workers": 3}) == dataclasses.replace(o, workers=3)
    assert _as_options("m", {"workers": 2}) == o  # the model positionally, as before
    assert _as_options(None, {"workers": 2, "model": "m"}) == o
    assert _as_options(tmp_path, {}).model == str(tmp_path)  # a path object is kept as a string
    with pytest.raises(TypeError):
        _as_options("m", {"model": "n"})
    with pytest.raises(TypeError):
        _as_options(None, {"no_such_option": 1})


def test_to_kwargs_round_trips():
    o = RunOptions(workers=2, storage_options={"profile": "p"}, endpoint_url="http://x:1")
    assert RunOptions(**o.to_kwargs()) == o


def test_the_cli_takes_its_defaults_from_run_options():
    from batchmask.cli.run import run_cmd

    fields = {f.name for f in dataclasses.fields(RunOptions)}
    params = {p.name: p for p in run_cmd.params if p.name in fields}
    assert set(params) == fields - {"storage_options", "draft"}  # every option a user can set
    for name, p in params.items():
        if not p.is_flag:
            assert p.default == getattr(RunOptions, name), name


def test_job_fields_are_run_options():
    from batchmask.jobs.spec import _FIELDS, parse_job

    assert set(JOB_FIELDS) <= set(_FIELDS)
    assert set(JOB_FIELDS) == {"model", "workers", "batch_size", "endpoint_url", "threshold", "glob", "overlays",
                               "max_bytes", "runtime", "precision", "gpus_per_worker", "no_masks", "input_list",
                               "list_column"}
    job = parse_job({"name": "n", "schedule": "0 2 * * *", "input": "s3://b/in", "output": "s3://b/out",
                     "workers": 3, "gpus_per_worker": 1, "profile": "p"})
    assert isinstance(job.run, RunOptions) and job.run.workers == job.workers == 3
    assert job.run.gpus_per_worker == 1.0 and job.run.storage_options == {"profile": "p"}
    assert job.batch_size == RunOptions.batch_size
    kw = job.runner_kwargs()
    assert kw["input"] == "s3://b/in" and RunOptions(**{k: v for k, v in kw.items() if k not in ("input", "output")}) \
        == job.run


def test_worker_options_come_from_run_options():
    o = RunOptions(batch_size=4, threshold=0.3, overlays=True, max_pixels=1000, runtime="keras",
                   gpus_per_worker=0.5)
    w = WorkerOptions.of(o, "run-1")
    assert (w.batch_size, w.threshold, w.overlays, w.max_pixels, w.runtime, w.gpus, w.run_id) == \
        (4, 0.3, True, 1000, "keras", 0.5, "run-1")
    assert (WorkerOptions().batch_size, WorkerOptions().max_pixels) == (RunOptions.batch_size, RunOptions.max_pixels)
