"""Evaluation outputs: metrics.json, per_image.csv, predictions.png and the HTML report.

The report (``index.html``) is self-contained: no network assets, images are PNG/JPEG files
beside it. Plots use Matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .results import METRIC_LABELS, EvalResult, fmt

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 720
MASK_RGB = (255, 0, 200)
TRUE_RGB = (0, 230, 0)
HAAR_RGB = (255, 210, 0)


# --------------------------------------------------------------------------------------
# example images (re-predicted for the few that are shown)
# --------------------------------------------------------------------------------------


class Examples:
    """Predicted masks for the few images shown, at display size (re-predicted on demand)."""

    def __init__(self, model, samples, result: EvalResult, haar=None, grid_images: int = 8):
        self.model, self.samples, self.result, self.haar = model, samples, result, haar
        n = len(samples)
        self.grid = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(grid_images, n))}) if grid_images else []
        self._cache: dict[int, dict[str, Any]] = {}

    def ranked(self, k: int) -> tuple[list[int], list[int]]:
        """Indices of the ``k`` best and ``k`` worst images by Dice (ties broken by name)."""
        order = sorted(range(len(self.samples)), key=lambda i: (-self.result.rows[i]["dice"], self.samples[i].name))
        k = min(k, len(order) // 2 if len(order) > 1 else 1)
        return order[:k], order[::-1][:k]

    def get(self, indices: list[int]) -> list[dict[str, Any]]:
        todo = [i for i in indices if i not in self._cache]
        if todo:
            images = [self.samples[i].load_image() for i in todo]
            probs = self.model.predict_proba(images, batch_size=8)
            for i, im, p in zip(todo, images, probs, strict=True):
                h, w = im.shape[:2]
                s = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
                size = (max(1, round(w * s)), max(1, round(h * s)))
                mask = Image.fromarray(((p >= self.result.threshold) * 255).astype(np.uint8)).resize(size)
                entry = {
                    "index": i, "name": self.samples[i].name, "row": self.result.rows[i],
                    "image": np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)),
                    "mask": np.asarray(mask) >= 128, "boxes": self.samples[i].boxes * s,
                    "haar_boxes": self.haar.detect(im) * s if self.haar is not None else None,
                }
                if self.result.baseline is not None:
                    entry["haar_row"] = self.result.baseline.rows[i]
                self._cache[i] = entry
        return [self._cache[i] for i in indices]


def overlay(entry: dict[str, Any], show_mask: bool = True, show_haar: bool = True) -> Image.Image:
    """The image with the predicted mask tinted, true boxes (green) and Haar boxes (yellow)."""
    im = entry["image"].astype(np.float32)
    if show_mask:
        m = entry["mask"]
        im[m] = 0.55 * im[m] + 0.45 * np.asarray(MASK_RGB, np.float32)
    out = Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    if show_haar and entry.get("haar_boxes") is not None:
        for x1, y1, x2, y2 in entry["haar_boxes"]:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=HAAR_RGB, width=width)
    for x1, y1, x2, y2 in entry["boxes"]:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=TRUE_RGB, width=width)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_grid(path: Path, entries: list[dict[str, Any]]) -> None:
    """Two panels per image (true boxes | predicted mask + true boxes), two images per row."""
    plt = _plt()
    per_row = 2 if len(entries) > 1 else 1
    nrows = max(1, -(-len(entries) // per_row))
    fig, axes = plt.subplots(nrows, 2 * per_row, figsize=(8 * per_row, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, e in enumerate(entries):
        r, c = divmod(k, per_row)
        axes[r, 2 * c].imshow(overlay(e, show_mask=False, show_haar=False))
        short = e["name"].rsplit("/", 1)[-1]
        axes[r, 2 * c].set_title(short if len(short) <= 44 else short[:20] + "…" + short[-22:], fontsize=8)
        axes[r, 2 * c + 1].imshow(overlay(e, show_haar=False))
        axes[r, 2 * c + 1].set_title(f"predicted: Dice {e['row']['dice']:.3f}", fontsize=8)
    fig.suptitle("green: true face boxes; magenta: predicted face mask", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.4 * nrows)))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# out_dir: metrics.json, per_image.csv, predictions.png
# --------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["name"])
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_outputs(out: Path, result: EvalResult, examples: Examples) -> dict[str, str]:
    from .version import __version__

    out.mkdir(parents=True, exist_ok=True)
    files = {"per_image_csv": str(out / "per_image.csv")}
    write_rows(out / "per_image.csv", result.rows)
    if result.baseline is not None:
        files["baseline_per_image_csv"] = str(out / "per_image_haar.csv")
        write_rows(out / "per_image_haar.csv", result.baseline.rows)
    if examples.grid:
        files["predictions_png"] = str(out / "predictions.png")
        write_grid(out / "predictions.png", examples.get(examples.grid))
    files["metrics_json"] = str(out / "metrics.json")
    doc = {"batchmask_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           **result.to_dict()}
    doc["files"] = {**result.files, **files}
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    log.info("wrote %s", ", ".join(files.values()))
    return files


# --------------------------------------------------------------------------------------
# report_dir: index.html and its images
# --------------------------------------------------------------------------------------


def _plot_hist(path: Path, result: EvalResult) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bins = np.linspace(0, 1, 21)
    ax.hist([r["dice"] for r in result.rows], bins=bins, alpha=0.75, label="model", color="#7a3cc8")
    if result.baseline is not None:
        ax.hist([r["dice"] for r in result.baseline.rows], bins=bins, histtype="step", linewidth=2,
                label="Haar baseline", color="#d08a00")
    ax.set_xlabel(f"per-image Dice at threshold {result.threshold:.2f}")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sizes(path: Path, result: EvalResult) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    series = [("model", result.by_face_size, "#7a3cc8")]
    if result.baseline is not None:
        series.append(("Haar baseline", result.baseline.by_face_size, "#d08a00"))
    x = np.arange(len(result.by_face_size))
    wid = 0.8 / len(series)
    for ax, key, title in ((axes[0], "face_coverage", "face coverage by face size"),
                           (axes[1], "dice", "image Dice by median face size")):
        for k, (label, rows, color) in enumerate(series):
            vals = [r[key] if r[key] is not None else 0.0 for r in rows]
            ax.bar(x + (k - (len(series) - 1) / 2) * wid, vals, wid, label=label, color=color)
        count = "faces" if key == "face_coverage" else "images"
        ax.set_xticks(x, [f"{r['bucket']}\n({r[count]} {count})" for r in result.by_face_size])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sweep(path: Path, result: EvalResult) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    t = [r["threshold"] for r in result.threshold_table]
    for key in ("dice", "iou", "precision", "recall"):
        ax.plot(t, [np.nan if r[key] is None else r[key] for r in result.threshold_table], marker=".",
                label=METRIC_LABELS[key])
    ax.axvline(result.threshold, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("threshold")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(headers: list[str], rows: list[list[Any]], bold_row: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(("<tr class='sel'>" if i == bold_row else "<tr>")
                   + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for i, r in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def _figures(entries: list[dict[str, Any]], img_dir: Path, prefix: str, has_haar: bool) -> str:
    cells = []
    for k, e in enumerate(entries, 1):
        fname = f"{prefix}_{k:02d}.jpg"
        overlay(e).save(img_dir / fname, quality=85)
        n = e["row"]["faces"]
        cap = f"{e['name']} · Dice {e['row']['dice']:.3f} · {n} face{'s' if n != 1 else ''}"
        if has_haar:
            cap += f" · Haar Dice {e['haar_row']['dice']:.3f}"
        cells.append(f'<figure><img src="images/{html.escape(fname)}" alt="{html.escape(e["name"])}">'
                     f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    return '<div class="grid">' + "".join(cells) + "</div>"


CSS = """body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
th{background:#f0f0f0}th:first-child{text-align:left}td:first-child{text-align:left}.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
figure{margin:0}figure img{width:100%;height:300px;object-fit:contain;background:#eee}figcaption{font-size:12px;overflow-wrap:anywhere}.plots img{max-width:49%}
.key span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
p.note{font-size:13px;color:#555}tr.sel td{font-weight:bold;background:#f3ecff}"""


def write_report(out: Path, result: EvalResult, examples: Examples, k: int = 6) -> dict[str, str]:
    """Write ``index.html`` with its plots and example images into ``out``."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot_hist(img_dir / "dice_hist.png", result)
    _plot_sizes(img_dir / "dice_by_size.png", result)
    _plot_sweep(img_dir / "threshold_sweep.png", result)
    best, worst = examples.ranked(k)
    has_haar = result.baseline is not None
    cols = [("model", result)] + ([("Haar baseline", result.baseline)] if has_haar else [])
    metrics = _table(["metric"] + [c for c, _ in cols],
                     [[label] + [f"{r.metrics[key]:.2f}" if key == "threshold" else r.metrics.get(key) for _, r in cols]
                      for key, label in METRIC_LABELS.items()])
    size_rows = []
    for k_, row in enumerate(result.by_face_size):
        hi = "∞" if row["max_px"] is None else f"{row['max_px']:.0f}"
        vals = [f"{row['bucket']} ({row['min_px']:.0f}–{hi} px)", row["faces"], row["face_coverage"]]
        vals += [result.baseline.by_face_size[k_]["face_coverage"]] if has_haar else []
        vals += [row["images"], row["dice"]] + ([result.baseline.by_face_size[k_]["dice"]] if has_haar else [])
        size_rows.append(vals)
    size_head = ["face size", "faces", "coverage"] + (["Haar coverage"] if has_haar else [])
    size_head += ["images", "Dice"] + (["Haar Dice"] if has_haar else [])
    group_rows = [[g["group"] or "(no event)", g["images"], g["faces"], g["dice"], g["iou"]]
                  for g in sorted(result.by_group, key=lambda g: g["dice"])]
    sweep = _table(["threshold", "Dice", "IoU", "precision", "recall", "face coverage"],
                   [[f"{r['threshold']:.2f}"] + list(r.values())[1:] for r in result.threshold_table],
                   bold_row=[r["threshold"] for r in result.threshold_table].index(result.threshold))
    info = result.info
    cfg = info.get("model_config", {})
    key = (f'<p class="key">overlays:<span style="background:rgb{MASK_RGB}"></span>predicted mask'
           f'<span style="background:rgb{TRUE_RGB}"></span>true face boxes'
           + (f'<span style="background:rgb{HAAR_RGB}"></span>Haar detections' if has_haar else "") + "</p>")
    haar_note = ""
    if has_haar:
        s = result.baseline.info["settings"]
        haar_note = (f"<p class='note'>Haar baseline: OpenCV {s['opencv_version']} {s['cascade']}, scaleFactor "
                     f"{s['scale_factor']}, minNeighbors {s['min_neighbors']}, minSize {s['min_size']} px; "
                     "detected boxes painted as masks, scored with the same metric on the same images.</p>")
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>batchmask evaluation</title><style>{CSS}</style></head><body>
<h1>batchmask evaluation</h1>
<p>model <code>{html.escape(str(info.get('model')))}</code> (alpha {cfg.get('alpha')}, input {cfg.get('image_size')}²,
threshold {result.threshold:.2f}: {html.escape(info.get('threshold_source', ''))})<br>
data <code>{html.escape(str(info.get('data')))}</code>{' subset ' + html.escape(info['subset']) if info.get('subset') else ''}:
{info.get('images')} images, {result.metrics['faces']} faces · {info.get('seconds')} s ({info.get('images_per_s')} images/s)
· {time.strftime('%Y-%m-%d %H:%M')}</p>
<h2>Metrics</h2>{metrics}{haar_note}
<p class="note">Scored at each image's original size. Dice and IoU: per image, then the mean (1 when truth and
prediction are both empty). Global soft Dice: the exercise's metric on probabilities, sums over all pixels of all
images, smooth 1. Precision/recall: face pixels, summed over all images. Face coverage: fraction of each true
face box predicted as face, averaged over faces.</p>
<h2>Per-image Dice</h2><div class="plots"><img src="images/dice_hist.png" alt="Dice histogram">
<img src="images/threshold_sweep.png" alt="threshold sweep"></div>
<h2>By face size</h2><img src="images/dice_by_size.png" alt="Dice by face size">
{_table(size_head, size_rows)}
<p class="note">Face size = sqrt(box area) in pixels at the original image size. "coverage" scores each face on its
own (fraction of its box predicted as face); "Dice" groups whole images by their median face size.</p>
<h2>By event</h2><p class="note">WIDER event folders, lowest mean Dice first.</p>
{_table(["event", "images", "faces", "Dice", "IoU"], group_rows)}
<h2>Best images</h2>{key}{_figures(examples.get(best), img_dir, "best", has_haar)}
<h2>Worst images</h2>{_figures(examples.get(worst), img_dir, "worst", has_haar)}
<h2>Threshold sweep (model)</h2><p class="note">Bold: the threshold used above.</p>{sweep}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    log.info("wrote report %s", out / "index.html")
    return {"report_html": str(out / "index.html")}
