"""Training: ``train()`` fits the U-Net on face boxes and writes a model directory.

Two phases (transfer learning): the decoder first with the whole encoder frozen
(``warmup_epochs``), then the encoder's last ``trainable_blocks`` blocks too, at
``learning_rate * finetune_lr_scale`` with cosine decay. Validation runs every epoch; the
best epoch (validation mean per-image Dice at 0.5, closest to the evaluation metric) is kept
and early stopping (``patience``; 0 turns it off) ends phase two.

The input pipeline (decoded images, augmented batches, validation pairs) is in
:mod:`batchmask.training_batches`, the callbacks and ``history.csv`` in
:mod:`batchmask.training_callbacks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (
    ResumeError,
    TrainState,
    best_weights_path,
    load_state,
    restore_optimizer,
    restore_weights,
)
from .checkpoint import (
    clear as clear_resume_state,
)
from .config import ModelConfig, TrainConfig
from .data import (
    DataError,
    DataSource,
    Sample,
    as_sources,
    fingerprint,
    is_samples,
    split_samples,
)
from .sources import load_datasets
from .training_batches import (  # noqa: F401  (defined there, part of this module's interface)
    _batch,
    _cache_images,
    _fixed_pairs,
    _make_sequence,
)
from .training_callbacks import (
    MONITOR,
    early_stopping,
    epoch_state,
    plot_history,
    time_limit_callback,
    write_history,
)

log = logging.getLogger(__name__)



class OutputExistsError(FileExistsError):
    """The output directory already holds a model and ``force`` was not given."""


@dataclass
class TrainResult:
    out_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    #: model.json's ``training.init_from`` (the starting model and its validation figures), if any.
    init_from: dict[str, Any] | None = None


def _load(data, limit: int | None, labels=None) -> tuple[list[Sample], list[dict]]:
    if is_samples(data):
        return list(data), [{"path": "<samples>", "images": len(data), "fingerprint": fingerprint(data)}]
    return load_datasets(data, limit=limit, labels=labels)


def _path_field(sources: list[dict]) -> str | list[str]:
    """model.json's ``data.path``: a string for one source (as before), a list for several."""
    paths = [src["path"] for src in sources]
    return paths[0] if len(paths) == 1 else paths


def _load_split(data, val_data, cfg: TrainConfig, limit: int | None):
    samples, sources = _load(data, limit, cfg.labels)
    if val_data is not None:
        val, val_sources = _load(val_data, limit, cfg.labels)
        split = {"method": "separate", "val_data": _path_field(val_sources), "val_sources": val_sources}
        return samples, val, split, sources
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    tr_idx, va_idx = split_samples(samples, cfg.val_fraction, seed, by=cfg.split)
    split = {"method": cfg.split, "seed": seed, "val_fraction": cfg.val_fraction}
    return [samples[i] for i in tr_idx], [samples[i] for i in va_idx], split, sources


def train(
    data: DataSource | Sequence[DataSource] | list[Sample],
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    val_data: DataSource | Sequence[DataSource] | list[Sample] | None = None,
    force: bool = False,
    limit: int | None = None,
    progress: bool = True,
    command: str | None = None,
) -> TrainResult:
    """Train a face-mask U-Net and write the model directory ``out``.

    ``data`` is an ``images.npy`` file or a WIDER FACE folder, a list of those (trained on
    together), or a list of samples; ``val_data`` likewise (default: a split of ``data``).
    ``config.init_from`` starts from a trained model's weights instead of ImageNet's.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    out_dir = Path(out)
    from .inference import MODEL_FILE

    if (out_dir / MODEL_FILE).exists() and not force:
        raise OutputExistsError(f"{out_dir} already holds a model; pass --force to overwrite it")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    args = {"config": cfg.to_dict(), "data": _source_args(data), "val_data": _source_args(val_data),
            "limit": limit, "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    clear_resume_state(out_dir)  # a new training never continues an older one's state
    return _train(data, val_data, out_dir, cfg, TrainState(0, "", [], args), progress)


def resume(out: str | os.PathLike, *, time_limit_s: float | None = None, progress: bool = True,
           data: DataSource | Sequence[DataSource] | list[Sample] | None = None,
           val_data: DataSource | Sequence[DataSource] | list[Sample] | None = None) -> TrainResult:
    """Continue the training saved in ``out`` (``batchmask train --resume OUT``) at its next epoch,
    with the same data, configuration and schedule; ``time_limit_s`` bounds this sitting.

    ``data``/``val_data`` are needed only for a training started from in-memory samples.
    """
    out_dir = Path(out)
    state = load_state(out_dir)
    cfg = dataclasses.replace(TrainConfig.from_dict(state.args["config"]), time_limit_s=time_limit_s)
    data = data if data is not None else state.args["data"]
    val_data = val_data if val_data is not None else state.args["val_data"]
    if data is None:
        raise ResumeError(f"{out_dir}: this training was started from in-memory samples; "
                                     "pass them again (resume(out, data=...))")
    log.info("resuming %s after epoch %d of %d", out_dir, state.epoch, cfg.epochs)
    return _train(data, val_data, out_dir, cfg, state, progress)


def _source_args(data) -> list[str] | None:
    """Data sources as resume can find them again (absolute paths); None for in-memory samples."""
    if data is None or is_samples(data):
        return None
    return [str(Path(p).resolve()) for p in as_sources(data)]


def _train(data, val_data, out_dir: Path, cfg: TrainConfig, state: TrainState, progress: bool) -> TrainResult:
    t0 = time.time()
    deadline = t0 + cfg.time_limit_s if cfg.time_limit_s else None
    train_s, val_s, split, sources = _load_split(data, val_data, cfg, state.args["limit"])
    if not train_s or not val_s:
        raise DataError(f"empty split: {len(train_s)} training and {len(val_s)} validation images")
    fp = fingerprint(train_s + val_s)
    if state.epoch and state.extra.get("fingerprint") != fp:
        raise ResumeError(f"{out_dir}: the training data changed since the saved epoch "
                                     f"(fingerprint {fp[:12]}, saved {str(state.extra.get('fingerprint'))[:12]})")
    state.extra["fingerprint"] = fp
    log.info("training on %d images, validating on %d", len(train_s), len(val_s))

    import keras

    from .inference import FaceMaskModel, base_meta, save_model
    from .model import build_unet, model_cost

    keras.utils.set_random_seed(cfg.seed)
    size, crop = cfg.model.image_size, cfg.train_size
    # Keep enough pixels for the smallest crops at full resolution and for validation at size.
    max_side = max(round(crop / cfg.augment.crop_scale[0]) if cfg.augment.enabled else crop, size, 256)
    tr_images, tr_boxes = _cache_images(train_s, max_side, "decoding training images", progress)
    va_images, va_boxes = _cache_images(val_s, max_side, "decoding validation images", progress)
    train_seq = _make_sequence(tr_images, tr_boxes, cfg, workers=min(4, os.cpu_count() or 1))
    val_xy = _fixed_pairs(va_images, va_boxes, size, cfg.batch_size, cfg.small_face_weight)

    # Crops smaller than the inference size: train on crops, validate whole images at size.
    fresh = cfg.init_from is None and not state.epoch
    net = build_unet(cfg.model, backbone_weights=cfg.backbone_weights if fresh else None, any_size=crop != size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state.epoch:
        restore_weights(out_dir, net)
    elif cfg.init_from is not None:
        state.extra["init_from"] = _init_from(net, cfg, val_s)
    warmup = min(cfg.warmup_epochs, cfg.epochs) if cfg.model.trainable_blocks > 0 else cfg.epochs
    complete = _fit(net, train_seq, val_xy, cfg, warmup, out_dir, state, deadline, progress)
    history = state.history
    best = max(history, key=lambda r: r.get(MONITOR, -1.0))
    meta = base_meta(cfg.model)
    meta.update(_training_meta(cfg, state.args["command"], history, best, state.elapsed_s, sources, split,
                               train_s, val_s))
    if state.extra.get("init_from"):
        meta["training"]["init_from"] = state.extra["init_from"]
    # Save a fresh, uncompiled copy: the optimizer state would double the file size.
    clean = build_unet(cfg.model, backbone_weights=None)
    clean.set_weights(net.get_weights())
    meta["cost"] = model_cost(clean)
    save_model(clean, out_dir, meta)
    write_history(out_dir / "history.csv", history)
    plot_history(out_dir / "learning_curves.png", history, warmup + 1 if 0 < warmup < cfg.epochs else None)
    if complete:
        clear_resume_state(out_dir)
    else:
        log.warning("stopped after epoch %d of %d; continue with: batchmask train --resume %s",
                    len(history), cfg.epochs, out_dir)

    result = TrainResult(out_dir=out_dir, history=history, best_epoch=int(best["epoch"]),
                         init_from=state.extra.get("init_from"))
    result.metrics = _final_validation(FaceMaskModel(clean, meta, out_dir), val_s, cfg)
    result.wall_s = time.time() - t0
    log.info("trained in %.0f s; best epoch %d", result.wall_s, result.best_epoch)
    return result


def _init_from(net, cfg: TrainConfig, val_s: list[Sample]) -> dict[str, Any]:
    """Load the starting model's weights into ``net``; its record for model.json, with its
    validation figures on this training's validation images (the gain is then visible)."""
    import keras

    from .evaluation import evaluate
    from .finetune import check_architecture, resolve_start, start_record
    from .inference import MODEL_FILE, FaceMaskModel, read_meta

    start_dir = resolve_start(cfg.init_from)
    start_meta = read_meta(start_dir)
    start_cfg = ModelConfig.from_dict(start_meta.get("model", {}))
    check_architecture(start_cfg, cfg.model, start_dir)
    start_net = keras.saving.load_model(start_dir / MODEL_FILE, compile=False)
    net.set_weights(start_net.get_weights())
    record = start_record(start_dir)
    log.info("starting from %s; scoring it on the validation images first", start_dir)
    res = evaluate(FaceMaskModel(start_net, start_meta, None), val_s, tune_threshold=cfg.tune_threshold,
                   batch_size=cfg.batch_size, store_threshold=False)
    record["validation"] = res.metrics
    log.info("starting model: validation Dice %.4f at threshold %.2f", res.metrics.get("dice", float("nan")),
             res.metrics.get("threshold", float("nan")))
    return record


@dataclass
class _Phase:
    name: str
    start: int
    stop: int
    learning_rate: float
    finetune: bool


def _phases(cfg: TrainConfig, warmup: int) -> list[_Phase]:
    phases = [_Phase("decoder", 0, warmup, cfg.learning_rate, False)]
    if warmup < cfg.epochs:
        phases.append(_Phase("finetune", warmup, cfg.epochs, cfg.learning_rate * cfg.finetune_lr_scale, True))
    return [p for p in phases if p.stop > p.start]


def _fit(net, train_seq, val_xy, cfg: TrainConfig, warmup: int, out_dir: Path, state: TrainState,
         deadline: float | None, progress: bool) -> bool:
    """Run the training phases from epoch ``state.epoch`` on (decoder only for ``warmup`` epochs,
    then fine-tuning), saving the resume state after every epoch; ``net`` ends with the weights of
    the best epoch and ``state.history`` with one row per epoch. True when no time limit cut it."""
    import keras

    from .losses import dice_at_half, dice_metric, get_loss, mask_only
    from .model import set_trainable

    best_file = best_weights_path(out_dir)
    best_file.parent.mkdir(parents=True, exist_ok=True)
    weighted = cfg.small_face_weight > 1.0
    loss = get_loss(cfg.loss, per_image=cfg.dice_per_image, weighted=weighted)
    metrics = [mask_only(m) for m in (dice_metric, dice_at_half)] if weighted else [dice_metric, dice_at_half]
    steps = len(train_seq)
    timer = time_limit_callback(deadline)
    sitting_start, elapsed_before = time.time(), state.elapsed_s
    for ph in _phases(cfg, warmup):
        if ph.stop <= state.epoch:
            continue
        set_trainable(net, cfg.model, finetune=ph.finetune)
        schedule = keras.optimizers.schedules.CosineDecay(ph.learning_rate, decay_steps=max(1, (ph.stop - ph.start) * steps),
                                                          alpha=0.05)
        net.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=metrics)
        first = max(ph.start, state.epoch)
        if first > ph.start:  # continue this phase: its optimizer (schedule position, moments)
            restore_optimizer(out_dir, net, net.optimizer)
        train_seq.set_epoch(first)
        best, _ = state.best(MONITOR)
        callbacks: list = [
            keras.callbacks.ModelCheckpoint(str(best_file), monitor=MONITOR, mode="max", save_best_only=True,
                                            save_weights_only=True, initial_value_threshold=best),
            epoch_state(out_dir, state, ph.name, schedule, lambda: elapsed_before + time.time() - sitting_start),
            timer,
        ]
        if ph.finetune and cfg.patience > 0:
            callbacks.append(early_stopping(state, cfg.patience))
        log.info("phase %s: epochs %d..%d, learning rate %.2g", ph.name, first + 1, ph.stop, ph.learning_rate)
        net.fit(train_seq, validation_data=val_xy, validation_batch_size=min(cfg.batch_size, len(val_xy[0])),
                epochs=ph.stop, initial_epoch=first, callbacks=callbacks, verbose=1 if progress else 0)
        if timer.hit:
            break
    state.elapsed_s = elapsed_before + time.time() - sitting_start
    if best_file.exists():
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.simplefilter("ignore")
            net.load_weights(str(best_file))
    return not timer.hit or len(state.history) >= cfg.epochs


def _training_meta(cfg: TrainConfig, command: str | None, history: list[dict[str, Any]], best: dict[str, Any],
                   train_wall: float, sources: list[dict], split: dict, train_s: list[Sample],
                   val_s: list[Sample]) -> dict[str, Any]:
    """model.json's ``training``, ``data`` and ``metrics`` (the best epoch's) for a trained model."""
    return {
        "training": {
            "config": cfg.to_dict(),
            "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "epochs_run": len(history),
            "best_epoch": int(best["epoch"]),
            "wall_s": round(train_wall, 1),
        },
        "data": {
            "path": _path_field(sources),
            "sources": sources,
            "fingerprint": fingerprint(train_s + val_s),
            "train_images": len(train_s),
            "val_images": len(val_s),
            "train_faces": int(sum(len(s.boxes) for s in train_s)),
            "split": {**split, "val_names": [s.name for s in val_s]},
        },
        "metrics": {"best_epoch": {k: v for k, v in best.items() if k != "phase"}},
    }


def _final_validation(model, val_s: list[Sample], cfg: TrainConfig) -> dict[str, Any]:
    """Score the in-memory model on the validation images at original size; tune the threshold.

    ``model`` is the saved network as a FaceMaskModel, so it is not loaded from disk again.
    """
    from .evaluation import evaluate
    from .inference import write_meta

    res = evaluate(model, val_s, tune_threshold=cfg.tune_threshold, batch_size=cfg.batch_size)
    model.meta["metrics"]["validation"] = res.metrics  # model.meta includes any tuned threshold
    model.meta["metrics"]["validation_by_face_size"] = res.by_face_size
    model.meta["metrics"]["validation_by_group"] = res.by_group
    write_meta(model.path, model.meta)
    return res.metrics
