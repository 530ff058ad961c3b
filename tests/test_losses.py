"""Dice metric and losses against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from batchmask.losses import bce_dice_loss, dice_coefficient, dice_loss, get_loss


def f(x) -> float:
    return float(np.asarray(x))


# Two 2x2 images. Image 0: truth 2 px, prediction covers 1 of them + 1 other. Image 1: empty both.
T = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], np.float32)
P = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], np.float32)


def test_batch_dice_hand_values():
    # inter = 1, sum(t) = 2, sum(p) = 2 -> (2*1 + s) / (4 + s)
    assert f(dice_coefficient(T, P, smooth=0.0)) == pytest.approx(0.5)
    assert f(dice_coefficient(T, P, smooth=1.0)) == pytest.approx(3 / 5)


def test_per_image_dice_hand_values():
    # image 0: (2+1)/(4+1) = 0.6; image 1 (both empty): (0+1)/(0+1) = 1 -> mean 0.8
    assert f(dice_coefficient(T, P, smooth=1.0, per_image=True)) == pytest.approx(0.8)


def test_empty_masks():
    z = np.zeros((1, 3, 3), np.float32)
    one = np.ones((1, 3, 3), np.float32)
    assert f(dice_coefficient(z, z)) == pytest.approx(1.0)
    assert f(dice_coefficient(z, one, smooth=1.0)) == pytest.approx(1 / 10)  # all false positives
    assert f(dice_coefficient(one, z, smooth=1.0, per_image=True)) == pytest.approx(1 / 10)
    assert f(dice_loss(z, z)) == pytest.approx(0.0)


def test_soft_and_threshold():
    t = np.array([[[1.0, 0.0]]], np.float32)
    p = np.array([[[0.6, 0.4]]], np.float32)
    # soft: inter 0.6, sums 1 + 1 -> (1.2 + 0) / 2 = 0.6
    assert f(dice_coefficient(t, p, smooth=0.0)) == pytest.approx(0.6)
    # at threshold 0.5 the prediction is exactly the truth
    assert f(dice_coefficient(t, p, smooth=0.0, threshold=0.5)) == pytest.approx(1.0)
    # at 0.7 nothing is predicted: (0 + 1) / (1 + 0 + 1)
    assert f(dice_coefficient(t, p, smooth=1.0, threshold=0.7)) == pytest.approx(0.5)


def test_channel_axis_is_ignored():
    assert f(dice_coefficient(T[..., None], P[..., None], smooth=0.0)) == pytest.approx(0.5)


def test_bce_dice_is_sum_of_parts():
    t = np.array([[[1.0, 0.0]]], np.float32)
    p = np.array([[[0.8, 0.1]]], np.float32)
    bce = -(np.log(0.8) + np.log(0.9)) / 2
    dl = 1 - (2 * 0.8 + 1) / (1 + 0.9 + 1)
    assert f(bce_dice_loss(t, p)) == pytest.approx(bce + dl, rel=1e-4)
    assert f(get_loss("bce_dice")(t, p)) == pytest.approx(bce + dl, rel=1e-4)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("focal")


def test_get_loss_per_image_uses_the_per_image_dice():
    # bce is the same either way; the Dice terms differ: batch 1 - 3/5, per image 1 - 0.8
    batch, per_image = f(get_loss("bce_dice")(T, P)), f(get_loss("bce_dice", per_image=True)(T, P))
    assert batch - per_image == pytest.approx((1 - 3 / 5) - (1 - 0.8), rel=1e-4)
