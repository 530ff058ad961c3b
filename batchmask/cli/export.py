"""`batchmask export`: the model as an ONNX file (fp32, or int8 calibrated on real images)."""

from __future__ import annotations

import json

import click

from .common import user_errors


@click.command("export")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["onnx", "onnx-int8"]), default="onnx", show_default=True,
              help="onnx: float32, checked against Keras; onnx-int8: ONNX Runtime static quantization (QDQ).")
@click.option("--data", multiple=True, type=click.Path(),
              help="onnx-int8: calibration images (WIDER folder, images.npy or a folder of images; repeatable). "
                   "Default: the training sources recorded in model.json. Validation images are never used.")
@click.option("--calibration-images", default=200, show_default=True, type=click.IntRange(min=1),
              help="onnx-int8: how many images calibrate the activation ranges.")
@click.option("--calibrate", "method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="onnx-int8: how activation ranges are chosen.")
@click.option("--float-ends", is_flag=True,
              help="onnx-int8: also keep the first convolution in float.")
@click.option("--float-node", "float_nodes", multiple=True, metavar="NAME",
              help="onnx-int8: also keep this node in float (repeatable; names as in the ONNX file, e.g. from "
                   "scripts/int8_sweep.py --debug).")
@click.option("--no-output-shift", is_flag=True,
              help="onnx-int8: do not shift the logits by the bias fitted on the calibration images.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The file to write. MODEL_DIR/model.int8.onnx also records it in model.json (--precision int8).")
def export_cmd(model_dir, fmt, data, calibration_images, method, float_ends, float_nodes, no_output_shift,
               out) -> None:
    """Write MODEL_DIR's network (default: the shipped model) as an ONNX file for other runtimes.

    Prints the file's record: its SHA-256, fp32's largest difference from Keras, and for int8 its
    calibration and its mean per-image Dice next to fp32's on the model's validation images.
    """
    from ..data import DataError
    from ..inference import ModelNotFoundError
    from ..inference.quantize import QuantSettings, export_model

    settings = QuantSettings(images=calibration_images, method=method, float_ends=float_ends,
                             float_nodes=tuple(float_nodes), fit_output_shift=not no_output_shift)
    with user_errors(DataError, ModelNotFoundError, OSError, ValueError):  # QuantizationError is a ValueError
        record = export_model(model_dir, fmt, out, list(data), settings)
    click.echo(json.dumps(record, indent=2))
