"""`batchmask train`."""

from __future__ import annotations

import shlex
import sys

import click
from click.core import ParameterSource

from ..config import (
    DECODERS,
    DEFAULT_DECODER,
    DEFAULT_TRAINABLE_BLOCKS,
    AugmentConfig,
    LabelOptions,
    ModelConfig,
    TrainConfig,
)
from .common import user_errors


@click.command("train")
@click.option("--data", multiple=True, type=click.Path(exists=True),
              help="images.npy (the exercise's format), a WIDER FACE folder / wider_face_*_bbx_gt.txt, a COCO "
                   "instances .json or a YOLO folder (images/ + labels/). Repeat to train on several together.")
@click.option("--category", default=LabelOptions.category, show_default=True,
              help="COCO: the category (by name) whose boxes are faces.")
@click.option("--class-id", default=LabelOptions.class_id, type=click.IntRange(min=0), show_default=True,
              help="YOLO: the class number whose boxes are faces.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="COCO: the folder file_name is relative to (default: beside the JSON or its images/).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Model directory to write (model.keras, model.json, history.csv, learning_curves.png).")
@click.option("--init-from", "init_from", metavar="MODEL_DIR",
              help="Fine-tune a trained model ('default': the shipped one) instead of starting from ImageNet: "
                   "its architecture and recipe, no warm-up, --learning-rate 5e-4 unless given.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True), metavar="OUT",
              help="Continue the stopped or killed training in OUT at its next epoch (same data, options and "
                   "schedule; only --time-limit and --quiet apply).")
@click.option("--val-data", multiple=True, type=click.Path(exists=True),
              help="Separate validation data, repeatable (default: a seeded split of --data).")
@click.option("--val-fraction", default=0.2, type=click.FloatRange(0, 1, min_open=True, max_open=True), show_default=True, help="Share of --data held out for validation.")
@click.option("--split", type=click.Choice(["random", "event", "stratified"]), default="random", show_default=True,
              help="Validation split: random images, whole WIDER event folders, or --val-fraction of every event.")
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True, help="Total epochs (warm-up + fine-tuning).")
@click.option("--warmup-epochs", default=5, type=click.IntRange(min=0), show_default=True, help="Epochs with the whole encoder frozen.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), show_default=True)
@click.option("--learning-rate", default=1e-3, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Warm-up learning rate (fine-tuning uses 0.1x).")
@click.option("--image-size", default=ModelConfig.image_size, show_default=True,
              help="Network input size at inference, whole image (multiple of 32).")
@click.option("--crop-size", type=int, help="Train on random crops of this side (multiple of 32; default: --image-size).")
@click.option("--decoder", type=click.Choice(list(DECODERS)), default=DEFAULT_DECODER, show_default=True,
              help="Decoder: 'lean' (depthwise-separable, ends at 1/2 size, 3.8 G MACs at 512²), 'lean4' "
                   "(ends at 1/4), 'lean1' (a fifth stage at full size), 'unet' (full 3x3 convolutions, 16.6 G MACs at 512²).")
@click.option("--crop-scale", type=click.FloatRange(0.05, 1.0), default=AugmentConfig.crop_scale[0], show_default=True,
              help="Smallest training crop as a share of the image side (crops range from it to 1).")
@click.option("--alpha", default=ModelConfig.alpha, type=click.FloatRange(min=0, min_open=True), show_default=True, help="MobileNet width multiplier (0.25, 0.5, 0.75, 1.0).")
@click.option("--trainable-blocks", default=DEFAULT_TRAINABLE_BLOCKS, type=click.IntRange(0, 13), show_default=True,
              help="Encoder blocks (of 13) trained in the fine-tuning phase, counted from the end.")
@click.option("--backbone-weights", default="imagenet", show_default=True,
              help="'imagenet' (Keras download or $KERAS_HOME/models cache), a .h5 file, or 'none'.")
@click.option("--loss", type=click.Choice(["bce_dice", "dice", "bce_logdice"]), default="bce_dice", show_default=True)
@click.option("--dice-per-image/--dice-per-batch", default=TrainConfig.dice_per_image, show_default=True,
              help="Average the loss's Dice term over images (as the metric does) or over the batch's pixels.")
@click.option("--small-face-weight", type=click.FloatRange(min=1.0), default=TrainConfig.small_face_weight,
              show_default=True,
              help="Weigh the loss on faces under 32x32 px of the training input up, by 32²/area, at most this (1: off).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Crop/scale/flip/colour augmentation.")
@click.option("--tta-flip/--no-tta-flip", default=False, show_default=True,
              help="Store test-time horizontal-flip averaging in the model (2x predict cost).")
@click.option("--seed", default=42, show_default=True, help="Seeds the initialisation, augmentation and (unless --split-seed) the split.")
@click.option("--split-seed", type=int, help="Seed of the train/validation split (default: --seed): vary --seed, keep the validation images.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images (quick trials).")
@click.option("--patience", default=TrainConfig.patience, type=click.IntRange(min=0), show_default=True,
              help="End fine-tuning after this many epochs without a better val_dice_t50 (0: run every epoch).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), help="Stop after this many minutes, keeping the best epoch.")
@click.option("--force", is_flag=True, help="Overwrite an existing model in --out.")
@click.option("--quiet", is_flag=True, help="No Keras progress bars (-v still logs each epoch).")
@click.pass_context
def train_cmd(ctx, data, category, class_id, images_dir, out, init_from, resume_dir, val_data, val_fraction, split, epochs, warmup_epochs, batch_size, learning_rate, image_size,
              crop_size, decoder, crop_scale, alpha, trainable_blocks, backbone_weights, loss, dice_per_image,
              small_face_weight, augment, tta_flip, seed, split_seed, limit, patience, time_limit, force, quiet) -> None:
    """Train a MobileNet U-Net that predicts face masks from face boxes.

    \b
    Examples:
      batchmask train --data images.npy --out models/facemask
      batchmask train --data WIDER_train --out models/wf --image-size 320 --epochs 40
      batchmask train --data widerface-dev --data widerface-pool --split stratified --val-fraction 0.1 --out m
      batchmask train --init-from default --data faces_coco.json --out models/ours
      batchmask train --resume models/ours --time-limit 60
    """
    from ..checkpoint import ResumeError
    from ..data import DataError
    from ..finetune import InitFromError
    from ..model import WeightsError
    from ..training import OutputExistsError, resume, train

    errors = (DataError, WeightsError, OutputExistsError, ResumeError, InitFromError, ValueError, FileNotFoundError)
    if resume_dir:
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume_dir", "time_limit", "quiet")
                 and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
        if given:
            raise click.UsageError(f"--resume OUT continues a training as it was started (only --time-limit and "
                                   f"--quiet apply): drop {', '.join(given)}")
        with user_errors(*errors):
            res = resume(resume_dir, time_limit_s=time_limit * 60 if time_limit is not None else None,
                         progress=not quiet)
        _summary(res)
        return
    if not data or not out:
        raise click.UsageError("--data and --out are required (or --resume OUT)")

    cfg = TrainConfig(
        model=ModelConfig.with_decoder(decoder, alpha=alpha, image_size=image_size,
                                       trainable_blocks=trainable_blocks, tta_flip=tta_flip),
        augment=AugmentConfig(enabled=augment, crop_scale=(crop_scale, 1.0)),
        backbone_weights=backbone_weights,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        loss=loss,
        dice_per_image=dice_per_image,
        small_face_weight=small_face_weight,
        crop_size=crop_size,
        val_fraction=val_fraction,
        split=split,
        seed=seed,
        split_seed=split_seed,
        patience=patience,
        time_limit_s=time_limit * 60 if time_limit is not None else None,
        labels=LabelOptions(category=category, class_id=class_id, images=images_dir),
    )
    with user_errors(*errors):
        if init_from:
            cfg = _finetune_config(ctx, cfg, init_from)
        try:
            cfg.validate()
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        res = train(list(data), out, cfg, val_data=list(val_data) or None, force=force, limit=limit, progress=not quiet,
                    command=shlex.join(["batchmask", *sys.argv[1:]]))
    _summary(res)


#: CLI options -> the config fields they set (``model.`` for ModelConfig's), for --init-from: the
#: options not given on the command line are taken from the starting model.
_CONFIG_FIELDS = {
    "image_size": ["model.image_size"], "alpha": ["model.alpha"], "trainable_blocks": ["model.trainable_blocks"],
    "tta_flip": ["model.tta_flip"],
    "decoder": ["model.decoder_block", "model.decoder_filters", "model.decoder_projection"],
    "crop_scale": ["augment"], "crop_size": ["crop_size"], "loss": ["loss"], "dice_per_image": ["dice_per_image"],
    "small_face_weight": ["small_face_weight"], "batch_size": ["batch_size"], "warmup_epochs": ["warmup_epochs"],
    "learning_rate": ["learning_rate"],
}


def _finetune_config(ctx: click.Context, cfg: TrainConfig, init_from: str) -> TrainConfig:
    from ..finetune import finetune_config, resolve_start
    from ..inference import read_meta

    start_dir = resolve_start(init_from)
    given = {f for name, fields in _CONFIG_FIELDS.items()
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None) for f in fields}
    return finetune_config(cfg, start_dir, read_meta(start_dir), given)


def _summary(res) -> None:
    m = res.metrics
    start = (res.init_from or {}).get("validation") or {}
    gain = f" (starting model: {start['dice']:.3f})" if "dice" in start else ""
    click.echo(
        f"Saved {res.out_dir} (best epoch {res.best_epoch}/{len(res.history)}, {res.wall_s / 60:.1f} min). "
        f"Validation: Dice {m.get('dice', float('nan')):.3f}{gain} at threshold {m.get('threshold', float('nan')):.2f}, "
        f"IoU {m.get('iou', float('nan')):.3f}, global soft Dice {m.get('soft_dice_global', float('nan')):.3f}"
    )
