"""Configuration dataclasses shared by training, inference and the batch runner.

Everything a trained model needs at inference time lives in :class:`ModelConfig` and is
written to ``model.json`` beside the ``.keras`` file, so ``batchmask run`` never has to
guess how a model was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEFAULT_IMAGE_SIZE = 224
DEFAULT_ALPHA = 1.0
DEFAULT_TRAINABLE_BLOCKS = 4
DEFAULT_THRESHOLD = 0.5

#: Named decoders (``--decoder``): block type, filters per stage (deepest first; fewer than
#: five stages stop at a coarser resolution and upsample the logits bilinearly) and the width
#: of the 1x1 projection of the encoder's last features (0 = none). See docs/experiments.md.
DECODERS: dict[str, dict[str, Any]] = {
    # The original U-Net decoder: two full 3x3 convolutions per stage down to the input size.
    # 13.6 G multiply-adds at 512x512, 82% of the network.
    "unet": {"decoder_block": "conv", "decoder_filters": (192, 128, 64, 32, 16), "decoder_projection": 0},
    # Depthwise-separable stages after a 1x1 projection, stopping at half the input size.
    "lean": {"decoder_block": "sepconv", "decoder_filters": (128, 64, 48, 24), "decoder_projection": 128},
    # The same, stopping at a quarter of the input size.
    "lean4": {"decoder_block": "sepconv", "decoder_filters": (128, 64, 48), "decoder_projection": 128},
    # The same with a fifth stage at the full input size: a finer output for small faces.
    "lean1": {"decoder_block": "sepconv", "decoder_filters": (128, 64, 48, 24, 16), "decoder_projection": 128},
}
DEFAULT_DECODER = "lean"
#: What model.json files written before the decoder was configurable mean.
LEGACY_DECODER = "unet"


@dataclass
class ModelConfig:
    """How the network is built and how its inputs and outputs are interpreted."""

    backbone: str = "mobilenet"
    alpha: float = DEFAULT_ALPHA
    image_size: int = DEFAULT_IMAGE_SIZE
    #: "conv" (two 3x3 Conv-BN-ReLU per stage) or "sepconv" (two depthwise-separable ones).
    decoder_block: str = DECODERS[DEFAULT_DECODER]["decoder_block"]
    #: Filters per decoder stage, deepest first; stage i works at 1/2**(4-i) of the input size,
    #: so four stages end at half the input size and five at the full size.
    decoder_filters: tuple[int, ...] = DECODERS[DEFAULT_DECODER]["decoder_filters"]
    #: Width of a 1x1 projection of the encoder's deepest features before the decoder; 0 = none.
    decoder_projection: int = DECODERS[DEFAULT_DECODER]["decoder_projection"]
    #: Number of the encoder's last blocks left trainable during fine-tuning.
    trainable_blocks: int = DEFAULT_TRAINABLE_BLOCKS
    #: Probability above which a pixel counts as face.
    threshold: float = DEFAULT_THRESHOLD
    #: Average the prediction with that of the horizontally flipped image.
    tta_flip: bool = False

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and at least 32, got {self.image_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.trainable_blocks < 0:
            raise ValueError(f"trainable_blocks must be >= 0, got {self.trainable_blocks}")
        if self.decoder_block not in ("conv", "sepconv"):
            raise ValueError(f"decoder_block must be 'conv' or 'sepconv', got {self.decoder_block!r}")
        if not 1 <= len(self.decoder_filters) <= 5 or min(self.decoder_filters) < 1:
            raise ValueError(f"decoder_filters needs 1 to 5 positive entries, got {self.decoder_filters}")
        if self.decoder_projection < 0:
            raise ValueError(f"decoder_projection must be >= 0, got {self.decoder_projection}")

    @classmethod
    def with_decoder(cls, name: str, **kwargs: Any) -> ModelConfig:
        """A config using the named decoder of :data:`DECODERS`."""
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r} (choose from {', '.join(DECODERS)})")
        return cls(**{**DECODERS[name], **kwargs})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_filters"] = list(self.decoder_filters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        # A model.json from before the decoder was configurable describes the U-Net decoder.
        legacy = {k: v for k, v in DECODERS[LEGACY_DECODER].items() if k not in d}
        kwargs = {**legacy, **{k: v for k, v in d.items() if k in names}}
        if "decoder_filters" in kwargs:
            kwargs["decoder_filters"] = tuple(kwargs["decoder_filters"])
        return cls(**kwargs)


@dataclass
class AugmentConfig:
    """Training-time augmentation; boxes and masks are transformed together."""

    enabled: bool = True
    #: Fraction of the image side kept by the random crop (min, max).
    crop_scale: tuple[float, float] = (0.5, 1.0)
    #: Random aspect-ratio change of the crop window (min, max).
    crop_aspect: tuple[float, float] = (0.8, 1.25)
    hflip: bool = True
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25


@dataclass
class LabelOptions:
    """How face boxes are picked out of multi-class label files (``train --category`` etc.)."""

    #: COCO: the category whose boxes are faces (matched by name, case-insensitively).
    category: str = "face"
    #: YOLO: the class number whose boxes are faces.
    class_id: int = 0
    #: COCO: the folder that ``file_name`` is relative to (default: beside the JSON, or its images/).
    images: str | None = None


@dataclass
class TrainConfig:
    """Everything ``batchmask train`` does, recorded verbatim in ``model.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backbone_weights: str = "imagenet"
    epochs: int = 30
    #: Epochs trained with the whole encoder frozen before fine-tuning the last blocks.
    warmup_epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 1e-3
    #: Learning rate multiplier for the fine-tuning phase.
    finetune_lr_scale: float = 0.1
    loss: str = "bce_dice"
    #: Dice term of the loss averaged over images (True) or over the batch's pixels (False).
    #: Per image matches the evaluation metric: an image with one small face counts as much
    #: as a crowd.
    dice_per_image: bool = False
    #: Loss weight of the pixels of faces under 32x32 pixels of the training input, in inverse
    #: proportion to the face's area and at most this (1 = every pixel weighs the same).
    small_face_weight: float = 1.0
    #: Side of the square training crops; None trains at ``model.image_size``. Crops are
    #: ``augment.crop_scale`` of the image side, so with crop_size < image_size the faces
    #: seen in training match the scale at which ``image_size`` inference sees them, at a
    #: fraction of the training cost.
    crop_size: int | None = None
    val_fraction: float = 0.2
    #: "random" or "event" (hold out whole WIDER event folders).
    split: str = "random"
    seed: int = 42
    #: Seed of the train/validation split; None = ``seed``. Set it to vary the initialisation and
    #: augmentation (``seed``) while validating on the same images.
    split_seed: int | None = None
    #: Fine-tuning ends after this many epochs without a better ``val_dice_t50``; 0 = never.
    patience: int = 8
    tune_threshold: bool = True
    #: Stop training (keeping the best epoch so far) after this many seconds; None = no limit.
    time_limit_s: float | None = None
    #: The trained model this training starts from (``--init-from``); None = ImageNet encoder
    #: weights (``backbone_weights``) and a fresh decoder.
    init_from: str | None = None
    labels: LabelOptions = field(default_factory=LabelOptions)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys, from other versions, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["model"] = ModelConfig.from_dict(d.get("model", {}))
        aug = {k: tuple(v) if isinstance(v, list) else v for k, v in (d.get("augment") or {}).items()
               if k in {f.name for f in dataclasses.fields(AugmentConfig)}}
        kwargs["augment"] = AugmentConfig(**aug)
        kwargs["labels"] = LabelOptions(**(d.get("labels") or {}))
        return cls(**kwargs)

    @property
    def train_size(self) -> int:
        return self.crop_size or self.model.image_size

    def validate(self) -> None:
        self.model.validate()
        if self.crop_size is not None and (self.crop_size < 32 or self.crop_size % 32):
            raise ValueError(f"crop_size must be a multiple of 32 and at least 32, got {self.crop_size}")
        if self.small_face_weight < 1.0:
            raise ValueError(f"small_face_weight must be at least 1, got {self.small_face_weight}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d
