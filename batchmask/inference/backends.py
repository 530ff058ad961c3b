"""Which engine runs the network: Keras (TensorFlow/JAX) or ONNX Runtime.

``batchmask run`` and ``evaluate`` take ``--runtime auto|keras|onnx``. ``auto`` uses ONNX
Runtime on CPU when it is installed (2-2.5x faster than Keras' ``predict_on_batch`` for the
default model, same masks; docs/benchmarks.md), and on a GPU when onnxruntime's CUDA provider
is there; else Keras.

The ONNX file is made once per model file, never per run: Keras' own ``model.export(...,
format="onnx")`` (tf2onnx under TensorFlow), checked against Keras on a few inputs, and kept
in a cache keyed by the SHA-256 of ``model.keras`` (``$BATCHMASK_CACHE_DIR``, else
``$XDG_CACHE_HOME/batchmask`` or ``~/.cache/batchmask``), so cron runs only hash the file. A
model that cannot be exported (or whose export disagrees with Keras) is run with Keras, with
one warning line. Nothing here needs the network: the shipped model exports offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI reads RUNTIMES at start-up
    import numpy as np

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "keras", "onnx")
#: A model directory's Keras network (:mod:`batchmask.inference`), and its ONNX export in the cache.
MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
CACHE_ENV = "BATCHMASK_CACHE_DIR"
#: Largest |p_onnx - p_keras| accepted when an export is checked (probabilities are 0..1).
PARITY_TOL = 1e-3
#: Inputs the export is checked on: random pixels plus a flat grey image, this many in a batch.
PARITY_INPUTS = 3


class RuntimeUnavailableError(RuntimeError):
    """``--runtime onnx`` was asked for but onnxruntime is not installed."""


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def onnxruntime_version() -> str | None:
    """The installed onnxruntime distribution and version, from metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def cuda_provider_available() -> bool:
    if not onnxruntime_installed():
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnx" and not onnxruntime_installed():
        raise RuntimeUnavailableError("--runtime onnx needs the onnxruntime package (pip install onnxruntime)")
    return runtime


def wants_onnx(runtime: str, gpu: bool = False) -> bool:
    """Whether ``runtime`` means ONNX Runtime on this machine (CPU, or GPU with the CUDA provider)."""
    check_runtime(runtime)
    if runtime == "keras" or not onnxruntime_installed():
        return False
    return runtime == "onnx" or not gpu or cuda_provider_available()


# ---------------------------------------------------------------------------- the cached export
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchmask"


def cached_onnx(model_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The ONNX file for ``model_dir/model.keras`` and its export record, exporting it if needed.

    A cache entry is used only when the ``.onnx`` file's own SHA-256 is the one its record
    wrote at export time (a truncated file, or another model's file copied over it, is exported
    again, with one warning naming the file). Returns None (after one warning) when the model
    cannot be exported or the export does not match Keras; the caller then uses Keras.
    """
    keras_file = Path(model_dir) / MODEL_FILE
    sha = file_sha256(keras_file)
    d = cache_dir() / "onnx"
    path, record_path = d / f"{sha}.onnx", d / f"{sha}.json"
    if path.is_file() and record_path.is_file():
        problem = _cache_entry_problem(path, record_path)
        if problem is None:
            return path, {**json.loads(record_path.read_text()), "cached": True}
        log.warning("the cached ONNX file %s %s; exporting %s again", path, problem, keras_file)
    try:
        record = export_onnx(keras_file, path)
    except Exception as exc:  # noqa: BLE001 - any failure means "use Keras", said once
        log.warning("cannot run %s with ONNX Runtime (%s: %s); using Keras", keras_file,
                    type(exc).__name__, str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "")
        return None
    record["keras_sha256"] = sha
    tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, record_path)
    return path, {**record, "cached": False}


def _cache_entry_problem(path: Path, record_path: Path) -> str | None:
    """Why a cache entry cannot be used (damaged record, no hash, hash mismatch), or None."""
    try:
        want = json.loads(record_path.read_text()).get("onnx_sha256")
    except (ValueError, AttributeError):
        return f"has a damaged record ({record_path.name})"
    if not want:  # written by an older batchmask: no hash to check the file against
        return "has no recorded hash"
    if file_sha256(path) != want:
        return "does not match its recorded hash (damaged, or another model's file)"
    return None


def drop_cached_onnx(path: Path) -> None:
    """Remove a cache entry (its ``.onnx`` and record) that failed to load, so the next use exports again."""
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def export_onnx(keras_file: Path, dest: Path) -> dict[str, Any]:
    """Export with Keras, check parity against Keras, then move into place (atomically)."""
    import keras
    import numpy as np

    t0 = time.time()
    net = keras.saving.load_model(keras_file, compile=False)
    s = int(net.input_shape[1])
    x = parity_inputs(s, int(net.input_shape[3]))
    ref = np.asarray(net.predict_on_batch(x), np.float32)  # also "calls" the model, which export needs
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        net.export(str(tmp), format="onnx", verbose=False)
        sess = make_session(tmp.read_bytes(), threads=0)
        got = run_session(sess, x)
        diff = float(np.max(np.abs(got - ref)))
        if not diff <= PARITY_TOL:
            raise ValueError(f"the ONNX export differs from Keras by up to {diff:.2g} (> {PARITY_TOL:g})")
        onnx_sha = file_sha256(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"export_s": round(time.time() - t0, 2), "parity_max_abs_diff": diff, "parity_inputs": len(x),
              "onnx_sha256": onnx_sha,
              "keras_version": keras.__version__, "keras_backend": keras.backend.backend(),
              "onnxruntime": onnxruntime_version()}
    log.info("exported %s to ONNX in %.1f s (max |p_onnx - p_keras| = %.2g); cached as %s",
             keras_file, record["export_s"], diff, dest)
    return record


def parity_inputs(size: int, channels: int = 3) -> np.ndarray:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (PARITY_INPUTS, size, size, channels)).astype(np.float32)
    x[-1] = 128.0
    return x


def cached_onnx_session(model_dir: str | os.PathLike, threads: int, gpu: bool = False):
    """(session, export record) for the model's cached ONNX file, or None: use Keras.

    A cache file that ONNX Runtime cannot load is dropped and exported once more (one warning
    naming the file); if that fails too, the caller uses Keras (one more warning).
    """
    for attempt in (1, 2):
        found = cached_onnx(model_dir)
        if found is None:
            return None
        path, record = found
        try:
            return make_session(str(path), threads, gpu), record
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:200]}"
            drop_cached_onnx(path)
            if attempt == 2:
                log.warning("cannot load the ONNX file %s (%s); using Keras", path, why)
                return None
            log.warning("cannot load the cached ONNX file %s (%s); exporting again", path, why)
    return None


# ---------------------------------------------------------------------------- sessions
def make_session(model: bytes | str, threads: int, gpu: bool = False):
    """An ONNX Runtime session using ``threads`` intra-op threads (0: onnxruntime's default).

    With ``gpu`` and the CUDA provider installed, the session runs on CUDA device 0 (the one
    Ray made visible to the actor), with the CPU provider for anything CUDA cannot run.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No busy-waiting between ops: ONNX Runtime's spinning threads took the CPU the run's decode and
    # PNG threads need (in-process int8, 2 cores: 7-8 -> 12-14 images/s end to end; docs/benchmarks.md)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
    return ort.InferenceSession(model, so, providers=providers)


def run_session(sess, x: np.ndarray) -> np.ndarray:
    import numpy as np

    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.ascontiguousarray(x, np.float32)})[0], np.float32)


def set_keras_gpu_memory_growth() -> None:
    """Let several fractional-GPU actors share a card: TF allocates as needed, JAX does not preallocate."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    try:
        import tensorflow as tf

        for dev in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(dev, True)
    except (ImportError, RuntimeError, ValueError):  # no TF, or TF already placed tensors
        pass
