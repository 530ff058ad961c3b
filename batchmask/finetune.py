"""Fine-tuning from a trained model (``batchmask train --init-from MODEL_DIR``).

A fine-tuning run takes the starting model's architecture and, unless told otherwise, its
training recipe (input and crop size, loss, augmentation scale, trainable blocks), and starts
from its weights with no decoder-only warm-up and a lower learning rate: the decoder is already
trained, so a warm-up at the from-scratch rate would first undo part of what it learned.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .config import AugmentConfig, ModelConfig, TrainConfig

#: Model fields that decide the weights' shapes: a fine-tuning run must keep them.
ARCHITECTURE_FIELDS = ("backbone", "alpha", "decoder_block", "decoder_filters", "decoder_projection")
#: ``--learning-rate`` when fine-tuning from a model (fine-tuning runs at 0.1x of it, so the peak
#: is half the rate at which the default's encoder blocks were first fine-tuned).
FINETUNE_LEARNING_RATE = 5e-4
FINETUNE_WARMUP_EPOCHS = 0


class InitFromError(ValueError):
    """The starting model cannot be fine-tuned as asked (missing, other architecture)."""


def resolve_start(path: str | os.PathLike) -> Path:
    """The starting model's directory; ``default`` is the model shipped in the package."""
    from .inference import ModelNotFoundError, default_model_dir, resolve_model_dir

    try:
        return resolve_model_dir(default_model_dir() if str(path) == "default" else path)
    except ModelNotFoundError as exc:
        raise InitFromError(f"--init-from: {exc}") from exc


def recipe_from(meta: dict[str, Any]) -> dict[str, Any]:
    """The starting model's recipe as ``TrainConfig`` keyword arguments (the fields a fine-tuning
    run inherits); its own ``model`` section wins over the training config's copy."""
    model = ModelConfig.from_dict(meta.get("model", {}))
    tr = (meta.get("training") or {}).get("config") or {}
    aug = tr.get("augment") or {}
    recipe: dict[str, Any] = {"model": model}
    if "crop_scale" in aug:
        recipe["augment"] = dataclasses.replace(AugmentConfig(), crop_scale=tuple(aug["crop_scale"]))
    for key in ("crop_size", "loss", "dice_per_image", "small_face_weight", "batch_size", "finetune_lr_scale"):
        if key in tr:
            recipe[key] = tr[key]
    return recipe


def check_architecture(start: ModelConfig, cfg: ModelConfig, start_dir: Path) -> None:
    """Raise :class:`InitFromError` naming the first field where ``cfg`` would change the weights'
    shapes."""
    for name in ARCHITECTURE_FIELDS:
        a, b = getattr(start, name), getattr(cfg, name)
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            raise InitFromError(
                f"--init-from {start_dir}: the starting model has {name}={a!r}, this training asks for "
                f"{b!r}; fine-tuning keeps the architecture (drop the option, or train from ImageNet)")


def start_record(start_dir: Path) -> dict[str, Any]:
    """model.json's ``training.init_from``, before the starting model's validation is added."""
    from .inference import MODEL_FILE, default_model_dir
    from .runtime import file_sha256
    from .version import __version__

    # The shipped default's folder is an install path that means nothing elsewhere; the hash and
    # the version say which default it was.
    shipped = start_dir.resolve() == default_model_dir().resolve()
    return {"path": f"default (batchmask {__version__})" if shipped else str(start_dir),
            "model_sha256": file_sha256(start_dir / MODEL_FILE)}


def finetune_config(cfg: TrainConfig, start_dir: Path, start_meta: dict[str, Any], explicit: set[str]) -> TrainConfig:
    """``cfg`` with every field the user did not set (``explicit``: TrainConfig field names, and
    ``model.<field>`` for model fields) taken from the starting model's recipe, and the
    fine-tuning defaults for warm-up and learning rate; ``init_from`` set to ``start_dir``.
    Raises :class:`InitFromError` when an explicit option changes the architecture."""
    recipe = recipe_from(start_meta)
    start_model: ModelConfig = recipe.pop("model")
    model_kwargs = {f.name: getattr(start_model, f.name) for f in dataclasses.fields(ModelConfig)
                    if f"model.{f.name}" not in explicit}
    model = dataclasses.replace(cfg.model, **model_kwargs)
    check_architecture(start_model, model, start_dir)
    kwargs = {k: v for k, v in recipe.items() if k not in explicit}
    if "warmup_epochs" not in explicit:
        kwargs["warmup_epochs"] = FINETUNE_WARMUP_EPOCHS
    if "learning_rate" not in explicit:
        kwargs["learning_rate"] = FINETUNE_LEARNING_RATE
    if "augment" in kwargs:
        kwargs["augment"] = dataclasses.replace(cfg.augment, crop_scale=kwargs["augment"].crop_scale)
    return dataclasses.replace(cfg, model=model, init_from=str(start_dir), **kwargs)
