"""What an evaluation returns, and its plain-text table: shared by :mod:`batchmask.evaluation`
(which computes it) and :mod:`batchmask.report` (which writes files from it), so neither imports the other's
internals and the two do not import each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

METRIC_LABELS = {
    "threshold": "threshold",
    "dice": "mean Dice (per image)",
    "iou": "mean IoU (per image)",
    "soft_dice_global": "global soft Dice",
    "pixel_dice_global": "global Dice (binary)",
    "precision": "pixel precision",
    "recall": "pixel recall",
    "face_coverage": "mean face coverage",
    "images": "images",
    "faces": "faces",
}


@dataclass
class EvalResult:
    """``metrics`` at ``threshold``; ``rows`` one dict per image (the per_image.csv columns)."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    threshold: float
    threshold_table: list[dict[str, Any]]
    by_face_size: list[dict[str, Any]]
    by_group: list[dict[str, Any]] = field(default_factory=list)
    best_threshold: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    baseline: EvalResult | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("rows", "baseline")}
        if self.baseline is not None:
            d["baseline"] = self.baseline.to_dict()
        return d


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(result: EvalResult) -> str:
    """The metrics as a plain-text table (model and, if scored, the baseline side by side)."""
    cols = [("model", result)] + ([("haar baseline", result.baseline)] if result.baseline else [])
    width = max(len(label) for label in METRIC_LABELS.values())
    lines = [f"{'':{width}}  " + "  ".join(f"{name:>14}" for name, _ in cols)]
    for key, label in METRIC_LABELS.items():
        vals = [f"{r.metrics[key]:.2f}" if key == "threshold" else fmt(r.metrics.get(key)) for _, r in cols]
        lines.append(f"{label:{width}}  " + "  ".join(f"{v:>14}" for v in vals))
    if result.best_threshold is not None:
        lines.append(f"tuned threshold {result.best_threshold:.2f} stored in model.json "
                     f"(was {result.info.get('previous_threshold')}); metrics above are at the tuned threshold")
    return "\n".join(lines)


def paired_difference(ref, new, n_boot: int = 2000, seed: int = 0, tol: float = 1e-3) -> dict:
    """Mean of ``new - ref`` (per-image scores of the same images) with a 95% bootstrap interval
    (images resampled with replacement, ``n_boot`` times, seeded), and the number of images where
    ``new`` is better or worse by more than ``tol``."""
    import numpy as np

    a, b = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"need two equal-length score lists, got {a.shape} and {b.shape}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, d.size, (n_boot, d.size))
    means = d[idx].mean(axis=1)
    return {"mean": float(d.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "better": int((d > tol).sum()),
            "worse": int((d < -tol).sum()), "images": int(d.size)}
