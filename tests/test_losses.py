"""Dice metric and losses against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from batchmask.losses import bce_dice_loss, dice_coefficient, dice_loss, get_loss, mask_only


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


def test_weighted_dice_and_bce_hand_values():
    """Pixel weights enter every sum of the Dice and the mean of the cross-entropy."""
    # Image 0 with its first truth pixel weighted 3: inter 3, sum(w t) 4, sum(w p) 3 + 1.
    w = np.ones_like(T)
    w[0, 0, 0] = 3.0
    assert f(dice_coefficient(T, P, smooth=0.0, weights=w)) == pytest.approx(6 / 8)
    assert f(dice_coefficient(T, P, smooth=0.0, weights=np.ones_like(T))) == pytest.approx(0.5)  # = unweighted
    # A missed heavy pixel costs more than a missed light one.
    p_miss_heavy = np.array([[[0, 1], [0, 0]], [[0, 0], [0, 0]]], np.float32)
    assert f(dice_coefficient(T, p_miss_heavy, smooth=0.0, weights=w)) == pytest.approx(2 / 5)
    t = np.array([[[1.0, 0.0]]], np.float32)
    p = np.array([[[0.8, 0.1]]], np.float32)
    wt = np.array([[[2.0, 1.0]]], np.float32)
    bce = -(2 * np.log(0.8) + np.log(0.9)) / 2
    dl = 1 - (2 * 2 * 0.8 + 1) / (2 + 2 * 0.8 + 0.1 + 1)
    assert f(bce_dice_loss(t, p, weights=wt)) == pytest.approx(bce + dl, rel=1e-4)


def test_weighted_loss_reads_weights_from_the_second_channel():
    """get_loss(weighted=True): y_true is (mask, weights) on the last axis; mask_only scores the mask."""
    w = np.ones_like(T)
    w[0, 0, 0] = 3.0
    packed = np.stack([T, w], axis=-1)
    loss = get_loss("bce_dice", per_image=True, weighted=True)
    assert f(loss(packed, P[..., None])) == pytest.approx(f(bce_dice_loss(T, P, per_image=True, weights=w)), rel=1e-5)
    assert f(loss(packed, P[..., None])) != pytest.approx(f(get_loss("bce_dice", per_image=True)(T, P)), rel=1e-3)
    metric = mask_only(dice_coefficient)
    assert metric.__name__ == "dice_coefficient"
    assert f(metric(packed, P[..., None])) == pytest.approx(f(dice_coefficient(T, P)))
