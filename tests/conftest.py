"""Shared fixtures. Tests run offline: models use random weights (``backbone_weights=None``).

Tiers: ``pytest -q`` runs the fast tier (pyproject's ``addopts = -m 'not slow'``), ``pytest -q -m
slow`` the rest (Ray clusters, CLI subprocesses that start Ray, the S3 server, trainings).
``BATCHMASK_REQUIRE_ALL=1`` (set by ``.ci/run``) turns every "tool missing" skip into a failure:
see :func:`need`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# ONNX exports made by tests (run/evaluate default to --runtime auto) never go to ~/.cache.
# (not "batchmask-test...": that is the S3 test key, which tests look for in what runs write)
os.environ.setdefault("BATCHMASK_CACHE_DIR", tempfile.mkdtemp(prefix="bm-onnx-cache-"))

REPO = Path(__file__).resolve().parents[1]
DEMO_WIDER = REPO / "demo" / "wider"
VENV_BIN = Path(sys.executable).parent
#: "1": a missing tool (weed, ray, chromium) fails its test instead of skipping it (CI).
REQUIRE_ALL = os.environ.get("BATCHMASK_REQUIRE_ALL", "") not in ("", "0")


def need(ok: object, reason: str) -> None:
    """Skip the test with ``reason`` when ``ok`` is false, or fail it under ``BATCHMASK_REQUIRE_ALL=1``.

    For tools the suite needs (a binary, a browser); data that a fresh machine cannot have (the
    ImageNet weights in ../shared) is a plain ``pytest.skip`` with its reason instead.
    """
    if ok:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (BATCHMASK_REQUIRE_ALL=1: a missing tool is a failure)", pytrace=False)
    pytest.skip(reason)


def find_shared(start: Path = REPO) -> Path | None:
    """The project's ``shared`` folder: ``$BATCHMASK_SHARED``, else the first ``shared/`` beside
    the checkout or one of its parents (a worktree or clone may sit a level or two deeper)."""
    env = os.environ.get("BATCHMASK_SHARED")
    if env:
        return Path(env)
    for d in (start, *start.parents):
        if (d / "shared").is_dir():
            return d / "shared"
    return None


SHARED = find_shared()
SHARED_WEIGHTS = (SHARED / "weights") if SHARED else None


def report_browser() -> str | None:
    """The browser ``scripts/render_report.sh`` would use (its own lookup, via ``--which``), or None."""
    res = subprocess.run(["bash", str(REPO / "scripts" / "render_report.sh"), "--which"], capture_output=True,
                         text=True)
    return (res.stdout.strip() or None) if res.returncode == 0 else None


@contextlib.contextmanager
def output_lock_held(out: Path, seconds: int = 120):
    """Another process holding ``out``'s output lock (as a second run would), until the block ends;
    yields the holder process (its pid is what lock messages name)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from batchmask.batch.storage import StorageSpec\n"
        "from batchmask.batch.lock import OutputLock\n"
        f"lock = OutputLock(StorageSpec({str(out)!r}).open()).acquire()\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def wait_until(check, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.05):
    """Poll ``check()`` until it returns something true, and return it.

    No deadline of its own (pytest-timeout bounds a hung test): a gate that is never reached is
    a failure only when ``proc`` has exited first, which is reported with its output.
    """
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out = proc.communicate()[0] if proc.stdout else ""
            pytest.fail(f"process exited {proc.returncode} before {what}:\n{(out or '')[-3000:]}")
        time.sleep(poll_s)


def synthetic_wider(root: Path, events: dict[str, int], split: str = "val") -> Path:
    """A WIDER folder with ``events[name]`` 32x32 images each, one box per image."""
    import numpy as np
    from PIL import Image

    from batchmask.convert import write_wider_annotations

    entries = []
    for event, n in events.items():
        (root / "images" / event).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{event}/{event}_{i}.jpg"
            Image.new("RGB", (32, 32), (i * 7 % 255, 90, 160)).save(root / "images" / name)
            entries.append((name, np.array([[2 + i % 5, 3, 20, 24]], np.float32)))
    write_wider_annotations(entries, root / f"wider_face_{split}_bbx_gt.txt")
    return root


@pytest.fixture
def leftovers():
    """Whatever a test registers here is cleaned up even when it fails midway: gate files are
    created (no worker stays held) and processes still alive get SIGTERM (``jobs run`` then stops
    its run's process group), then SIGKILL. ``leftovers.gates`` and ``leftovers.procs`` are lists."""

    class Leftovers:
        gates: list[Path]
        procs: list[subprocess.Popen]

    lo = Leftovers()
    lo.gates, lo.procs = [], []
    yield lo
    for g in lo.gates:
        Path(g).touch()
    for p in lo.procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def demo_wider() -> Path:
    """The 10 WIDER FACE images shipped in demo/wider (native WIDER layout)."""
    return DEMO_WIDER


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small untrained model directory (alpha 0.25, 64x64, random weights).

    Its predictions are meaningless but deterministic: enough for I/O, plumbing and
    round-trip tests.
    """
    import keras

    from batchmask.config import ModelConfig
    from batchmask.inference import base_meta, save_model
    from batchmask.model import build_unet

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(alpha=0.25, image_size=64, decoder_filters=(32, 16, 16, 8, 8))
    net = build_unet(cfg, backbone_weights=None)
    out = tmp_path_factory.mktemp("tiny_model")
    meta = base_meta(cfg)
    meta["note"] = "untrained test model"
    save_model(net, out, meta)
    return out


def save_bright_model(out: Path, image_size: int = 64) -> Path:
    """A three-convolution model whose face probability is its input's local brightness:
    ``sigmoid(0.1 * (mean of the 3x3 neighbourhood's RGB - 128))``, so bright areas are "faces".

    Unlike the untrained U-Net it has a spatial signal a test can check: a mask that is
    flipped, transposed, shifted or wrongly rotated against its image no longer follows the
    image's bright areas. Runs in Keras, exports to ONNX and quantizes like the real network.
    """
    import keras
    import numpy as np

    from batchmask.config import ModelConfig
    from batchmask.inference import base_meta, save_model

    s = image_size
    x = keras.Input((s, s, 3), name="image")
    a = keras.layers.Conv2D(4, 3, padding="same", name="local_mean")(x)
    b = keras.layers.Conv2D(4, 1, name="mix")(a)
    c = keras.layers.Conv2D(1, 1, name="head")(b)
    net = keras.Model(x, keras.layers.Activation("sigmoid", name="mask")(c), name="bright")
    net.get_layer("local_mean").set_weights([np.full((3, 3, 3, 4), 1 / 27, np.float32), np.zeros(4, np.float32)])
    net.get_layer("mix").set_weights([np.eye(4, dtype=np.float32)[None, None], np.zeros(4, np.float32)])
    net.get_layer("head").set_weights([np.full((1, 1, 4, 1), 0.025, np.float32), np.array([-12.8], np.float32)])
    meta = base_meta(ModelConfig(alpha=0.25, image_size=s, decoder_filters=(32, 16, 16, 8, 8), threshold=0.5))
    meta["note"] = "test model: face probability = local brightness (tests/conftest.py save_bright_model)"
    return save_model(net, out, meta)


@pytest.fixture(scope="session")
def bright_model_dir(tmp_path_factory) -> Path:
    """:func:`save_bright_model`, 64x64 input, threshold 0.5 (brightness 128)."""
    return save_bright_model(tmp_path_factory.mktemp("bright_model"))


@pytest.fixture(scope="session")
def bright_int8_model(tmp_path_factory, bright_model_dir) -> Path:
    """A copy of the brightness model with its int8 file, made as a user would: ``export`` to
    ``model.int8.onnx`` with no ``--data``, i.e. calibrated on the training source its model.json
    records (a synthetic WIDER folder of 12 noisy images) minus its 4 recorded validation images,
    then checked against fp32 on those 4."""
    import json

    import numpy as np
    from PIL import Image

    from batchmask.convert import write_wider_annotations
    from batchmask.inference.quantize import INT8_FILE, export_model

    d = tmp_path_factory.mktemp("bright_int8")
    model = Path(shutil.copytree(bright_model_dir, d / "m"))
    rng = np.random.default_rng(5)
    entries = []
    for i in range(12):
        name = f"1--Event/e_{i}.jpg"
        (d / "data" / "images" / "1--Event").mkdir(parents=True, exist_ok=True)
        smooth = np.kron(rng.uniform(0, 255, (6, 8, 3)), np.ones((8, 8, 1)))  # 48x64, blocks of 8
        Image.fromarray(np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)).save(
            d / "data" / "images" / name, quality=95)
        entries.append((name, np.array([[4, 4, 20, 20]], np.float32)))
    write_wider_annotations(entries, d / "data" / "wider_face_train_bbx_gt.txt")
    meta = json.loads((model / "model.json").read_text())
    meta["data"] = {"sources": [{"path": str(d / "data")}],
                    "split": {"val_names": [n for n, _ in entries[:4]]}}
    (model / "model.json").write_text(json.dumps(meta))
    export_model(model, "onnx-int8", model / INT8_FILE)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``tiny_model_dir`` loaded once (Keras): for tests that only read it (predict, meta, variant)."""
    from batchmask.inference import load_model

    return load_model(tiny_model_dir)


@dataclass
class TrainedModel:
    out: Path  # the model directory (read-only for tests)
    args: list[str]  # the `batchmask train` arguments that made it
    pool: Path  # the second data source (synthetic WIDER, WIDER's *val* annotation file)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, demo_wider) -> TrainedModel:
    """One model trained by the real CLI, shared by every test that needs "a trained model" (the
    CLI end-to-end test, the training-output tests): two sources (the demo images and a synthetic
    pool), a stratified split seeded 7, 64 px input trained on 32 px crops with per-image Dice,
    alpha 0.25, lean4 decoder, small faces weighted up (--small-face-weight 3: the weighted loss and
    metrics end to end), 4 epochs of which 1 decoder-only, no early stopping (--patience 0)."""
    from click.testing import CliRunner

    from batchmask.cli import main

    d = tmp_path_factory.mktemp("trained")
    out = d / "m"
    pool = synthetic_wider(d / "pool", {"0--Parade": 2, "7--Cheering": 3})
    args = ["train", "--data", str(demo_wider), "--data", str(pool), "--split", "stratified", "--seed", "7",
            "--out", str(out), "--backbone-weights", "none", "--image-size", "64", "--decoder", "lean4",
            "--crop-scale", "0.4", "--alpha", "0.25", "--epochs", "4", "--warmup-epochs", "1", "--patience", "0",
            "--batch-size", "4", "--crop-size", "32", "--dice-per-image", "--small-face-weight", "3", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Saved" in res.output
    return TrainedModel(out, args, pool)


@dataclass
class RayHead:
    address: str  # GCS "ip:port": `batchmask run --address`, ray.init(address=)
    dashboard: str  # "http://127.0.0.1:port": `batchmask jobs submit --address`
    temp_dir: str


def _start_ray_head(ports: list[int], log: Path, locks: Path):
    from ports import StartFailed

    ray = VENV_BIN / "ray"
    temp = tempfile.mkdtemp(prefix="bmrh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr, client = ports
    # The node's address as a driver on this machine detects it (a driver joining a head that
    # calls itself 127.0.0.1 finds no raylet at its own address and fails to connect).
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    cmd = [
        str(ray), "start", "--head", "--block", f"--port={gcs}", f"--node-ip-address={ip}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               TF_CPP_MIN_LOG_LEVEL="3", BATCHMASK_LOCK_DIR=str(locks), RAY_USAGE_STATS_ENABLED="0",
               # `ray start` turns token authentication on (Ray 2.5x), and a driver without the
               # token cannot join: a test head for this machine's own drivers goes without.
               RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120  # start-up only: a head that never answers is retried, then an error
    while True:
        if proc.poll() is not None:
            _stop_ray_head(proc, temp)
            raise StartFailed(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:  # noqa: S310 (loopback)
                if r.status == 200:
                    break
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # answering, with Ray's token authentication on
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop_ray_head(proc, temp)
            raise StartFailed(f"the Ray dashboard did not answer on {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    # The dashboard answers before the node's job agent is there ("No available agent to submit
    # job, please try again later" under load): ready when a no-op job has run.
    from ray.job_submission import JobStatus, JobSubmissionClient

    last = ""
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(url)
            sid = client.submit_job(entrypoint="true")
            while (status := client.get_job_status(sid)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                   JobStatus.STOPPED):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if status == JobStatus.SUCCEEDED:
                return proc, RayHead(f"{ip}:{gcs}", url, temp)
            last = f"no-op job {status}"
        except Exception as exc:  # noqa: BLE001 - not ready yet: try again until the deadline
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    _stop_ray_head(proc, temp)
    raise StartFailed(f"the Ray head could not run a job ({last}):\n{log.read_text()[-3000:]}")


def _stop_ray_head(proc: subprocess.Popen, temp: str) -> None:
    # `ray start --block` stops the processes it started on SIGTERM; then the group goes
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> RayHead:
    """One Ray head (2 CPUs, dashboard on loopback, its own ports and temp dir) for the whole
    session, ready when it has run a no-op job: ``jobs submit`` uses its dashboard, a driver on
    this machine can join it with ``address``. Stopped by process group, not `ray stop` (which would
    stop every Ray on the machine). Tests that join it must leave it as they found it."""
    from ports import start_with_free_ports

    need((VENV_BIN / "ray").exists(), "the `ray` command is not installed next to this Python")
    locks = tmp_path_factory.mktemp("ray-head-locks")
    log = tmp_path_factory.mktemp("raylog") / "ray-start.log"
    proc, head = start_with_free_ports(lambda ports: _start_ray_head(ports, log, locks), 9)
    try:
        yield head
    finally:
        _stop_ray_head(proc, head.temp_dir)


from s3server import s3_server  # noqa: E402,F401  (SeaweedFS fixture, tests/s3server.py)
from stores import azurite, gcs_server, http_server  # noqa: E402,F401  (GCS, Azure, HTTP: tests/stores.py)
