"""Storage layer: streaming sorted listing, path safety, atomic writes; local and real S3 (SeaweedFS)."""

from __future__ import annotations

import os

import pytest

from batchmask.outputs import MaskNames
from batchmask.storage import StorageSpec, UnsafePathError, check_rel, matches

NAMES = ["a.jpg", "a-b.jpg", "a/x.jpg", "a/y/z.PNG", "b c/ü ñ.jpeg", "a.b/k.jpg", "ab.jpg", "notes.txt", "Z.tif"]


def _make_tree(root, names):
    for n in names:
        p = root.joinpath(*n.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode())


def test_local_listing_is_sorted_like_s3_and_streams(tmp_path):
    _make_tree(tmp_path, NAMES)
    st = StorageSpec(str(tmp_path)).open()
    it = st.iter_files()
    assert next(it) == sorted(NAMES)[0]  # a generator: first item before the walk is over
    listed = [sorted(NAMES)[0], *it]
    assert listed == sorted(NAMES)  # code point order of the whole relative path
    imgs = [r for r in listed if matches(r, (".jpg", ".jpeg", ".png", ".tif"), None)]
    assert "notes.txt" not in imgs and "a/y/z.PNG" in imgs and "Z.tif" in imgs
    assert [r for r in listed if matches(r, (".jpg",), "a/*")] == ["a/x.jpg"]
    assert [r for r in listed if matches(r, (".jpg", ".png"), "*.PNG")] == ["a/y/z.PNG"]


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd.jpg", "a//b.jpg", "./a.jpg", "C:x.jpg", ""])
def test_unsafe_paths_refused(bad, tmp_path):
    with pytest.raises(UnsafePathError):
        check_rel(bad)
    with pytest.raises(UnsafePathError):
        StorageSpec(str(tmp_path)).open().write_bytes(bad or "", b"x")
    assert not list(tmp_path.parent.glob("x.jpg"))


def test_atomic_local_write_leaves_no_temp(tmp_path):
    st = StorageSpec(str(tmp_path / "out")).open()
    st.ensure_root()
    st.write_bytes("masks/d e/ü.png", b"123")
    st.write_bytes("masks/d e/ü.png", b"4567")
    assert st.read_bytes("masks/d e/ü.png") == b"4567"
    assert os.listdir(tmp_path / "out" / "masks" / "d e") == ["ü.png"]


def test_mask_names_resolve_collisions_deterministically():
    order = ["a.jpg", "a.png", "a.png.jpg", "a/b.jpg", "b.jpg", "b.png", "c.tif"]
    names = MaskNames()
    got = [names.assign(r) for r in order]
    assert got == ["masks/a.png", "masks/a.png.png", "masks/a.png.jpg.png", "masks/a/b.png", "masks/b.png",
                   "masks/b.png.png", "masks/c.png"]
    assert len(set(got)) == len(got)
    many = MaskNames()
    for i in range(2000):  # state stays small on a long sorted listing
        many.assign(f"d/{i:05d}.jpg")
    assert len(many._taken) <= 10


def test_s3_listing_paginates_in_order_and_writes(s3_server):
    bucket = s3_server.new_bucket("st")
    fs = s3_server.fs()
    keys = [f"in/{n}" for n in NAMES] + ["in/", "other/x.jpg"]
    for k in keys:
        fs.pipe_file(f"{bucket}/{k}", k.encode())
    st = StorageSpec(f"s3://{bucket}/in", endpoint_url=s3_server.endpoint_url,
                     storage_options={"key": s3_server.key, "secret": s3_server.secret}).open()
    one_page = list(st.iter_files())
    st.page_size = 2  # force several ListObjectsV2 pages
    paged = list(st.iter_files())
    # The server's order (SeaweedFS: folder by folder; AWS/MinIO: code point order), repeatably.
    assert paged == one_page == list(st.iter_files())
    assert sorted(paged) == sorted(NAMES)
    assert st.read_bytes("b c/ü ñ.jpeg") == "in/b c/ü ñ.jpeg".encode()
    out = StorageSpec(f"s3://{bucket}/out/", storage_options=s3_server.storage_options).open()
    out.ensure_root()
    out.write_bytes("masks/q.png", b"png")
    assert fs.cat_file(f"{bucket}/out/masks/q.png") == b"png"
    assert out.exists("masks/q.png") and not out.exists("masks/r.png")
    with pytest.raises(UnsafePathError):
        out.write_bytes("../escape.png", b"x")
    assert not fs.exists(f"{bucket}/escape.png")
    assert "secret" not in repr(out.spec.public()).lower()


def test_mask_stats_counts_regions_above_min_area_and_matches_mask():
    import numpy as np

    from batchmask.outputs import mask_stats

    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 10:20] = 0.9  # a face
    prob[40:50, 30:45] = 0.8  # another
    prob[60, 60] = 0.7  # one network pixel: below the minimum area
    m, fp, faces, conf = mask_stats(prob, 256, 128, 0.5, 64)
    assert m.shape == (128, 256) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert fp == int(np.count_nonzero(m)) and faces == 2 and 0.7 < conf < 0.9
    m0, fp0, faces0, conf0 = mask_stats(np.zeros((64, 64), np.float32), 30, 20, 0.5, 64)
    assert (fp0, faces0, conf0) == (0, 0, None) and not m0.any()
