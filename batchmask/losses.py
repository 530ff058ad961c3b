"""Dice coefficient, Dice loss and BCE + Dice, written with ``keras.ops``.

All functions take ``y_true`` (0/1) and ``y_pred`` (probabilities) of shape
(batch, H, W[, 1]) and accept NumPy arrays as well as backend tensors.

Dice = (2 * sum(t * p) + smooth) / (sum(t) + sum(p) + smooth)

* ``per_image=False`` (batch Dice): the sums run over the whole batch, one value per batch.
  This is the "global soft Dice" of the original exercise.
* ``per_image=True``: one Dice per image, then the mean. An image with no face whose
  prediction is also empty scores 1 (thanks to ``smooth``), so empty images are neither
  free wins nor impossible.
* ``threshold``: binarise ``y_pred`` first (``p >= threshold``); ``None`` keeps soft Dice.

``smooth`` (default 1.0, in pixels) keeps the ratio defined for empty masks and softens the
gradient for tiny ones.

``weights`` (same shape as ``y_true``, optional) weighs pixels in the sums of the Dice and in
the mean of the cross-entropy: Dice = (2 * sum(w * t * p) + smooth) / (sum(w * t) +
sum(w * p) + smooth). Training with ``--small-face-weight`` passes weights packed as a
second channel of ``y_true`` (:func:`get_loss` with ``weighted=True``, :func:`mask_only`).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

DEFAULT_SMOOTH = 1.0


def _flat(v, n):
    return ops.reshape(ops.cast(ops.convert_to_tensor(v), "float32"), (n, -1))


def _prepare(y_true, y_pred, threshold: float | None):
    y_true = ops.cast(ops.convert_to_tensor(y_true), "float32")
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    if threshold is not None:
        y_pred = ops.cast(y_pred >= threshold, "float32")
    n = ops.shape(y_true)[0]
    return ops.reshape(y_true, (n, -1)), ops.reshape(y_pred, (n, -1))


def dice_coefficient(
    y_true,
    y_pred,
    smooth: float = DEFAULT_SMOOTH,
    per_image: bool = False,
    threshold: float | None = None,
    weights=None,
):
    """Dice coefficient (a scalar): batch-wise or the mean of per-image values."""
    t, p = _prepare(y_true, y_pred, threshold)
    w = 1.0 if weights is None else _flat(weights, ops.shape(t)[0])
    axis = 1 if per_image else None
    inter = ops.sum(w * t * p, axis=axis)
    total = ops.sum(w * t, axis=axis) + ops.sum(w * p, axis=axis)
    return ops.mean((2.0 * inter + smooth) / (total + smooth))


def dice_loss(y_true, y_pred, smooth: float = DEFAULT_SMOOTH, per_image: bool = False, weights=None):
    """1 - soft Dice."""
    return 1.0 - dice_coefficient(y_true, y_pred, smooth=smooth, per_image=per_image, weights=weights)


def _bce(t, p, weights):
    bce = keras.losses.binary_crossentropy(ops.reshape(t, (-1, 1)), ops.reshape(p, (-1, 1)))
    if weights is None:
        return ops.mean(bce)
    return ops.mean(bce * ops.reshape(ops.cast(ops.convert_to_tensor(weights), "float32"), (-1,)))


def bce_dice_loss(y_true, y_pred, smooth: float = DEFAULT_SMOOTH, per_image: bool = False, bce_weight: float = 1.0,
                  weights=None):
    """Binary cross-entropy (mean over pixels) + Dice loss."""
    t = ops.cast(ops.convert_to_tensor(y_true), "float32")
    p = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    return bce_weight * _bce(t, p, weights) + dice_loss(t, p, smooth=smooth, per_image=per_image, weights=weights)


def bce_logdice_loss(y_true, y_pred, smooth: float = DEFAULT_SMOOTH, per_image: bool = False, weights=None):
    """Binary cross-entropy - log(soft Dice): stronger Dice gradient when Dice is low."""
    t = ops.cast(ops.convert_to_tensor(y_true), "float32")
    p = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    dice = dice_coefficient(t, p, smooth=smooth, per_image=per_image, weights=weights)
    return _bce(t, p, weights) - ops.log(dice)


LOSSES: dict[str, Callable] = {
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "bce_logdice": bce_logdice_loss,
}


def get_loss(name: str, per_image: bool = False, weighted: bool = False) -> Callable:
    """The loss called ``name``; ``per_image`` averages its Dice term over images.

    ``weighted``: ``y_true`` carries the mask in channel 0 and per-pixel weights in channel 1.
    """
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None

    def loss(y_true, y_pred):
        if weighted:
            return fn(y_true[..., :1], y_pred, per_image=per_image, weights=y_true[..., 1:2])
        return fn(y_true, y_pred, per_image=per_image)

    loss.__name__ = name
    return loss


def mask_only(metric: Callable) -> Callable:
    """``metric`` for a ``y_true`` that carries weights in channel 1 (scores channel 0 only)."""

    def wrapped(y_true, y_pred):
        return metric(y_true[..., :1], y_pred)

    wrapped.__name__ = metric.__name__
    return wrapped


def dice_metric(y_true, y_pred):
    """Batch soft Dice, as reported during training (``dice`` in history.csv)."""
    return dice_coefficient(y_true, y_pred)


def dice_at_half(y_true, y_pred):
    """Per-image Dice at threshold 0.5 (``dice_t50`` in history.csv)."""
    return dice_coefficient(y_true, y_pred, per_image=True, threshold=0.5)


dice_metric.__name__ = "dice"
dice_at_half.__name__ = "dice_t50"
