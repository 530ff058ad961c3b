"""Check a model directory in the driver before a run writes anything or starts Ray.

Without this, a truncated ``model.keras``, a garbage or empty ``model.json`` or a network whose
input size disagrees with ``model.json`` was found only when every Ray worker failed to load it,
after ``coverage.csv`` and ``run.json`` had been written. The check reads the files only (no
TensorFlow import, so an already-done folder still finishes in a second or two): ``model.json``
parses and names a valid configuration; ``model.keras`` is an intact zip (every member's CRC)
holding ``config.json`` and HDF5 weights whose every object can be visited and read (a zip's CRCs
cover the bytes as zipped: a weights file damaged before zipping passes them), and its input
layer has the size ``model.json`` says.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..inference import FORMAT_VERSION, META_FILE, MODEL_FILE, ModelNotFoundError
from .options import RunError
from .storage import Storage

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class BadModelError(ModelNotFoundError):
    """A model directory whose files are present but unusable (one line: the file and what is wrong)."""


def check_model(model_dir: str | Path) -> dict[str, Any]:
    """Return the parsed ``model.json`` of ``model_dir``; raise :class:`BadModelError` if unusable."""
    d = Path(model_dir)
    meta_path, keras_path = d / META_FILE, d / MODEL_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadModelError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "image_size" not in meta["model"]:
        raise BadModelError(f"{meta_path}: no model configuration ('model' with 'image_size'); "
                            "is this a model.json written by `batchmask train`?")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BadModelError(f"{meta_path}: model format {version!r} is not one this batchmask understands")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        cfg.validate()
        size = int(cfg.image_size)
    except (TypeError, ValueError) as exc:
        raise BadModelError(f"{meta_path}: invalid model configuration ({exc})") from None
    try:
        with zipfile.ZipFile(keras_path) as z:
            names = set(z.namelist())
            missing = {"config.json", "model.weights.h5"} - names
            if missing:
                raise BadModelError(f"{keras_path}: not a Keras 3 model archive (no {', '.join(sorted(missing))})")
            bad = z.testzip()
            if bad is not None:
                raise BadModelError(f"{keras_path}: corrupt ({bad} fails its checksum); copy or train it again")
            weights = z.read("model.weights.h5")
            if not weights.startswith(HDF5_SIGNATURE):
                raise BadModelError(f"{keras_path}: model.weights.h5 is not an HDF5 file")
            _check_weights(weights, keras_path)
            del weights
            config = json.loads(z.read("config.json"))
    except BadModelError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:  # truncated, not a zip, bad JSON
        raise BadModelError(f"{keras_path}: not a readable Keras archive, truncated or corrupt "
                            f"({type(exc).__name__}: {exc})") from None
    shape = _input_shape(config)
    if shape is not None and tuple(shape[1:3]) not in ((size, size), (None, None)):
        raise BadModelError(f"{keras_path}: the network's input is {shape[1]}x{shape[2]} but {meta_path} says "
                            f"image_size {size}; they belong to different models")
    return meta


def _check_weights(data: bytes, keras_path: Path) -> None:
    """Visit every group and read every dataset of the HDF5 weights (milliseconds: a few MB)."""
    import h5py

    def read(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            obj[()]

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            f.visititems(read)
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, RuntimeError, KeyError, ValueError...
        why = re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", str(exc))  # no per-run addresses
        raise BadModelError(f"{keras_path}: model.weights.h5 inside it is damaged ({why}); "
                            "copy or train it again") from None


def _input_shape(config: Any) -> list | None:
    """``batch_shape`` of the first InputLayer in a Keras 3 ``config.json`` (None if not found)."""
    try:
        for layer in config["config"]["layers"]:
            if layer.get("class_name") == "InputLayer":
                shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
                return list(shape) if shape and len(shape) == 4 else None
    except (KeyError, TypeError, AttributeError):
        return None
    return None


def check_same_model(out: Storage, model_dir: Path, overwrite: bool) -> str:
    """The sha256 of this run's ``model.keras``; RunError if the output holds masks and its last
    run (run.json) used another model, unless ``overwrite``: one output, one model's masks."""
    from ..runtime import file_sha256

    sha = file_sha256(model_dir / MODEL_FILE)
    try:
        prev = json.loads(out.read_bytes("run.json")).get("model") or {}
    except (FileNotFoundError, ValueError, AttributeError):
        return sha
    old = prev.get("sha256") if isinstance(prev, dict) else None
    if old and old != sha and not overwrite and next(iter(out.iter_files("masks/")), None) is not None:
        raise RunError(f"{out.spec.public()['url']} holds masks of another model ({prev.get('path')}, sha256 "
                       f"{old[:12]}); this run's model {model_dir} is sha256 {sha[:12]}. Pass --overwrite to "
                       "redo every image with this model, or use another --output")
    return sha
