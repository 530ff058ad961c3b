"""The run's per-image path (:func:`measure`, ``rle()``, :func:`encode_png`) gives exactly what the
plain path gives: upsample the whole probability map, threshold, label, RLE and PNG of the full
mask. The plain path is written out here (it is the definition), not kept in the package.

The cases are the ones a shortcut gets wrong: thin lines and single pixels (one network pixel
that reaches the threshold), values at the threshold, regions at the borders, odd and tiny
sizes (1xN, 3x5), shrinking as well as growing, PIL's vertical-first case, a large photo.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as cocomask
from scipy import ndimage

from batchmask.inference.pixels import encode_png, measure, min_face_area, upsample_probs, upsample_where


def reference(prob_small: np.ndarray, width: int, height: int, threshold: float, image_size: int):
    """The definition: the whole map upsampled, then thresholded and labelled (as batchmask 0.1 did)."""
    prob = upsample_probs(prob_small, width, height)
    face = prob >= threshold
    mask = face.view(np.uint8) * np.uint8(255)
    n_face = int(np.count_nonzero(face))
    conf, boxes, faces = None, [], 0
    if n_face:
        conf = float(prob[face].mean())
        labels, n = ndimage.label(face, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels[face], minlength=n + 1)
        sums = np.bincount(labels[face], weights=prob[face], minlength=n + 1)
        for lab, (sy, sx) in enumerate(ndimage.find_objects(labels), start=1):
            if sizes[lab] >= min_face_area(width, height, image_size):
                faces += 1
                boxes.append((sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start, float(sums[lab] / sizes[lab])))
    rle = cocomask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))["counts"].decode("ascii")
    return mask, n_face, faces, conf, boxes, rle


def assert_same(prob_small: np.ndarray, width: int, height: int, threshold: float = 0.5) -> None:
    s = prob_small.shape[0]
    mask, n_face, faces, conf, boxes, rle = reference(prob_small, width, height, threshold, s)
    got = measure(prob_small, width, height, threshold, s)
    where = f"{s}x{s} -> {width}x{height}, threshold {threshold}"
    assert got.mask.shape == (height, width) and got.mask.dtype == np.uint8, where
    if not np.array_equal(got.mask, mask):
        raise AssertionError(f"{where}: {int(np.count_nonzero(got.mask != mask))} mask pixels differ")
    assert (got.face_pixels, got.faces, got.mean_conf, got.boxes) == (n_face, faces, conf, boxes), where
    assert got.rle() == rle, where
    png = encode_png(got.mask)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), mask), where
    assert Image.open(io.BytesIO(png)).mode == "L", where


def maps(size: int, seed: int) -> list[np.ndarray]:
    """Probability maps with the structures a band or box shortcut can cut: noise, lines one pixel
    thin (rows, columns, diagonals), single hot pixels at the corners, values exactly at the threshold."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((size, size)), 1.5)
    smooth = ((smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)).astype(np.float32)
    lines = np.full((size, size), 0.2, np.float32)
    lines[size // 3, :] = 0.9
    lines[:, -1] = 0.51
    np.fill_diagonal(lines, 0.8)
    corners = np.zeros((size, size), np.float32)
    corners[0, 0] = corners[-1, -1] = corners[0, -1] = 1.0
    at = np.full((size, size), 0.4999999, np.float32)
    at[size // 2, size // 4 :] = 0.5
    sparse = (rng.random((size, size)) < 0.03) * rng.random((size, size))
    # just below the threshold all round a small hot block and a hot pixel: the outputs between them
    # and their cold neighbours reach the threshold with a small weight on the hot input
    near = rng.uniform(0.45, 0.4999, (size, size)).astype(np.float32)
    near[size // 4 : size // 4 + 3, size // 2 : size // 2 + 2] = 1.0
    near[3 * size // 4, size // 5] = 1.0
    return [near, rng.random((size, size), np.float32), smooth, lines, corners, at, sparse.astype(np.float32),
            np.zeros((size, size), np.float32), np.ones((size, size), np.float32)]


SIZES = [(1, 1), (1, 7), (7, 1), (1, 64), (64, 1), (3, 5), (5, 3), (16, 16), (17, 9), (31, 100), (100, 31),
         (64, 3), (3, 64), (90, 130), (257, 129)]


@pytest.mark.parametrize("width,height", SIZES)
def test_measure_equals_the_full_upsample_on_thin_structures_and_odd_sizes(width, height):
    for k, prob in enumerate(maps(16, seed=width * 1000 + height)):
        for threshold in (0.5, 0.65):
            assert_same(prob, width, height, threshold), k


def test_measure_equals_the_full_upsample_on_a_large_photo_size():
    """2048x1365 from 64x64 (each network pixel spreads over 32x21 image pixels), and 1024x682 from 512."""
    for prob in maps(64, seed=7)[:5]:
        assert_same(prob, 2048, 1365)
    rng = np.random.default_rng(3)
    big = ndimage.gaussian_filter(rng.random((512, 512)), 6).astype(np.float32)
    big = (big - big.min()) / np.ptp(big)
    assert_same(big, 1024, 682, 0.8)


def test_upsample_where_is_the_full_upsample_inside_and_below_the_threshold_outside():
    rng = np.random.default_rng(11)
    prob = np.zeros((32, 32), np.float32)
    prob[5:9, 20:23] = rng.uniform(0.6, 1.0, (4, 3))
    for width, height in [(100, 70), (32, 32), (20, 70), (300, 10)]:  # (300, 10): PIL's vertical-first case
        full = upsample_probs(prob, width, height)
        box, y, x = upsample_where(prob, width, height, 0.5)
        assert np.array_equal(box, full[y : y + box.shape[0], x : x + box.shape[1]])
        outside = full.copy()
        outside[y : y + box.shape[0], x : x + box.shape[1]] = 0
        assert outside.max() < 0.5 <= box.max()
    assert upsample_where(np.full((8, 8), 0.49, np.float32), 40, 30, 0.5) is None
