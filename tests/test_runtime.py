"""ONNX Runtime vs Keras (issue 11): the cached export, parity on real images, runtime choice,
small runs in process, shards spread over every worker, and GPU workers on fake GPUs."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from batchmask import runtime as rt
from batchmask.batch.dispatch import RunCounts
from batchmask.batch.plan import plan_shards, shard_size_for
from batchmask.batch.runner import RunError, run
from batchmask.data import read_image
from batchmask.inference import default_model_dir, load_model, save_model


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """Exports go to a cache of this module's own (never the user's ~/.cache)."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("onnx_cache")
    mp.setenv(rt.CACHE_ENV, str(d))
    yield d
    mp.undo()


def demo_images(demo_wider: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted(demo_wider.glob("images/*/*.jpg"))]


def test_export_is_cached_by_model_hash_and_checked(tiny_model_dir, onnx_cache, monkeypatch):
    path, rec = rt.cached_onnx(tiny_model_dir)
    assert path.parent == onnx_cache / "onnx" and path.name == rt.file_sha256(tiny_model_dir / "model.keras") + ".onnx"
    assert rec["cached"] is False and rec["parity_max_abs_diff"] <= rt.PARITY_TOL
    # a second call (a cron run) uses the cache and never exports again
    monkeypatch.setattr(rt, "export_onnx", lambda *a: pytest.fail("exported twice"))
    path2, rec2 = rt.cached_onnx(tiny_model_dir)
    assert path2 == path and rec2["cached"] is True
    m = load_model(tiny_model_dir, runtime="onnx")
    assert m.runtime == "onnx" and m.keras_model is None


def test_failed_export_falls_back_to_keras_with_one_line(tmp_path, tiny_model_dir, monkeypatch, caplog):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    with open(model / "model.keras", "ab") as f:  # another hash: not in the cache
        f.write(b"\0")

    def fail(*a):
        raise ValueError("this model cannot be converted")

    monkeypatch.setattr(rt, "export_onnx", fail)
    with caplog.at_level(logging.WARNING, logger="batchmask.inference.backends"):
        m = load_model(model, runtime="auto")
    assert m.runtime == "keras" and m.keras_model is not None
    lines = [r for r in caplog.records if r.name == "batchmask.inference.backends"]
    assert len(lines) == 1 and "using Keras" in lines[0].getMessage() and "cannot be converted" in lines[0].getMessage()


def test_export_that_disagrees_with_keras_is_refused(tmp_path, tiny_model_dir, tiny_model, monkeypatch):
    m = tiny_model
    model = save_model(m.keras_model, tmp_path / "m", m.meta)  # saved again: another hash, not cached
    assert rt.file_sha256(model / "model.keras") != rt.file_sha256(tiny_model_dir / "model.keras")
    # The conversion itself is the session's export of these same weights (tf2onnx once per
    # session, not once more here); the parity check then runs on it as on any fresh export.
    import keras

    same_weights, _ = rt.cached_onnx(tiny_model_dir)
    monkeypatch.setattr(keras.Model, "export", lambda self, path, **k: shutil.copyfile(same_weights, path))
    real_run = rt.run_session
    monkeypatch.setattr(rt, "run_session", lambda s, x: real_run(s, x) + 0.01)
    assert rt.cached_onnx(model) is None
    assert not list(Path(rt.cache_dir(), "onnx").glob(rt.file_sha256(model / "model.keras") + "*"))


def _entry(model_dir: Path) -> tuple[Path, Path]:
    sha = rt.file_sha256(model_dir / "model.keras")
    return Path(rt.cache_dir(), "onnx", f"{sha}.onnx"), Path(rt.cache_dir(), "onnx", f"{sha}.json")


def _other_models_onnx(src: Path, dest: Path) -> None:
    """A loadable ONNX file of the same shape whose output differs: the head's weights negated."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    last_conv = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    for init in m.graph.initializer:
        if init.name == last_conv.input[1]:
            init.CopyFrom(numpy_helper.from_array(-10.0 * numpy_helper.to_array(init), init.name))
    onnx.save(m, str(dest))


@pytest.mark.parametrize("damage", ["truncated", "another model's file", "record without hash"])
def test_damaged_cache_entry_is_exported_again_naming_the_file(tmp_path, tiny_model_dir, tiny_model, damage, caplog):
    """A cache entry whose .onnx is not the file that was exported is never used: re-exported, one warning."""
    model = save_model(tiny_model.keras_model, tmp_path / "m", tiny_model.meta)  # its own cache entry
    path, rec = rt.cached_onnx(model)
    assert rec["cached"] is False
    good = path.read_bytes()
    _, record = _entry(model)
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "another model's file":
        _other_models_onnx(path, path)
    else:  # an entry written before records had the hash
        record.write_text(json.dumps({k: v for k, v in rec.items() if k not in ("onnx_sha256", "cached")}))
    with caplog.at_level(logging.WARNING, logger="batchmask.inference.backends"):
        m = load_model(model, runtime="onnx")
    assert m.runtime == "onnx" and m.runtime_info["cached"] is False  # exported again
    assert path.read_bytes() == good or rt.file_sha256(path) == json.loads(record.read_text())["onnx_sha256"]
    warned = [r.getMessage() for r in caplog.records if r.name == "batchmask.inference.backends"]
    assert len(warned) == 1 and str(path) in warned[0] and "exporting" in warned[0], warned
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(m.predict_batch(x), tiny_model.predict_batch(x), atol=1e-3)


def test_cache_file_onnxruntime_cannot_load_is_exported_again(tmp_path, tiny_model, caplog):
    """Even with a matching hash, a file ONNX Runtime refuses is dropped and exported once more."""
    model = save_model(tiny_model.keras_model, tmp_path / "m", tiny_model.meta)
    path, rec = rt.cached_onnx(model)
    _, record = _entry(model)
    path.write_bytes(b"not an onnx file")
    record.write_text(json.dumps({**rec, "onnx_sha256": rt.file_sha256(path)}))
    with caplog.at_level(logging.WARNING, logger="batchmask.inference.backends"):
        m = load_model(model, runtime="onnx")
    assert m.runtime == "onnx" and m.runtime_info["cached"] is False
    warned = [r.getMessage() for r in caplog.records if r.name == "batchmask.inference.backends"]
    assert len(warned) == 1 and str(path) in warned[0] and "cannot load" in warned[0], warned


def test_runtime_choice():
    assert rt.wants_onnx("auto") and rt.wants_onnx("onnx") and not rt.wants_onnx("keras")
    with pytest.raises(ValueError, match="runtime must be"):
        rt.check_runtime("tensorrt")


@pytest.mark.slow  # the shipped model in both runtimes on 10 full-size images
def test_default_model_onnx_masks_match_keras_on_demo_images(demo_wider):
    """Parity on real images with the shipped model: the masks `run` would write."""
    images = demo_images(demo_wider)
    k = load_model(None, runtime="keras")
    o = load_model(None, runtime="onnx")
    assert (k.runtime, o.runtime) == ("keras", "onnx")
    pk, po = k.predict_proba(images), o.predict_proba(images)
    agree = [np.mean((a >= k.threshold) == (b >= k.threshold)) for a, b in zip(pk, po, strict=True)]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(pk, po, strict=True))
    print(f"default model, {len(images)} demo images: mean pixel agreement {np.mean(agree):.6f}, "
          f"min {min(agree):.6f}, max |p diff| {diff:.2g}")
    assert np.mean(agree) >= 0.999 and min(agree) >= 0.999 and diff < 1e-3
    assert sum(int(np.count_nonzero(a >= k.threshold)) for a in pk) > 0  # the masks are not all empty


def test_shards_are_sized_from_images_and_workers():
    assert shard_size_for(60, 2, 8, 32, 2) == 15  # 4 shards: two per worker
    assert shard_size_for(10, 2, 8, 32, 2) == 5  # not below a batch, unless a worker would idle
    assert shard_size_for(10_000, 2, 8, 32, 2) == 32  # the cap
    assert shard_size_for(1, 4, 8, 32, 2) == 1
    st = RunCounts()

    def items(n):
        yield from ((f"{i}.jpg", f"m/{i}.png") for i in range(n))
        st.listed_all = True

    shards, n, size = plan_shards(items(60), st, 2, 8, 32, 2)
    assert (n, size) == (60, 15) and [len(s) for s in shards] == [15] * 4
    st.listed_all = False
    shards, n, size = plan_shards(items(1000), st, 2, 8, 32, 2)  # too long to know up front
    got = [len(s) for s in shards]
    assert (n, size) == (None, 32) and sum(got) == 1000 and got[0] == 32


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def test_small_run_in_process_keras_and_onnx_same_outputs(tmp_path, demo_wider, tiny_model_dir):
    """Both runtime paths, in process (no Ray started), write the same masks and rows."""
    import ray

    inp = demo_wider / "images"
    outs = {}
    for runtime in ("keras", "onnx"):
        out = tmp_path / runtime
        s = run(str(inp), str(out), str(tiny_model_dir), workers=2, quiet=True, runtime=runtime)
        info = json.loads((out / "run.json").read_text())
        assert s.ok == 10 and info["plan"]["mode"] == "in-process" and "ray" not in info
        assert info["runtime"]["used"] == runtime and info["runtime"]["requested"] == runtime
        assert info["runtime"]["version"].startswith("keras" if runtime == "keras" else "onnxruntime")
        assert info["actors"][0]["actor"] == "driver" and info["actors"][0]["images"] == 10
        outs[runtime] = out
    assert not ray.is_initialized()
    rk, ro = _rows(outs["keras"]), _rows(outs["onnx"])
    assert rk.keys() == ro.keys() and len(rk) == 10
    agree = []
    for img, r in rk.items():
        assert r["status"] == ro[img]["status"] == "ok" and r["mask"] == ro[img]["mask"]
        a = np.asarray(read_image(outs["keras"] / r["mask"]))
        b = np.asarray(read_image(outs["onnx"] / r["mask"]))
        agree.append(np.mean(a == b))
    assert np.mean(agree) >= 0.999


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A local Ray that declares 2 GPUs (there are none: placement and device assignment only)."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING", configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # Ray in this process
def test_small_ray_run_gives_every_actor_work(tmp_path, demo_wider, tiny_model_dir, fake_gpu_ray, monkeypatch):
    """One actor is ready only after the other has finished a shard: the other must not take every
    shard meanwhile (a gate: the late actor waits for the other's first shard, no sleep)."""
    out = tmp_path / "out"
    monkeypatch.setenv("BATCHMASK_TEST_START_AFTER", str(tmp_path / "late-marker"))
    s = run(str(demo_wider / "images"), str(out), str(tiny_model_dir), workers=2, batch_size=2, quiet=True,
            runtime="onnx", in_process_max=0)
    info = json.loads((out / "run.json").read_text())
    assert s.ok == 10 and info["plan"]["mode"] == "ray" and info["plan"]["shard_size"] == 3
    assert len(info["actors"]) == 2 and all(a["images"] > 0 for a in info["actors"]), info["actors"]
    assert (tmp_path / "late-marker.go").exists()  # the late actor really waited for the other's shard
    assert all(a["runtime"] == "onnx" and a["device"] == "cpu" and a["threads"] == 1 and a["streams"] == 1
               and a["precision"] == "fp32"
               for a in info["actors"])


@pytest.mark.slow  # Ray in this process
def test_gpu_workers_are_placed_on_their_own_gpus(tmp_path, demo_wider, tiny_model_dir, fake_gpu_ray):
    out = tmp_path / "out"
    s = run(str(demo_wider / "images"), str(out), str(tiny_model_dir), workers=2, quiet=True, gpus_per_worker=1)
    info = json.loads((out / "run.json").read_text())
    assert s.ok == 10 and info["ray"]["gpus_per_actor"] == 1 and info["ray"]["cluster_gpus"] == 2
    devices = sorted(a["device"] for a in info["actors"])
    assert devices == ["gpu:0", "gpu:1"], info["actors"]
    assert sorted(a["cuda_visible_devices"] for a in info["actors"]) == ["0", "1"]
    # no CUDA provider here: "auto" on a GPU worker means Keras (memory growth on)
    assert {a["runtime"] for a in info["actors"]} == {"onnx" if rt.cuda_provider_available() else "keras"}
    with pytest.raises(RunError, match="has 2 GPUs"):
        run(str(demo_wider / "images"), str(tmp_path / "o2"), str(tiny_model_dir), workers=1, quiet=True,
            gpus_per_worker=3)


@pytest.mark.slow  # Ray in this process
def test_fractional_gpu_workers_share_a_card(tmp_path, demo_wider, tiny_model_dir, fake_gpu_ray):
    out = tmp_path / "out"
    run(str(demo_wider / "images"), str(out), str(tiny_model_dir), workers=2, quiet=True, gpus_per_worker=0.5,
        runtime="keras")
    info = json.loads((out / "run.json").read_text())
    assert len(info["actors"]) == 2 and all(a["device"].startswith("gpu:") for a in info["actors"])
    assert all(a["runtime"] == "keras" for a in info["actors"])


def test_job_files_take_runtime_and_gpus(tmp_path):
    from batchmask.jobs.spec import JobError, parse_job

    base = {"name": "n", "schedule": "0 2 * * *", "input": str(tmp_path / "i"), "output": str(tmp_path / "o")}
    job = parse_job({**base, "runtime": "keras", "gpus_per_worker": 0.5})
    assert job.runner_kwargs()["runtime"] == "keras" and job.runner_kwargs()["gpus_per_worker"] == 0.5
    assert parse_job(base).runner_kwargs()["runtime"] == "auto"
    with pytest.raises(JobError, match="runtime"):
        parse_job({**base, "runtime": "tensorrt"})


def test_cli_has_runtime_options():
    from click.testing import CliRunner

    from batchmask.cli import main

    for cmd in ("run", "evaluate"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert "--runtime [auto|keras|onnx]" in res.output
    assert "--gpus-per-worker" in CliRunner().invoke(main, ["run", "--help"]).output


def test_default_model_dir_has_no_onnx_file():
    """The ONNX file is made from the shipped model on first use, not shipped (no second copy to drift)."""
    assert not (default_model_dir() / rt.ONNX_FILE).exists()


def test_evaluate_with_each_runtime_scores_the_same(demo_wider, tiny_model_dir):
    from batchmask.evaluation import evaluate

    res = {r: evaluate(str(tiny_model_dir), str(demo_wider), runtime=r, limit=4) for r in ("keras", "onnx")}
    assert res["keras"].info["runtime"] == "keras" and res["onnx"].info["runtime"] == "onnx"
    for key in ("dice", "iou", "soft_dice_global"):
        assert res["onnx"].metrics[key] == pytest.approx(res["keras"].metrics[key], abs=1e-3), key
