"""Using a model's int8 ONNX file: the precisions, the file's name and its hash check.

How the file is made (calibration, quantization, the check against fp32) is
:mod:`batchmask.inference.quantize`; this module is what loading needs, and imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "fp32", "int8")
#: ``auto`` picks int8 only when its recorded validation Dice is at most this much below fp32's.
MAX_INT8_LOSS = 0.003
INT8_FILE = "model.int8.onnx"
#: model.json's key for the int8 file's record.
META_KEY = "int8"


log = logging.getLogger(__name__)


class QuantizationError(ValueError):
    """An int8 file cannot be made or used as asked (no data, no file, wrong hash)."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def int8_path(model_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """The model's checked int8 file; :class:`QuantizationError` saying how to make one if absent or altered."""
    from .backends import file_sha256

    path = Path(model_dir) / INT8_FILE
    rec = meta.get(META_KEY) or {}
    if not path.is_file() or not rec.get("sha256"):
        raise QuantizationError(
            f"{model_dir}: no int8 file ({INT8_FILE} with its record in model.json); make one with "
            f"`batchmask export {model_dir} --format onnx-int8 -o {path}`")
    if rec.get("keras_sha256") != file_sha256(Path(model_dir) / "model.keras"):
        raise QuantizationError(f"{path}: made from another model.keras than {model_dir}'s (the model was replaced); "
                                f"make it again with `batchmask export {model_dir} --format onnx-int8 -o {path}`")
    if file_sha256(path) != rec["sha256"]:
        raise QuantizationError(f"{path}: does not match the SHA-256 in model.json (damaged or replaced); "
                                f"make it again with `batchmask export {model_dir} --format onnx-int8 -o {path}`")
    return path


def auto_precision(model_dir: str | os.PathLike, meta: dict[str, Any], onnx_on_cpu: bool) -> str:
    """What ``precision="auto"`` means for this model: "int8" when ONNX Runtime runs on the CPU and
    the model has an intact int8 file whose recorded validation Dice is within :data:`MAX_INT8_LOSS`
    of fp32's; else "fp32" (with one warning when the file exists but cannot be used)."""
    rec = meta.get(META_KEY) or {}
    diff = (rec.get("validation") or {}).get("dice_diff")
    if not onnx_on_cpu or diff is None or -diff > MAX_INT8_LOSS:
        return "fp32"
    try:
        int8_path(model_dir, meta)
    except QuantizationError as exc:
        log.warning("%s; using fp32", exc)
        return "fp32"
    return "int8"
