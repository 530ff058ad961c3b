"""Scoring a model on annotated images: per-image counts in one pass, the metrics and the
threshold sweep derived from them (:class:`Scores`, :func:`score`, :func:`score_models`).

Everything is scored at each image's **original size**: probabilities come from
:meth:`FaceMaskModel.predict_proba` (already resized back), the truth from
:func:`batchmask.data.boxes_to_mask`.

One streaming pass keeps, per image, histograms of the probabilities inside and outside the
true mask (and inside each face box) in bins whose edges are the thresholds. From those,
TP/FP/FN at *every* threshold follow exactly (``p >= t``, float32 as in ``predict``), so the
threshold sweep costs no second pass and no full-size probability map is kept in memory.

Metric definitions (see README.md, "batchmask evaluate"):

* per-image Dice at threshold ``t``: ``2 TP / (2 TP + FP + FN)``; 1 when truth and prediction
  are both empty (no smoothing). ``dice`` in the metrics is its mean over images.
* per-image IoU: ``TP / (TP + FP + FN)``; 1 when both are empty. ``iou`` is the mean.
* ``soft_dice_global``: the exercise's global soft Dice on probabilities, sums over all pixels
  of all images, smooth 1 (as ``losses.dice_coefficient(per_image=False)``).
* ``precision`` / ``recall``: face pixels, global sums over all images (``None`` if undefined).
* face coverage: the fraction of a face box's pixels predicted as face (recall per face).

Apart from :mod:`batchmask.evaluation` (``evaluate()``: choosing the images, tuning and storing
the threshold, writing outputs) because this is arithmetic on arrays plus the decode; everything
here is importable from there too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from .data import Sample, boxes_to_mask

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: Face-size buckets by sqrt(box area) in pixels at the image's original size (COCO's limits).
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0),
    ("medium", 32.0, 96.0),
    ("large", 96.0, float("inf")),
)
SMOOTH = 1.0
#: evaluate's decompression-bomb guard (run's is --max-pixels): annotated datasets are trusted more.
EVAL_MAX_PIXELS = 1_000_000_000

Predictor = Callable[[list[np.ndarray]], list[np.ndarray]]


class EvaluationError(ValueError):
    """Evaluation cannot run as asked (e.g. no validation split recorded in model.json)."""


# --------------------------------------------------------------------------------------
# per-image counts (one pass) and scores derived from them
# --------------------------------------------------------------------------------------


def _box_slices(boxes: np.ndarray) -> list[tuple[slice, slice]]:
    """Pixel slices of each box, with the same pixel-centre rule as ``boxes_to_mask``."""
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        c0, c1 = max(int(np.ceil(x1 - 0.5)), 0), max(int(np.ceil(x2 - 0.5)), 0)
        r0, r1 = max(int(np.ceil(y1 - 0.5)), 0), max(int(np.ceil(y2 - 0.5)), 0)
        out.append((slice(r0, r1), slice(c0, c1)))
    return out


@dataclass
class ImageCounts:
    """What one pass over an image keeps: enough to score it at every edge threshold.

    ``hist_in``/``hist_out`` count truth / non-truth pixels per bin, ``face_hist`` each box's
    pixels per bin. Bin ``b`` holds probabilities with exactly ``b`` edges ``<= p``, so a pixel
    is predicted at edge ``j`` iff its bin is ``> j``.
    """

    name: str
    group: str
    width: int
    height: int
    truth_px: int
    soft_inter: float
    soft_pred: float
    hist_in: np.ndarray
    hist_out: np.ndarray
    face_sizes: np.ndarray
    face_px: np.ndarray
    face_hist: np.ndarray


def _at_least(hist: np.ndarray) -> np.ndarray:
    """Pixels predicted at each edge threshold: for edge j, the sum of bins j+1..k."""
    return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]


def image_counts(prob: np.ndarray, truth: np.ndarray, edges: np.ndarray, boxes: np.ndarray | None = None,
                 name: str = "", group: str = "") -> ImageCounts:
    """Histogram one probability map against its 0/1 truth mask (same HxW)."""
    prob = np.asarray(prob, np.float32)
    truth = np.asarray(truth, bool)
    if prob.shape != truth.shape:
        raise ValueError(f"{name}: prediction {prob.shape} and truth {truth.shape} differ in size")
    edges = np.asarray(edges, np.float32)  # compare in float32, exactly as `prob >= threshold` does
    k1 = len(edges) + 1
    bins = np.searchsorted(edges, prob, side="right")
    joint = np.bincount((bins * 2 + truth).ravel(), minlength=2 * k1)
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    slices = _box_slices(boxes)
    face_hist = np.array([np.bincount(bins[s].ravel(), minlength=k1) for s in slices], np.int64).reshape(-1, k1)
    return ImageCounts(
        name=name, group=group, width=prob.shape[1], height=prob.shape[0],
        truth_px=int(truth.sum()),
        soft_inter=float(prob[truth].sum(dtype=np.float64)),
        soft_pred=float(prob.sum(dtype=np.float64)),
        hist_in=joint[1::2].astype(np.int64), hist_out=joint[0::2].astype(np.int64),
        face_sizes=np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)),
        face_px=face_hist.sum(axis=1), face_hist=face_hist,
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den, and 1 where den is 0 (both masks empty)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _per_edge(c: ImageCounts) -> dict[str, np.ndarray]:
    tp = _at_least(c.hist_in)
    fp = _at_least(c.hist_out)
    fn = c.truth_px - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        cover = _at_least(c.face_hist) / np.where(c.face_px > 0, c.face_px, np.nan)[:, None]
    return {"tp": tp, "fp": fp, "fn": fn, "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn), "cover": cover}


def sweep_thresholds(probs_and_truths: Iterable[tuple[np.ndarray, np.ndarray]],
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[float, float]:
    """Mean per-image Dice at each threshold, in one pass over (probability, truth) pairs."""
    values = _threshold_values(thresholds)
    edges = np.asarray(values, np.float32)
    total, n = np.zeros(len(edges)), 0
    for prob, truth in probs_and_truths:
        total += _per_edge(image_counts(prob, truth, edges))["dice"]
        n += 1
    if n == 0:
        raise EvaluationError("no images to sweep thresholds over")
    return {t: float(v) for t, v in zip(values, total / n, strict=True)}


def _threshold_values(thresholds: Iterable[float]) -> list[float]:
    values = sorted({round(float(t), 6) for t in thresholds})
    if not values or values[0] <= 0.0 or values[-1] >= 1.0:
        raise EvaluationError(f"thresholds must lie strictly between 0 and 1, got {values}")
    return values


def size_bucket(size: float) -> str:
    for name, lo, hi in SIZE_BUCKETS:
        if lo <= size < hi:
            return name
    return "none"


@dataclass
class Scores:
    """Every figure for one predictor on one set of images, at every edge threshold."""

    values: list[float]
    counts: list[ImageCounts]
    per_edge: list[dict[str, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_edge = [_per_edge(c) for c in self.counts]

    def edge_index(self, threshold: float) -> int:
        j = int(np.argmin(np.abs(np.asarray(self.values) - threshold)))
        if abs(self.values[j] - threshold) > 1e-6:
            raise ValueError(f"threshold {threshold} is not one of the scored thresholds {self.values}")
        return j

    def metrics(self, j: int) -> dict[str, Any]:
        cs, pe = self.counts, self.per_edge
        tp = sum(int(e["tp"][j]) for e in pe)
        fp = sum(int(e["fp"][j]) for e in pe)
        truth = sum(c.truth_px for c in cs)
        inter, soft = sum(c.soft_inter for c in cs), sum(c.soft_pred for c in cs)
        covers = np.concatenate([e["cover"][:, j] for e in pe]) if pe else np.zeros(0)
        covers = covers[np.isfinite(covers)]
        return {
            "threshold": self.values[j],
            "dice": float(np.mean([e["dice"][j] for e in pe])),
            "iou": float(np.mean([e["iou"][j] for e in pe])),
            "soft_dice_global": (2 * inter + SMOOTH) / (truth + soft + SMOOTH),
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / truth if truth else None,
            "pixel_dice_global": 2 * tp / (2 * tp + fp + truth - tp) if (tp + fp + truth) else 1.0,
            "face_coverage": float(covers.mean()) if covers.size else None,
            "images": len(cs),
            "images_with_faces": sum(len(c.face_sizes) > 0 for c in cs),
            "faces": int(sum(len(c.face_sizes) for c in cs)),
            "truth_px": int(truth),
            "pred_px": int(tp + fp),
        }

    def rows(self, j: int) -> list[dict[str, Any]]:
        out = []
        for c, e in zip(self.counts, self.per_edge, strict=True):
            med = float(np.median(c.face_sizes)) if len(c.face_sizes) else None
            cover = e["cover"][:, j]
            cover = cover[np.isfinite(cover)]
            out.append({
                "name": c.name, "group": c.group, "width": c.width, "height": c.height,
                "faces": len(c.face_sizes),
                "median_face_px": None if med is None else round(med, 1),
                "size_bucket": "none" if med is None else size_bucket(med),
                "truth_px": c.truth_px, "pred_px": int(e["tp"][j] + e["fp"][j]),
                "tp_px": int(e["tp"][j]), "fp_px": int(e["fp"][j]), "fn_px": int(e["fn"][j]),
                "dice": round(float(e["dice"][j]), 6), "iou": round(float(e["iou"][j]), 6),
                "soft_dice": round((2 * c.soft_inter + SMOOTH) / (c.truth_px + c.soft_pred + SMOOTH), 6),
                "face_coverage": round(float(cover.mean()), 6) if cover.size else None,
            })
        return out

    def by_group(self, j: int) -> list[dict[str, Any]]:
        """Per group (WIDER event folder; "" for images.npy): images, faces, mean Dice and IoU."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.counts):
            groups.setdefault(c.group, []).append(i)
        return [{
            "group": g, "images": len(idx), "faces": int(sum(len(self.counts[i].face_sizes) for i in idx)),
            "dice": float(np.mean([self.per_edge[i]["dice"][j] for i in idx])),
            "iou": float(np.mean([self.per_edge[i]["iou"][j] for i in idx])),
        } for g, idx in sorted(groups.items())]

    def threshold_table(self) -> list[dict[str, Any]]:
        keys = ("threshold", "dice", "iou", "precision", "recall", "face_coverage")
        return [{k: self.metrics(j)[k] for k in keys} for j in range(len(self.values))]

    def by_face_size(self, j: int) -> list[dict[str, Any]]:
        """Per bucket: faces and their mean box coverage; images (by median face size), mean Dice."""
        faces: dict[str, list[float]] = {b[0]: [] for b in SIZE_BUCKETS}
        images: dict[str, list[float]] = {b[0]: [] for b in SIZE_BUCKETS}
        for c, e in zip(self.counts, self.per_edge, strict=True):
            for size, cov in zip(c.face_sizes, e["cover"][:, j], strict=True):
                if np.isfinite(cov):
                    faces[size_bucket(size)].append(float(cov))
            if len(c.face_sizes):
                images[size_bucket(float(np.median(c.face_sizes)))].append(float(e["dice"][j]))
        return [{
            "bucket": name, "min_px": lo, "max_px": None if np.isinf(hi) else hi,
            "faces": len(faces[name]), "face_coverage": float(np.mean(faces[name])) if faces[name] else None,
            "images": len(images[name]), "dice": float(np.mean(images[name])) if images[name] else None,
        } for name, lo, hi in SIZE_BUCKETS]


def score(predict_fn: Predictor, samples: Sequence[Sample], thresholds: Sequence[float],
          batch_size: int = 8, desc: str = "evaluate") -> Scores:
    """Stream ``samples`` through ``predict_fn`` (images -> probability maps at original size)."""
    values = _threshold_values(thresholds)
    edges = np.asarray(values, np.float32)
    counts: list[ImageCounts] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            images = [s.load_image() for s in batch]
            probs = predict_fn(images)
            for s, im, p in zip(batch, images, probs, strict=True):
                h, w = im.shape[:2]
                counts.append(image_counts(p, boxes_to_mask(s.boxes, h, w), edges, s.boxes, s.name, s.group))
            bar.update(len(batch))
            del images, probs
    return Scores(values, counts)


def model_inputs(model, samples: Sequence[Sample], draft: bool = True) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Network inputs (n, S, S, 3) of ``samples`` and their (width, height), decoded exactly as
    ``batchmask run`` decodes a file (JPEG draft mode included); in-memory pixels are resized."""
    from .inference.pixels import decode_for_model

    xs, sizes = [], []
    for s in samples:
        if s.image is None and s.path is not None:
            with open(s.path, "rb") as f:
                x, w, h = decode_for_model(f.read(), model.image_size, EVAL_MAX_PIXELS, str(s.path), draft)
        else:
            im = s.load_image()
            x, (h, w) = model.preprocess(im), im.shape[:2]
        xs.append(x)
        sizes.append((w, h))
    return np.stack(xs), sizes


def score_models(models: Sequence, samples: Sequence[Sample], thresholds: Sequence[float], batch_size: int = 8,
                 desc: str = "evaluate") -> tuple[list[Scores], list[float]]:
    """Score loaded models (:class:`~batchmask.inference.FaceMaskModel`, same input size) on the same
    decoded inputs, one decode per image: their Scores, and per image the fraction of
    network-resolution pixels where every model's mask agrees with the first's (at its threshold)."""
    from .inference.pixels import upsample_probs

    values = _threshold_values(thresholds)
    edges = np.asarray(values, np.float32)
    counts: list[list[ImageCounts]] = [[] for _ in models]
    agree: list[float] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            x, sizes = model_inputs(models[0], batch)
            probs = [m.predict_batch(x) for m in models]
            masks = [p >= m.threshold for p, m in zip(probs, models, strict=True)]
            agree += [float(np.mean(np.all([mk[i] == masks[0][i] for mk in masks], axis=0))) for i in range(len(batch))]
            for k, p in enumerate(probs):
                for s, (w, h), pk in zip(batch, sizes, p, strict=True):
                    counts[k].append(image_counts(upsample_probs(pk, w, h), boxes_to_mask(s.boxes, h, w), edges,
                                                  s.boxes, s.name, s.group))
            bar.update(len(batch))
    return [Scores(values, c) for c in counts], agree
