"""`batchmask evaluate`: score a model on annotated images (images.npy or a WIDER folder)."""

from __future__ import annotations

import click

from .common import user_errors


@click.command("evaluate")
@click.option("--model", "model_dir", type=click.Path(file_okay=True, dir_okay=True), default=None,
              help="Model directory (default: the model shipped with batchmask).")
@click.option("--data", required=True, multiple=True, type=click.Path(),
              help="images.npy, a WIDER FACE folder, or its wider_face_*_bbx_gt.txt (repeatable).")
@click.option("--out", "out_dir", default="evaluation", show_default=True, type=click.Path(),
              help="Folder for metrics.json, per_image.csv and predictions.png.")
@click.option("--subset", type=click.Choice(["val"]), default=None,
              help="Only the validation images recorded in the model's model.json.")
@click.option("--tune-threshold", is_flag=True,
              help="Pick the threshold with the best mean per-image Dice and store it in model.json.")
@click.option("--report", "report_dir", type=click.Path(), default=None,
              help="Also write a self-contained HTML report (index.html + images) into this folder.")
@click.option("--baseline", type=click.Choice(["haar"]), default=None,
              help="Score OpenCV's Haar face detector on the same images (needs batchmask[baseline]).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N images.")
@click.option("--runtime", type=click.Choice(["auto", "keras", "onnx"]), default="auto", show_default=True,
              help="What predicts: ONNX Runtime (auto: when installed; same masks, faster on CPU) or Keras.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "int8"]), default="auto", show_default=True,
              help="int8: the model's int8 ONNX file (see `batchmask export`); auto: as `batchmask run`.")
def evaluate_cmd(model_dir, data, out_dir, subset, tune_threshold, report_dir, baseline, batch_size, limit,
                 runtime, precision) -> None:
    """Score a model: mean per-image Dice and IoU, global soft Dice, pixel precision/recall.

    Every image is scored at its original size. Prints a table and writes metrics.json,
    per_image.csv and predictions.png into --out.
    """
    from ..baseline import BaselineUnavailableError
    from ..data import DataError
    from ..evaluation import EvaluationError, evaluate, format_table
    from ..inference import ModelNotFoundError
    from ..inference.backends import RuntimeUnavailableError

    with user_errors(DataError, ModelNotFoundError, EvaluationError, BaselineUnavailableError, OSError,
                     RuntimeUnavailableError, ValueError):  # ValueError: int8 with --runtime keras, no int8 file
        result = evaluate(model_dir, list(data), out_dir=out_dir, subset=subset, tune_threshold=tune_threshold,
                          report_dir=report_dir, baseline=baseline, batch_size=batch_size, limit=limit,
                          runtime=runtime, precision=precision)
    click.echo(format_table(result))
    for label, key in (("metrics", "metrics_json"), ("per-image rows", "per_image_csv"),
                       ("grid", "predictions_png"), ("report", "report_html")):
        if key in result.files:
            click.echo(f"{label}: {result.files[key]}")
