"""Loaders: WIDER FACE layout, the exercise's images.npy (incl. odd entries, hostile pickles), errors."""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_wider

from batchmask.augment import make_pair
from batchmask.config import AugmentConfig
from batchmask.convert import sample_to_record, write_npy
from batchmask.data import (
    DataError,
    boxes_to_mask,
    load_npy,
    load_wider,
    parse_wider_annotations,
    split_samples,
)
from batchmask.sources import load_dataset, load_datasets

REPO = Path(__file__).resolve().parents[1]


def test_wider_demo_loads(demo_wider):
    samples = load_wider(demo_wider)
    assert len(samples) == 10
    assert sum(len(s.boxes) for s in samples) == 20
    assert {s.group for s in samples} == {"1--Handshaking", "4--Dancing", "13--Interview", "19--Couple", "20--Family_Group"}
    s = samples[0]
    img = s.load_image()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    h, w = img.shape[:2]
    assert (s.boxes[:, 2] <= w).all() and (s.boxes[:, 3] <= h).all()
    # The first entry is "336 82 112 162" (x y w h) -> x1 y1 x2 y2.
    assert s.boxes[0].tolist() == [336, 82, 448, 244]


def test_wider_to_npy_roundtrip(demo_wider, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import wider_to_npy

    out = tmp_path / "images.npy"
    assert wider_to_npy.main([str(demo_wider), str(out)]) == 0
    a, b = load_dataset(out), load_wider(demo_wider)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.load_image())
        np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3)
    raw = np.load(out, allow_pickle=True)
    assert raw.shape == (10, 2)
    ann = raw[0, 1][0]
    assert set(ann) == {"label", "notes", "points", "imageWidth", "imageHeight"}
    assert ann["label"] == ["Face"] and 0 <= ann["points"][0]["x"] <= 1


def _npy(tmp_path, entries) -> Path:
    arr = np.empty((len(entries), 2), dtype=object)
    for i, (img, boxes) in enumerate(entries):
        arr[i, 0] = img
        arr[i, 1] = boxes
    p = tmp_path / "images.npy"
    np.save(p, arr, allow_pickle=True)
    return p


def test_npy_converts_grayscale_and_rgba(tmp_path):
    rgb = np.full((20, 30, 3), 7, np.uint8)
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    rgba = np.dstack([rgb, np.full((20, 30), 128, np.uint8)])
    one = gray[..., None]
    box = sample_to_record(rgb, np.array([[3, 4, 15, 10]]))
    samples = load_npy(_npy(tmp_path, [(rgb, box), (gray, box), (rgba, box), (one, [])]))
    assert len(samples) == 4
    for s in samples:
        assert s.image.shape == (20, 30, 3) and s.image.dtype == np.uint8
    assert np.array_equal(samples[1].image[..., 0], gray) and np.array_equal(samples[1].image[..., 2], gray)
    assert np.array_equal(samples[2].image, rgb)
    np.testing.assert_allclose(samples[1].boxes, [[3, 4, 15, 10]], atol=1e-4)
    assert samples[3].boxes.shape == (0, 4)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/batchmask-pwned",))


def test_npy_refuses_hostile_pickle(tmp_path):
    marker = Path("/tmp/batchmask-pwned")
    marker.unlink(missing_ok=True)
    arr = np.empty((1, 2), dtype=object)
    arr[0, 0] = np.zeros((4, 4, 3), np.uint8)
    arr[0, 1] = [_Evil()]
    p = tmp_path / "evil.npy"
    np.save(p, arr, allow_pickle=True)
    with pytest.raises(DataError, match=r"evil\.npy: unsafe or corrupt pickle: refusing to load (posix|os)\.system"):
        load_npy(p)
    assert not marker.exists()


def test_npy_refuses_non_numpy_globals(tmp_path):
    # A pickle of a plain Python object that is not a container (e.g. a set of builtins.eval).
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1, 2)})
    buf.write(pickle.dumps(eval, protocol=3))
    p = tmp_path / "evil2.npy"
    p.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="refusing to load builtins.eval"):
        load_npy(p)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(np.zeros((0, 0, 3), np.uint8), [])], r"images\.npy\[0\]: empty image array"),
        ([(np.zeros((5, 5, 3), np.uint8), [{"points": [{"x": 0.1}]}])], r"\[0\] annotation 0: 'points'"),
        ([(np.zeros((5, 5, 3), np.uint8), [{"points": [{"x": 0.1, "y": 0.1}, {"x": 3.0, "y": 0.5}]}])],
         r"points must be normalised"),
        ([(np.zeros((5, 5, 3), np.uint8), []), ("not an image", [])], r"images\.npy\[1\]: column 0 must be an image"),
        ([(np.zeros((5, 5, 2), np.uint8), [])], r"unsupported image shape"),
    ],
)
def test_npy_bad_entries_name_the_index(tmp_path, entries, message):
    with pytest.raises(DataError, match=message):
        load_npy(_npy(tmp_path, entries))


def test_npy_wrong_shape_and_missing_file(tmp_path):
    p = tmp_path / "flat.npy"
    np.save(p, np.zeros((3, 3)))
    with pytest.raises(DataError, match=r"flat\.npy: expected a non-empty array of shape \(N, 2\)"):
        load_npy(p)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"hello")
    with pytest.raises(DataError, match=r"junk\.npy: not a \.npy file"):
        load_npy(tmp_path / "junk.npy")


def _wider(tmp_path, text: str, images: dict[str, tuple[int, int]] | None = None) -> Path:
    from PIL import Image

    root = tmp_path / "WIDER_train"
    for rel, (w, h) in (images or {"0--A/a.jpg": (100, 80), "0--A/b.jpg": (100, 80)}).items():
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "images" / rel)
    (root / "wider_face_train_bbx_gt.txt").write_text(text)
    return root


def test_wider_zero_faces_and_invalid_flag(tmp_path):
    text = (
        "0--A/a.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
        "0--A/b.jpg\n3\n10 10 20 20 0 0 0 0 0 0\n30 30 5 5 0 0 0 1 0 0\n50 50 0 9 0 0 0 0 0 0\n"
    )
    samples = load_wider(_wider(tmp_path, text))
    assert [len(s.boxes) for s in samples] == [0, 1]
    assert samples[1].boxes.tolist() == [[10, 10, 30, 30]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0--A/a.jpg\nabc\n", r"bbx_gt\.txt:2: expected a face count"),
        ("0--A/a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n", r"bbx_gt\.txt:4: file ends inside the entry"),
        ("0--A/a.jpg\n1\n1 2 x 4 0 0 0 0 0 0\n", r"bbx_gt\.txt:3: non-numeric box line"),
        ("0--A/a.jpg\n1\n1 2\n", r"bbx_gt\.txt:3: box line needs at least x y w h"),
        ("0--A/zz.jpg\n1\n1 2 3 4 0 0 0 0 0 0\n", r"bbx_gt\.txt:1: image .*zz\.jpg does not exist"),
        ("0--A/a.jpg\n1\n500 500 10 10 0 0 0 0 0 0\n", r"bbx_gt\.txt:1 \(0--A/a\.jpg\): box 0 .* outside the 100x80 image"),
        ("hello\n", r"bbx_gt\.txt:1: expected an image path"),
    ],
)
def test_wider_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_wider(_wider(tmp_path, text))


def test_wider_partial_box_is_clipped(tmp_path):
    samples = load_wider(_wider(tmp_path, "0--A/a.jpg\n1\n90 70 20 20 0 0 0 0 0 0\n"))
    assert samples[0].boxes.tolist() == [[90, 70, 100, 80]]


def test_parse_accepts_annotation_file_path(demo_wider):
    entries = parse_wider_annotations(demo_wider / "wider_face_train_bbx_gt.txt")
    assert len(entries) == 10
    assert len(load_dataset(demo_wider / "wider_face_train_bbx_gt.txt")) == 10


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a WIDER FACE folder"):
        load_dataset(tmp_path)


def test_boxes_to_mask_pixel_centres():
    m = boxes_to_mask(np.array([[1, 1, 3, 2], [2.4, 3.6, 3.6, 4.0]]), 5, 5)
    expected = np.zeros((5, 5), np.uint8)
    expected[1:2, 1:3] = 1  # pixel centres 1.5, 2.5 inside [1, 3); row centre 1.5 inside [1, 2)
    expected[4:4, 2:4] = 1  # y 3.6..4.0 contains no pixel centre (3.5 < 3.6, 4.5 > 4.0)
    assert np.array_equal(m, expected)
    assert boxes_to_mask(np.zeros((0, 4)), 3, 4).sum() == 0


def test_split_is_deterministic_and_disjoint(demo_wider):
    samples = load_wider(demo_wider)
    a = split_samples(samples, 0.3, seed=1)
    assert a == split_samples(samples, 0.3, seed=1)
    assert set(a[0]).isdisjoint(a[1]) and len(a[0]) + len(a[1]) == 10 and len(a[1]) == 3
    tr, va = split_samples(samples, 0.2, seed=3, by="event")
    assert {samples[i].group for i in tr}.isdisjoint({samples[i].group for i in va})
    with pytest.raises(DataError, match="at least 2 images"):
        split_samples(samples[:1], 0.2, seed=0)


def test_make_pair_keeps_mask_on_boxes():
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 30:90] = 255  # a bright "face" exactly where the box is
    boxes = np.array([[30, 20, 90, 60]], np.float32)
    x, y = make_pair(img, boxes, 64)
    assert x.shape == (64, 64, 3) and y.shape == (64, 64)
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(brightness=0, contrast=0, saturation=0)
    with_face = 0
    for _ in range(20):
        x, y = make_pair(img, boxes, 64, rng, cfg)
        # Every draw: the mask is the bright region (geometry stayed in sync), pixel for pixel
        # except at the resampled edges. An all-zero (or all-one) mask cannot pass this.
        bright = x[..., 0] > 128
        assert np.mean(bright == y.astype(bool)) > 0.97
        if y.sum() > 20:
            with_face += 1
            inner = x[..., 0][y.astype(bool)].mean()
            outer = x[..., 0][~y.astype(bool)].mean()
            assert inner > 180 and outer < 60
    # The crops cover 0.5-1.0 of each side: most of them contain the face.
    assert with_face >= 10


def test_write_npy_downscales(demo_wider, tmp_path):
    samples = load_wider(demo_wider)[:2]
    write_npy(samples, tmp_path / "s.npy", max_side=100)
    small = load_npy(tmp_path / "s.npy")
    assert max(small[0].image.shape[:2]) == 100


def test_npy_protocol_2_pickle_loads(tmp_path):
    """Older writers (Python 2 era numpy) used pickle protocol 2, which stores bytes via _codecs."""
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    arr = np.empty((1, 2), dtype=object)
    arr[0, 0] = img
    arr[0, 1] = sample_to_record(img, np.array([[0, 0, 2, 1]]))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1, 2)})
    buf.write(pickle.dumps(arr, protocol=2))
    p = tmp_path / "old.npy"
    p.write_bytes(buf.getvalue())
    (s,) = load_npy(p)
    assert np.array_equal(s.image, img)
    np.testing.assert_allclose(s.boxes, [[0, 0, 2, 1]], atol=1e-5)


def test_cv_events_folds_partition_the_data(demo_wider, tmp_path):
    """scripts/cv_events.py: each fold holds out exactly one event and trains on the rest."""
    sys.path.insert(0, str(REPO / "scripts"))
    import cv_events

    folds = cv_events.make_folds(demo_wider, tmp_path, None)
    everything = {s.name: s.boxes.tolist() for s in load_wider(demo_wider)}
    assert set(folds) == {s.split("/")[0] for s in everything}
    for event, d in folds.items():
        held = load_dataset(d / "heldout_bbx_gt.txt")
        train = load_dataset(d / "train_bbx_gt.txt")
        assert {s.group for s in held} == {event}
        assert event not in {s.group for s in train}
        # Together they are the whole dataset, boxes unchanged.
        assert {s.name: s.boxes.tolist() for s in held + train} == everything
    with pytest.raises(SystemExit, match="unknown event"):
        cv_events.make_folds(demo_wider, tmp_path, ["99--Nope"])


def test_write_wider_annotations_roundtrip(tmp_path):
    """The shared WIDER writer (shrink_wider.py, cv_events.py): boxes and empty entries read back."""
    from batchmask.convert import write_wider_annotations

    entries = [("0--A/a.jpg", np.array([[10, 20, 40, 60], [1.5, 2, 3.5, 9]], np.float32)),
               ("0--A/empty.jpg", np.zeros((0, 4), np.float32)),
               ("1--B/b.jpg", np.array([[0, 0, 5, 5]], np.float32))]
    p = tmp_path / "wider_face_train_bbx_gt.txt"
    write_wider_annotations(entries, p)
    back = parse_wider_annotations(p)
    assert [name for name, _, _ in back] == [name for name, _ in entries]
    for (_, got, _), (_, want) in zip(back, entries, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-2)


def test_load_datasets_concatenates_sources(demo_wider, tmp_path):
    """Several sources train together; WIDER's *val* annotation file is accepted as training data."""
    pool = synthetic_wider(tmp_path / "pool", {"0--Parade": 3, "61--Street_Battle": 2}, split="val")
    samples, sources = load_datasets([demo_wider, pool])
    assert len(samples) == 15 and [s["images"] for s in sources] == [10, 5]
    assert [s["path"] for s in sources] == [str(demo_wider), str(pool)]
    assert sources[1]["faces"] == 5 and len(sources[0]["fingerprint"]) == 64
    assert {s.group for s in samples[10:]} == {"0--Parade", "61--Street_Battle"}
    # One path works as before; the limit applies per source.
    assert len(load_datasets(str(pool))[0]) == 5
    assert len(load_datasets([demo_wider, pool], limit=2)[0]) == 4
    with pytest.raises(DataError, match="also in"):
        load_datasets([demo_wider, demo_wider])


def test_stratified_split_holds_out_every_event():
    from batchmask.data import Sample

    sizes = {"a": 1, "b": 2, "c": 5, "d": 40}
    samples = [Sample(name=f"{g}/{i}.jpg", boxes=np.zeros((0, 4), np.float32), group=g)
               for g, n in sizes.items() for i in range(n)]
    tr, va = split_samples(samples, 0.1, seed=3, by="stratified")
    assert sorted(tr + va) == list(range(len(samples))) and not set(tr) & set(va)
    held = {g: sum(samples[i].group == g for i in va) for g in sizes}
    # At least one of every event with two or more images; never a whole event; 10% of big ones.
    assert held == {"a": 0, "b": 1, "c": 1, "d": 4}
    assert split_samples(samples, 0.1, seed=3, by="stratified") == (tr, va)
    assert split_samples(samples, 0.1, seed=4, by="stratified")[1] != va
