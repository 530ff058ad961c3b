"""``evaluate()``: score a model on annotated images and write what it found.

It chooses the images (:func:`load_samples`: a dataset, the model's recorded validation split, a
limit), scores them (:mod:`batchmask.scoring`: the metrics, their definitions and the one-pass
threshold sweep), tunes and stores the threshold in ``model.json`` when asked, scores the Haar
baseline, and writes metrics, per-image rows and the HTML report (:mod:`batchmask.report`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import (
    DataError,
    DataSource,
    Sample,
    as_sources,
    fingerprint,
    is_samples,
)
from .results import EvalResult, format_table  # noqa: F401  (format_table re-exported: the CLI prints it)
from .scoring import (  # noqa: F401  (defined there, part of this module's interface)
    DEFAULT_THRESHOLDS,
    EVAL_MAX_PIXELS,
    SIZE_BUCKETS,
    SMOOTH,
    EvaluationError,
    ImageCounts,
    Predictor,
    Scores,
    image_counts,
    model_inputs,
    score,
    score_models,
    size_bucket,
    sweep_thresholds,
)
from .sources import load_datasets

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------


def _result(scores: Scores, threshold: float, info: dict[str, Any], best: float | None = None) -> EvalResult:
    j = scores.edge_index(threshold)
    return EvalResult(metrics=scores.metrics(j), rows=scores.rows(j), threshold=scores.values[j],
                      threshold_table=scores.threshold_table(), by_face_size=scores.by_face_size(j),
                      by_group=scores.by_group(j), best_threshold=best, info=info)


def load_samples(data: DataSource | Sequence[DataSource] | Sequence[Sample], subset: str | None, model,
                 limit: int | None) -> tuple[list[Sample], str]:
    """The samples ``evaluate`` scores: ``data`` loaded, ``subset="val"`` keeping the model's
    recorded validation images, then ``limit``; also a description of where they came from."""
    if not is_samples(data):
        paths = as_sources(data)
        samples, _ = load_datasets(paths, limit=None if subset else limit)
        where = ", ".join(str(p) for p in paths)
    else:
        samples, where = list(data), "in-memory samples"
    if subset == "val":
        split = (model.meta.get("data") or {}).get("split") or {}
        names = split.get("val_names")
        if not names:
            raise EvaluationError(
                f"--subset val: {model.path or 'this model'}'s model.json records no validation split "
                "(data.split.val_names); evaluate on a held-out dataset instead"
            )
        wanted = set(names)
        samples = [s for s in samples if s.name in wanted]
        if not samples:
            raise EvaluationError(f"--subset val: none of the {len(wanted)} validation images are in {where}")
        if len(samples) < len(wanted):
            log.warning("--subset val: %d of %d validation images found in %s", len(samples), len(wanted), where)
    elif subset is not None:
        raise EvaluationError(f"unknown subset {subset!r} (only 'val' is supported)")
    samples = samples[:limit] if limit else samples
    if not samples:
        raise DataError(f"{where}: no images to evaluate")
    return samples, where


def _best_threshold(table: list[dict[str, Any]], current: float) -> float:
    top = max(r["dice"] for r in table)
    ties = [r["threshold"] for r in table if r["dice"] >= top - 1e-12]
    return min(ties, key=lambda t: abs(t - current))


def _store_threshold(model, best: float, previous: float, table: list[dict[str, Any]], info: dict) -> None:
    from .inference import read_meta, write_meta

    meta = read_meta(model.path)
    meta.setdefault("model", {})["threshold"] = best
    meta["threshold_tuning"] = {
        "metric": "mean per-image Dice at original image size",
        "best": best, "previous": previous,
        "data": info["data"], "subset": info["subset"], "images": info["images"],
        "data_fingerprint": info["data_fingerprint"],
        "table": [{"threshold": r["threshold"], "dice": round(r["dice"], 6)} for r in table],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_meta(model.path, meta)
    model.meta = meta
    model.config.threshold = best
    log.info("stored threshold %.2f (was %.2f) in %s", best, previous, model.path / "model.json")


def _is_shipped_model(model) -> bool:
    """True for the model inside the package, which evaluate must never modify."""
    from .inference import default_model_dir

    if model is None:
        return True
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    return path is not None and Path(path).resolve() == default_model_dir().resolve()


def evaluate(
    model,
    data: DataSource | Sequence[DataSource] | Sequence[Sample],
    *,
    out_dir: str | os.PathLike | None = None,
    subset: str | None = None,
    tune_threshold: bool = False,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    report_dir: str | os.PathLike | None = None,
    baseline: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    grid_images: int = 8,
    runtime: str = "keras",
    precision: str = "fp32",
    store_threshold: bool = True,
) -> EvalResult:
    """Score ``model`` (a directory, a loaded :class:`FaceMaskModel`, or None for the default
    model) on ``data`` (an ``images.npy``, a WIDER folder, or samples).

    With ``tune_threshold`` the threshold with the best mean per-image Dice is stored in the
    model's ``model.json`` and the returned metrics are scored at it (optimistic on these
    images). ``out_dir`` gets metrics.json, per_image.csv and predictions.png; ``report_dir`` an
    HTML report; ``baseline="haar"`` scores OpenCV's Haar cascade on the same images.
    ``runtime``: what predicts ("keras", "onnx" or "auto"; see :mod:`batchmask.inference.backends`);
    ``precision``: "fp32", "int8" (the model's int8 file) or "auto" (:mod:`batchmask.inference.int8`).
    Files are decoded exactly as ``batchmask run`` decodes them (JPEG draft mode included).
    ``store_threshold=False`` tunes the threshold without writing it anywhere (scoring a model
    that must not change, such as a fine-tuning run's starting model).
    """
    from .inference import FaceMaskModel, default_model_dir, load_model
    from .report import Examples, write_outputs, write_report

    if baseline not in (None, "haar"):
        raise EvaluationError(f"unknown baseline {baseline!r} (choose: haar)")
    if tune_threshold and store_threshold and _is_shipped_model(model):
        raise EvaluationError(
            f"--tune-threshold would modify the model shipped inside the package ({default_model_dir()}); "
            "copy it and pass --model DIR"
        )
    haar = None
    if baseline == "haar":
        from .baseline import HaarBaseline

        haar = HaarBaseline()  # fail early when OpenCV is missing
    fmm = model if isinstance(model, FaceMaskModel) else load_model(model, runtime=runtime, precision=precision)
    if tune_threshold and store_threshold and fmm.path is None:
        raise EvaluationError("tune_threshold needs a model loaded from a directory")
    samples, where = load_samples(data, subset, fmm, limit)
    previous = fmm.threshold
    info: dict[str, Any] = {
        "model": str(fmm.path) if fmm.path else None, "model_config": fmm.config.to_dict(),
        "data": where, "subset": subset, "images": len(samples), "data_fingerprint": fingerprint(samples),
        "threshold_source": "model.json", "runtime": fmm.runtime, "precision": fmm.precision,
    }
    t0 = time.perf_counter()
    scores = score_models([fmm], samples, list(thresholds) + [previous], batch_size)[0][0]
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["images_per_s"] = round(len(samples) / max(info["seconds"], 1e-9), 2)
    best = None
    if tune_threshold:
        table = scores.threshold_table()
        best = _best_threshold(table, previous)
        if store_threshold:
            _store_threshold(fmm, best, previous, table, info)
        info["threshold_source"] = "tuned on these images"
        info["previous_threshold"] = previous
    result = _result(scores, best if best is not None else previous, info, best)
    if haar is not None:
        t0 = time.perf_counter()
        hs = score(haar.predict_proba, samples, [0.5], batch_size, desc="haar baseline")
        hinfo = {"name": "haar", "settings": haar.settings(), "seconds": round(time.perf_counter() - t0, 2)}
        result.baseline = _result(hs, 0.5, hinfo)
    if out_dir is not None or report_dir is not None:
        examples = Examples(fmm, samples, result, haar, grid_images)
        if report_dir is not None:
            result.files.update(write_report(Path(report_dir), result, examples))
        if out_dir is not None:
            result.files.update(write_outputs(Path(out_dir), result, examples))
    return result
