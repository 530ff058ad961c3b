"""The U-Net: an ImageNet MobileNet encoder with skip connections and a Conv-BN-ReLU decoder.

Written against the Keras 3 API only (``import keras``), so the same code builds and trains
under the TensorFlow, JAX or PyTorch backends.

The model takes RGB pixels in 0..255 (float) and scales them to MobileNet's -1..1 itself,
so callers never have to know the preprocessing. It outputs a sigmoid face probability per
pixel at the input resolution.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras

from .config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build an encoder and where its skip connections come from."""

    builder: str
    #: Layers whose outputs feed the decoder, deepest first: strides 16, 8, 4, 2.
    skips: tuple[str, ...]
    #: The encoder's last layer (stride 32).
    bottleneck: str
    #: Regular expression matching encoder layers; group "block" is the block number.
    layer_pattern: str
    blocks: int
    imagenet_alphas: tuple[float, ...]
    imagenet_sizes: tuple[int, ...]


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet": BackboneSpec(
        builder="MobileNet",
        skips=("conv_pw_11_relu", "conv_pw_5_relu", "conv_pw_3_relu", "conv_pw_1_relu"),
        bottleneck="conv_pw_13_relu",
        layer_pattern=r"^conv(1|_(dw|pw|pad)_(?P<block>\d+))(_bn|_relu)?$",
        blocks=13,
        imagenet_alphas=(0.25, 0.5, 0.75, 1.0),
        imagenet_sizes=(128, 160, 192, 224),
    ),
}


class WeightsError(RuntimeError):
    """The backbone's pretrained weights could not be loaded; the message says what to do."""


def keras_cache_dir() -> Path:
    """Where Keras looks for downloaded weights (``$KERAS_HOME/models``, read when Keras loads)."""
    try:
        from keras.src.backend import config as keras_config

        return Path(keras_config.keras_home()) / "models"
    except Exception:  # private API moved: fall back to the documented default
        return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def imagenet_weight_file(alpha: float, image_size: int) -> str:
    """The file name Keras downloads for MobileNet v1 without top."""
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
    rows = image_size if image_size in BACKBONES["mobilenet"].imagenet_sizes else 224
    return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"


def _example_weight_file(alpha: float) -> str:
    try:
        return imagenet_weight_file(alpha, 224)
    except KeyError:  # no ImageNet file exists for this alpha
        return "mobilenet_<alpha>_224_tf_no_top.h5"


def _build_encoder(spec: BackboneSpec, cfg: ModelConfig, x, weights: str | None) -> keras.Model:
    builder = getattr(keras.applications, spec.builder)
    kwargs = dict(include_top=False, alpha=cfg.alpha, input_tensor=x)
    if weights == "imagenet":
        if cfg.alpha not in spec.imagenet_alphas:
            raise WeightsError(
                f"ImageNet weights exist only for alpha in {spec.imagenet_alphas}, not {cfg.alpha}"
            )
        fname = imagenet_weight_file(cfg.alpha, cfg.image_size)
        try:
            with warnings.catch_warnings():
                # The 224 weights fit every input size (convolutions only); Keras warns anyway.
                warnings.filterwarnings("ignore", message=".*input_shape. is undefined or non-square")
                return builder(weights="imagenet", **kwargs)
        except Exception as exc:  # keras raises a bare Exception on download failure
            raise WeightsError(
                f"could not load ImageNet weights for MobileNet alpha={cfg.alpha} ({exc}).\n"
                f"Keras downloads {fname} on first use; without network access either\n"
                f"  * pass the file: --backbone-weights /path/to/{fname}, or\n"
                f"  * put it into the Keras cache: {keras_cache_dir() / fname} (set KERAS_HOME to move it), or\n"
                f"  * train from scratch with --backbone-weights none (much worse results)."
            ) from exc
    encoder = builder(weights=None, **kwargs)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"backbone weights file {path} does not exist")
        try:
            # Legacy HDF5 files load in layer order; the weights do not depend on input size.
            encoder.load_weights(str(path))
        except Exception as exc:
            raise WeightsError(
                f"{path}: not MobileNet weights for alpha={cfg.alpha} without top ({exc}). "
                f"Expected a file like {_example_weight_file(cfg.alpha)}."
            ) from exc
        log.info("loaded backbone weights from %s", path)
    return encoder


def conv_bn_relu(x, filters: int, name: str, block: str = "conv"):
    """A 3x3 convolution (full, or depthwise-separable for ``block="sepconv"``), BN, ReLU."""
    if block == "sepconv":
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_dw")(x)
        x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_conv")(x)
    else:
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    # momentum 0.9: moving statistics settle within a few hundred steps on small datasets.
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_unet(cfg: ModelConfig, backbone_weights: str | None = "imagenet", any_size: bool = False) -> keras.Model:
    """Build the U-Net for ``cfg``; ``backbone_weights`` is "imagenet", a file path or None.

    The decoder has ``len(cfg.decoder_filters)`` stages, each upsampling by 2 and joining the
    encoder's skip connection of that stride; with fewer than five stages the logits are
    upsampled bilinearly to the input size (the mask is resized to the photo's size anyway).
    ``any_size`` leaves the input's height and width open (any multiple of 32), as training
    on crops smaller than ``cfg.image_size`` needs; saved models have the fixed size.
    """
    cfg.validate()
    spec = BACKBONES[cfg.backbone]
    side = None if any_size else cfg.image_size
    inputs = keras.Input((side, side, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(inputs)
    encoder = _build_encoder(spec, cfg, x, None if backbone_weights in (None, "none") else backbone_weights)
    x = encoder.get_layer(spec.bottleneck).output
    if cfg.decoder_projection:
        x = keras.layers.Conv2D(cfg.decoder_projection, 1, use_bias=False, name="decoder_proj_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name="decoder_proj_bn")(x)
        x = keras.layers.ReLU(name="decoder_proj_relu")(x)
    skips = [encoder.get_layer(n).output for n in spec.skips] + [None]
    for i, filters in enumerate(cfg.decoder_filters):
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"decoder{i}_up")(x)
        if skips[i] is not None:
            x = keras.layers.Concatenate(name=f"decoder{i}_concat")([x, skips[i]])
        x = conv_bn_relu(x, filters, f"decoder{i}a", cfg.decoder_block)
        x = conv_bn_relu(x, filters, f"decoder{i}b", cfg.decoder_block)
    factor = 2 ** (len(spec.skips) + 1 - len(cfg.decoder_filters))
    if factor == 1:
        outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask", dtype="float32")(x)
    else:
        x = keras.layers.Conv2D(1, 1, name="logits", dtype="float32")(x)
        x = keras.layers.UpSampling2D(factor, interpolation="bilinear", name="logits_up", dtype="float32")(x)
        outputs = keras.layers.Activation("sigmoid", name="mask", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"unet_{cfg.backbone}_{cfg.alpha}")
    set_trainable(model, cfg, finetune=True)
    return model


def layer_macs(layer) -> int:
    """Multiply-accumulates of one layer for one image (0 for layers not counted)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel.shape[:2]
        per_output = kh * kw
    elif isinstance(layer, keras.layers.Conv2D):
        kh, kw, c_in = layer.kernel.shape[:3]
        per_output = kh * kw * c_in
    elif isinstance(layer, keras.layers.Dense):
        per_output = layer.kernel.shape[0]
    else:
        return 0
    dims = layer.output.shape[1:]
    if any(d is None for d in dims):
        raise ValueError(f"counting multiply-adds needs a fixed input size ({layer.name}: {layer.output.shape})")
    return int(math.prod(dims)) * int(per_output)


def count_macs(model: keras.Model, prefix: str | None = None) -> int:
    """Multiply-accumulates of one forward pass for one image.

    Counts convolutions (full, depthwise, pointwise) and dense layers, which dominate; bias
    adds, batch norm, activations, resizing and concatenation are left out (well under 1%
    here). ``prefix`` restricts the count to layers whose name starts with it ("decoder").
    """
    return sum(layer_macs(ly) for ly in model.layers if prefix is None or ly.name.startswith(prefix))


def model_cost(model: keras.Model) -> dict[str, int]:
    """What one image costs and what the file holds: model.json's ``cost``."""
    return {"multiply_adds": count_macs(model), "decoder_multiply_adds": count_macs(model, "decoder"),
            "parameters": int(model.count_params())}


def encoder_block(layer_name: str, backbone: str = "mobilenet") -> int | None:
    """Block number of an encoder layer (0 for the stem), or None for decoder layers."""
    m = re.match(BACKBONES[backbone].layer_pattern, layer_name)
    if not m:
        return None
    return int(m.group("block")) if m.group("block") else 0


def set_trainable(model: keras.Model, cfg: ModelConfig, finetune: bool) -> None:
    """Freeze the encoder; with ``finetune`` unfreeze its last ``cfg.trainable_blocks`` blocks.

    Encoder batch-norm layers stay frozen (inference mode) in both phases: their ImageNet
    statistics are better than those from small segmentation batches.
    """
    spec = BACKBONES[cfg.backbone]
    first = spec.blocks - cfg.trainable_blocks + 1 if finetune else spec.blocks + 1
    for layer in model.layers:
        block = encoder_block(layer.name, cfg.backbone)
        if block is None:
            layer.trainable = True
        else:
            layer.trainable = block >= first and not isinstance(layer, keras.layers.BatchNormalization)
