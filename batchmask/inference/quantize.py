"""int8 ONNX files: static quantization with ONNX Runtime, calibrated on real images.

``batchmask export MODEL --format onnx-int8`` and ``scripts/ship_int8.py`` use this. The int8
file is ONNX Runtime's QDQ format (``quantize_static``): weights int8 per output channel,
activations uint8 with ranges from calibration images decoded exactly as ``batchmask run``
decodes them (:func:`batchmask.inference.pixels.decode_for_model`). Every convolution is
quantized but the last: the logits, their upsampling and the sigmoid stay float, and the logits
get the shift (fitted on the calibration images) that makes int8's masks closest to fp32's,
undoing the signed error the quantized layers accumulate (docs/design.md; on the default model
the loss went from 0.0039 to 0.0027 Dice, docs/benchmarks.md).

A model directory may hold its int8 file as ``model.int8.onnx``; ``model.json``'s ``int8``
record then gives its SHA-256 (checked before use), how it was calibrated, and its validation
Dice next to fp32's. ``--precision int8`` uses that file and never quantizes at run time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .int8 import INT8_FILE, META_KEY, PRECISIONS, QuantizationError, check_precision, int8_path  # noqa: F401

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class QuantSettings:
    """How an int8 file is made (recorded in model.json's ``int8.calibration``)."""

    #: Calibration images (chosen evenly, seeded, from the data given). 200 rather than 64: the
    #: output shift fitted on 64 images came out half as large and noisier (docs/benchmarks.md).
    images: int = 200
    #: "minmax", "entropy" or "percentile" (ONNX Runtime's CalibrationMethod).
    method: str = "minmax"
    #: Keep the first convolution (and the last) in float (measured on the default model: no Dice
    #: gain, so off by default; docs/benchmarks.md).
    float_ends: bool = False
    #: Keep the last convolution (the logits) and everything after it (upsampling, sigmoid) in
    #: float: quantized, the probabilities took ~50 values, 0.9 logit apart near the threshold.
    float_output: bool = True
    #: With ``float_output``: add to the logits the shift that makes int8's masks agree best with
    #: fp32's on the calibration images (int8's logits ran ~0.6 low near the threshold).
    fit_output_shift: bool = True
    #: Further nodes kept in float, by name (found with ``scripts/int8_sweep.py --debug``).
    float_nodes: tuple[str, ...] = ()
    per_channel: bool = True
    #: Percentile of |activation| kept, with ``method="percentile"``.
    percentile: float = 99.999
    #: Activation ranges symmetric around 0 (ONNX Runtime's ``CalibTensorRangeSymmetric``).
    symmetric_ranges: bool = False
    #: 7-bit weights (ONNX Runtime's ``reduce_range``, for CPUs without VNNI).
    reduce_range: bool = False
    seed: int = 0


# ---------------------------------------------------------------------------- calibration images
def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def calibration_names(sources: Sequence[str | os.PathLike], exclude: set[str]) -> list[tuple[str, Any]]:
    """(name, path or pixels) of every image in ``sources`` (annotated datasets, or plain image
    folders) whose name is not in ``exclude`` (the model's validation images)."""
    from ..data import DataError
    from ..sources import load_datasets

    out: list[tuple[str, Any]] = []
    for src in sources:
        try:
            samples, _ = load_datasets([src])
            out += [(s.name, s.path if s.path else s.image) for s in samples]
        except DataError:
            folder = Path(src)
            if not folder.is_dir():
                raise
            out += [(str(p.relative_to(folder)), p) for p in image_files(folder)]
    return [(n, x) for n, x in out if n not in exclude]


def calibration_inputs(items: list[tuple[str, Any]], size: int, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` images chosen with ``seed``, decoded as ``run`` decodes them: (n, S, S, 3) float32, names."""
    from .pixels import decode_for_model, resize_rgb

    if not items:
        raise QuantizationError("no calibration images (all excluded, or none found)")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(items), size=min(n, len(items)), replace=False))
    xs, names = [], []
    for i in pick:
        name, src = items[int(i)]
        if isinstance(src, np.ndarray):
            x = resize_rgb(src, size, size)
        else:
            x, _, _ = decode_for_model(Path(src).read_bytes(), size, 10**9, str(src))
        xs.append(x)
        names.append(name)
    return np.stack(xs).astype(np.float32), names


# ---------------------------------------------------------------------------- quantization
def float_end_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the first and the last Conv node (the stem and the output head)."""
    import onnx

    convs = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Conv"]
    return [convs[0], convs[-1]] if len(convs) > 1 else convs


def output_nodes(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the last Conv node and of every node after it (the logits' reshape, upsampling, sigmoid)."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node  # topologically sorted
    last = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=len(nodes))
    return [n.name for n in nodes[last:]]


def _logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_output_shift(fp32_path: str | os.PathLike, quant_path: str | os.PathLike, inputs: np.ndarray,
                     threshold: float) -> float:
    """The logit shift (a multiple of 0.05 in -2..2, the smallest of equals) that makes the int8 file's masks
    closest to fp32's on ``inputs`` at ``threshold``, by mean per-image Dice (the validation measure):
    bias correction of the output, for a rounding error that accumulates with a sign."""
    from .backends import make_session, run_session

    def probs(path) -> np.ndarray:
        sess = make_session(str(path), 0)
        return np.concatenate([run_session(sess, inputs[i : i + 8]) for i in range(0, len(inputs), 8)])

    ref = (probs(fp32_path) >= threshold).reshape(len(inputs), -1)
    lq, t = _logits(probs(quant_path)).reshape(len(inputs), -1), float(_logits(np.float32(threshold)))
    keep = ref.any(axis=1)  # images without a face in fp32's mask say nothing about the boundary
    ref, lq, n_ref = ref[keep], lq[keep], ref[keep].sum(axis=1)

    def dice(d: float) -> float:
        m = lq + d >= t
        return float(np.mean(2 * np.count_nonzero(m & ref, axis=1) / (n_ref + m.sum(axis=1))))

    grid = sorted(np.round(np.arange(-2, 2.001, 0.05), 2), key=abs)
    return float(grid[int(np.argmax([dice(d) for d in grid]))]) if len(ref) else 0.0


def shift_output(path: str | os.PathLike, shift: float) -> None:
    """Add ``shift`` to the bias of the file's last Conv (which must be float: ``float_output``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    inits = {t.name: t for t in model.graph.initializer}
    weight = inits.get(conv.input[1])
    if weight is None:
        raise QuantizationError(f"{conv.name}: its weights are quantized; the output shift needs float_output")
    channels = weight.dims[0]
    bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 else np.zeros(channels, np.float32)
    name = f"{conv.name}_bias_shifted"
    model.graph.initializer.append(numpy_helper.from_array((bias + np.float32(shift)).astype(np.float32), name))
    del conv.input[2:]
    conv.input.append(name)
    onnx.save(model, str(path))


def quantize_file(fp32_path: str | os.PathLike, dest: str | os.PathLike, inputs: np.ndarray,
                  settings: QuantSettings = QuantSettings(), threshold: float | None = None) -> dict[str, Any]:
    """Write the int8 (QDQ) version of ``fp32_path`` to ``dest``, calibrated on ``inputs``
    (``threshold``: the model's, needed to fit the output shift)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if settings.method not in methods:
        raise QuantizationError(f"calibration method must be one of {', '.join(methods)}, got {settings.method!r}")

    class Reader(CalibrationDataReader):
        """The calibration images one by one; ``set_range`` lets ONNX Runtime take them in chunks."""

        def __init__(self, name: str) -> None:
            self.name = name
            self.set_range(0, len(inputs))

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.it = iter(inputs[i : i + 1] for i in range(start_index, min(end_index, len(inputs))))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {self.name: x}

    import onnx

    t0 = time.time()
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="batchmask-int8-") as d:
        pre = Path(d, "pre.onnx")
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        exclude = list(dict.fromkeys((float_end_nodes(pre) if settings.float_ends else [])
                                     + (output_nodes(pre) if settings.float_output else []) + list(settings.float_nodes)))
        name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        tmp = Path(d, "int8.onnx")
        # Histogram calibrators keep every activation of the images they are given at once (64 images
        # went past 15 GB): ONNX Runtime's "strided" calibration gives them 8 at a time and merges
        stride = max(k for k in range(1, 9) if len(inputs) % k == 0)
        extra = {"CalibStridedMinMax": stride, "CalibTensorRangeSymmetric": settings.symmetric_ranges,
                 "CalibPercentile": settings.percentile}
        quantize_static(str(pre), str(tmp), Reader(name), quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=methods[settings.method],
                        extra_options=extra)
        shift = None
        if settings.fit_output_shift:
            if not settings.float_output or threshold is None:
                raise QuantizationError("fitting the output shift needs float_output and the model's threshold")
            shift = fit_output_shift(pre, tmp, inputs, threshold)
            shift_output(tmp, shift)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.move(tmp, staged)  # then atomically into place: a reader never sees half a file
        os.replace(staged, dest)
    from .backends import file_sha256, onnxruntime_version

    return {"file": dest.name, "sha256": file_sha256(dest), "bytes": dest.stat().st_size,
            "calibration": {**asdict(settings), "images": len(inputs), "float_nodes": exclude, "output_shift": shift,
                            "format": "QDQ, weights int8 per channel, activations uint8"},
            "onnxruntime": onnxruntime_version(), "quantize_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------- the model directory's file
def write_record(model_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Store the int8 file's record in model.json (the file must be ``model_dir/model.int8.onnx``)."""
    from .model import read_meta, write_meta

    meta = read_meta(model_dir)
    meta[META_KEY] = record
    write_meta(model_dir, meta)


# ---------------------------------------------------------------------------- int8 against fp32
def compare_precisions(fp32, int8, samples: Sequence, batch_size: int = 8) -> dict[str, Any]:
    """Score two loaded models (:class:`~batchmask.inference.FaceMaskModel`) on the same decoded
    inputs: mean per-image Dice of each (at fp32's threshold), their difference, per-image Dice
    lists (for a paired bootstrap), and how many network-resolution mask pixels agree."""
    from ..evaluation import score_models

    (a, b), agree = score_models([fp32, int8], samples, [fp32.threshold], batch_size, desc="fp32 and int8")
    ra, rb = a.rows(0), b.rows(0)
    da, db = a.metrics(0)["dice"], b.metrics(0)["dice"]
    return {"images": len(samples), "dice_fp32": round(da, 5), "dice_int8": round(db, 5),
            "dice_diff": round(db - da, 5), "mask_agreement": round(float(np.mean(agree)), 5),
            "per_image_fp32": [r["dice"] for r in ra], "per_image_int8": [r["dice"] for r in rb]}


# ---------------------------------------------------------------------------- batchmask export
FORMATS = ("onnx", "onnx-int8")


def recorded_sources(meta: dict[str, Any]) -> list[str]:
    """The training data sources model.json records (paths as given to ``train``)."""
    data = meta.get("data") or {}
    return [s["path"] for s in data.get("sources") or [] if s.get("path")] or list(data.get("path") or [])


def export_model(model_dir: str | os.PathLike | None, fmt: str, dest: str | os.PathLike,
                 data: Sequence[str | os.PathLike] = (), settings: QuantSettings = QuantSettings()) -> dict[str, Any]:
    """Write the model's ONNX file (``fmt="onnx"``) or its int8 file (``"onnx-int8"``) to ``dest``.

    fp32: the cached, parity-checked export (:mod:`batchmask.inference.backends`), copied. int8: calibrated
    on ``data`` (default: the training sources recorded in model.json) minus the model's validation
    images, then scored against fp32 on those validation images when ``data`` has them. Written to
    the model's own ``model.int8.onnx``, its record also goes into ``model.json``. Returns the record.
    """
    from ..config import ModelConfig
    from .backends import cached_onnx, file_sha256
    from .model import read_meta, resolve_model_dir

    if fmt not in FORMATS:
        raise QuantizationError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    found = cached_onnx(model_dir)
    if found is None:
        raise QuantizationError(f"{model_dir}: the model cannot be exported to ONNX (see the warning above)")
    fp32_path, export_record = found
    dest = Path(dest)
    if fmt == "onnx":
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fp32_path, dest)
        return {"file": str(dest), "sha256": file_sha256(dest), "bytes": dest.stat().st_size,
                "parity_max_abs_diff_vs_keras": export_record.get("parity_max_abs_diff")}
    sources = [str(d) for d in data] or recorded_sources(meta)
    if not sources:
        raise QuantizationError(f"{model_dir}: model.json records no training data; give calibration images with --data")
    val_names = set(((meta.get("data") or {}).get("split") or {}).get("val_names") or [])
    size = int(meta["model"]["image_size"])
    inputs, names = calibration_inputs(calibration_names(sources, val_names), size, settings.images, settings.seed)
    log.info("calibrating on %d images from %s", len(names), ", ".join(sources))
    threshold = ModelConfig.from_dict(meta.get("model", {})).threshold
    record = quantize_file(fp32_path, dest, inputs, settings, threshold)
    record["keras_sha256"] = export_record.get("keras_sha256")  # which model.keras it was made from
    record["calibration"]["sources"] = sources
    record["validation"] = validate_int8(model_dir, dest, sources, meta) if val_names else None
    if dest.resolve() == (model_dir / INT8_FILE).resolve():
        write_record(model_dir, record)
    return record


def validate_int8(model_dir: Path, int8_file: Path, sources: Sequence[str], meta: dict[str, Any]) -> dict | None:
    """int8 against fp32 on the model's validation images found in ``sources`` (None if none are)."""
    from ..evaluation import EvaluationError, load_samples
    from ..results import paired_difference
    from .backends import make_session
    from .model import FaceMaskModel, load_model

    fp32 = load_model(model_dir, runtime="onnx")
    try:
        samples, _ = load_samples(sources, "val", fp32, None)
    except EvaluationError as exc:
        log.warning("int8 not validated: %s", exc)
        return None
    int8 = FaceMaskModel(None, meta, model_dir, make_session(str(int8_file), 0))
    c = compare_precisions(fp32, int8, samples)
    d = paired_difference(c.pop("per_image_fp32"), c.pop("per_image_int8"))
    return {**c, "dice_diff_ci95": [round(d["low"], 5), round(d["high"], 5)], "better": d["better"],
            "worse": d["worse"], "split": "the model's validation images (model.json data.split.val_names)"}
