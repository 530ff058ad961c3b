"""Loading a trained model directory and predicting face masks.

A model directory holds ``model.keras`` (the network) and ``model.json`` (how to use it:
input size, threshold, preprocessing, provenance and metrics; see docs/design.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from .backends import MODEL_FILE  # the Keras network's file name (exported to ONNX there)
from .pixels import resize_rgb, upsample_probs

log = logging.getLogger(__name__)

META_FILE = "model.json"
FORMAT_VERSION = 1


class ModelNotFoundError(FileNotFoundError):
    """A model directory is missing or incomplete."""


def default_model_dir() -> Path:
    """The model shipped inside the package (trained on WIDER FACE, see README)."""
    return Path(__file__).parent.parent / "default_model"


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    p = Path(path) if path else default_model_dir()
    if p.is_file() and p.name in (MODEL_FILE, META_FILE):
        p = p.parent
    if not (p / MODEL_FILE).is_file() or not (p / META_FILE).is_file():
        what = "the default model" if path is None else str(p)
        raise ModelNotFoundError(
            f"{what}: not a batchmask model directory (needs {MODEL_FILE} and {META_FILE}); "
            "train one with `batchmask train --out DIR` and pass --model DIR"
        )
    return p


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(model_dir) / META_FILE).read_text())


def write_meta(model_dir: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write model.json atomically."""
    path = Path(model_dir) / META_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def base_meta(cfg: ModelConfig) -> dict[str, Any]:
    """The part of model.json every model has: format, versions and how to use it."""
    import keras

    from ..version import __version__

    return {
        "format_version": FORMAT_VERSION,
        "batchmask_version": __version__,
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "model": cfg.to_dict(),
        "preprocessing": {
            "color": "RGB, EXIF orientation applied, alpha dropped, grayscale replicated",
            "resize": f"whole image stretched to {cfg.image_size}x{cfg.image_size}, bilinear",
            "input_range": "0..255 float32; the network rescales to -1..1 itself",
            "output": "sigmoid face probability, resized bilinearly to the original size, then >= threshold",
        },
    }


def save_model(net, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model.keras`` and ``model.json`` into ``out_dir`` (each replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp.{os.getpid()}.{MODEL_FILE}"
    net.save(tmp)
    os.replace(tmp, out / MODEL_FILE)
    write_meta(out, meta)
    return out


class FaceMaskModel:
    """A trained network plus the metadata needed to use it."""

    def __init__(self, keras_model, meta: dict[str, Any], path: Path | None = None, session=None):
        """``session``: an ONNX Runtime session of the same network, used instead of ``keras_model``."""
        self.keras_model = keras_model
        self.session = session
        self.meta = meta
        self.path = path
        self.config = ModelConfig.from_dict(meta.get("model", {}))
        #: "onnx" or "keras": what predicts, for run.json and evaluation results.
        self.runtime = "onnx" if session is not None else "keras"
        #: "fp32", or "int8" for the model's quantized ONNX file (batchmask.quantize).
        self.precision = "fp32"
        self.runtime_info: dict[str, Any] = {}

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if self.session is not None:
            from .backends import run_session

            return run_session(self.session, x)[..., 0]
        return np.asarray(self.keras_model.predict_on_batch(x), np.float32)[..., 0]

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Resize an HxWx3 uint8 image to the network's square input (the whole image)."""
        return resize_rgb(image, self.image_size, self.image_size)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (n, S, S) for a batch of preprocessed images (n, S, S, 3), 0..255."""
        x = np.asarray(batch, np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected a batch of shape (n, {self.image_size}, {self.image_size}, 3), got {x.shape}")
        p = self._forward(x)
        if self.config.tta_flip:
            pf = self._forward(x[:, :, ::-1])
            p = 0.5 * (p + pf[:, :, ::-1])
        return p

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Face probability maps at each image's original size."""
        out: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            probs = self.predict_batch(np.stack([self.preprocess(im) for im in chunk]))
            out += [upsample_probs(p, im.shape[1], im.shape[0]) for p, im in zip(probs, chunk, strict=True)]
        return out

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Boolean face masks at each image's original size (probability >= threshold)."""
        return [p >= self.threshold for p in self.predict_proba(images, batch_size)]

    def variant(self, image_size: int | None = None, tta_flip: bool | None = None,
                threshold: float | None = None) -> FaceMaskModel:
        """The same weights at another input size / test-time flip / threshold (not saved).

        The network is fully convolutional, so it runs at any multiple of 32; how well it does
        away from the size it was trained for is for ``scripts/size_sweep.py`` to measure.
        """
        from ..model import build_unet

        cfg = dataclasses.replace(
            self.config,
            image_size=self.config.image_size if image_size is None else image_size,
            tta_flip=self.config.tta_flip if tta_flip is None else tta_flip,
            threshold=self.config.threshold if threshold is None else threshold,
        )
        cfg.validate()
        net = self.keras_model
        if self.session is not None:
            if cfg.image_size != self.config.image_size:
                raise ValueError("an ONNX Runtime model runs at its exported size only; load it with runtime='keras'")
            m = FaceMaskModel(None, {**self.meta, "model": cfg.to_dict()}, None, self.session)
            m.precision = self.precision
            return m
        if cfg.image_size != self.config.image_size:
            net = build_unet(cfg, backbone_weights=None)
            net.set_weights(self.keras_model.get_weights())
        meta = {**self.meta, "model": cfg.to_dict()}
        return FaceMaskModel(net, meta, None)


def load_model(path: str | os.PathLike | None = None, runtime: str = "keras", threads: int = 0,
               precision: str = "fp32") -> FaceMaskModel:
    """Load a model directory (default: the model shipped with the package).

    ``runtime``: "keras", "onnx" or "auto" (ONNX Runtime when installed; see
    :mod:`batchmask.runtime`). A model that cannot be exported to ONNX loads with Keras.
    ``threads``: ONNX Runtime intra-op threads (0: its default, all cores).
    ``precision``: "fp32", "int8" for the directory's checked ``model.int8.onnx`` (ONNX
    Runtime only; see :mod:`batchmask.inference.int8`), or "auto": int8 when ONNX Runtime runs
    on the CPU and the file's recorded validation Dice loss is within 0.003, else fp32.
    """
    from .backends import cached_onnx_session, wants_onnx

    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ModelNotFoundError(
            f"{model_dir}: model format {meta['format_version']} is newer than this batchmask understands"
        )
    if precision_of(runtime, precision) == "auto":
        from .int8 import auto_precision

        precision = auto_precision(model_dir, meta, wants_onnx(runtime))
    if precision == "int8":
        from .backends import make_session
        from .int8 import META_KEY, int8_path

        m = FaceMaskModel(None, meta, model_dir, make_session(str(int8_path(model_dir, meta)), threads))
        m.precision = "int8"
        m.runtime_info = {k: v for k, v in meta[META_KEY].items() if k in ("sha256", "calibration", "validation")}
        return m
    if wants_onnx(runtime):
        found = cached_onnx_session(model_dir, threads)
        if found is not None:
            m = FaceMaskModel(None, meta, model_dir, found[0])
            m.runtime_info = found[1]
            return m
    import keras  # deferred: importing Keras starts the backend

    net = keras.saving.load_model(model_dir / MODEL_FILE, compile=False)
    return FaceMaskModel(net, meta, model_dir)


def precision_of(runtime: str, precision: str) -> str:
    """Check a runtime/precision pair: int8 runs with ONNX Runtime only (never silently as fp32)."""
    from .backends import RuntimeUnavailableError, check_runtime, onnxruntime_installed
    from .int8 import check_precision

    check_runtime(runtime)
    if check_precision(precision) == "int8":
        if runtime == "keras":
            raise ValueError("--precision int8 runs with ONNX Runtime; it cannot be combined with --runtime keras")
        if not onnxruntime_installed():
            raise RuntimeUnavailableError("--precision int8 needs the onnxruntime package (pip install onnxruntime)")
    return precision


def predict(images: Sequence[np.ndarray], model: FaceMaskModel | str | os.PathLike | None = None,
            runtime: str = "keras") -> list[np.ndarray]:
    """Boolean face masks for RGB uint8 images, with ``model`` (default: the shipped model)."""
    m = model if isinstance(model, FaceMaskModel) else load_model(model, runtime=runtime)
    return m.predict(images)
