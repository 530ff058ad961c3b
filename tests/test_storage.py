"""Storage layer: streaming sorted listing, path safety, atomic writes; local and real S3 (SeaweedFS)."""

from __future__ import annotations

import io
import os

import pytest

from batchmask.batch.outputs import MaskNames
from batchmask.batch.storage import StorageSpec, UnsafePathError, check_rel, matches

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


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd.jpg", "a//b.jpg", "./a.jpg", ""])
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


@pytest.mark.slow  # the S3 server
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

    from batchmask.batch.outputs import mask_stats

    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 10:20] = 0.9  # a face
    prob[40:50, 30:45] = 0.8  # another
    prob[60, 60] = 0.7  # one network pixel: below the minimum area
    m, fp, faces, conf = mask_stats(prob, 256, 128, 0.5, 64)
    assert m.shape == (128, 256) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert fp == int(np.count_nonzero(m)) and faces == 2 and 0.7 < conf < 0.9
    m0, fp0, faces0, conf0 = mask_stats(np.zeros((64, 64), np.float32), 30, 20, 0.5, 64)
    assert (fp0, faces0, conf0) == (0, 0, None) and not m0.any()


def test_mask_names_keep_recorded_masks_and_never_reuse_them():
    names = MaskNames({"a.png": "masks/a.png", "b.jpg": "masks/b.jpg.png"})
    # a.jpg sorts first and arrives after a.png was done: it must not take a.png's mask
    assert [names.assign(r) for r in ["a.jpg", "a.png", "b.jpg", "b.png"]] == [
        "masks/a.jpg.png", "masks/a.png", "masks/b.jpg.png", "masks/b.png"]


def test_local_listing_follows_symlinks_but_not_cycles(tmp_path):
    _make_tree(tmp_path / "real", ["x.jpg", "sub/y.jpg"])
    os.symlink(tmp_path / "real", tmp_path / "real" / "sub" / "loop")  # a cycle
    os.symlink(tmp_path / "real", tmp_path / "link")  # the same folder twice: listed twice
    listed = list(StorageSpec(str(tmp_path)).open().iter_files())
    assert listed == ["link/sub/y.jpg", "link/x.jpg", "real/sub/y.jpg", "real/x.jpg"]


def test_specs_and_errors_never_show_credentials():
    from batchmask.batch.storage import StorageError

    spec = StorageSpec("s3://b/p", "http://user:pw@host:8333", {"key": "AKEY", "secret": "SKEY"})
    for text in (repr(spec), repr(spec.public())):
        assert "AKEY" not in text and "SKEY" not in text and "pw" not in text
    assert spec.public()["endpoint_url"] == "http://host:8333"
    bad = StorageSpec("s3://b/p", "http://127.0.0.1:1", {"profile": "batchmask-no-such-profile"})
    with pytest.raises(StorageError, match="ProfileNotFound"):
        bad.open().ensure_root()


def test_input_must_be_an_existing_folder(tmp_path):
    from batchmask.batch.storage import StorageError

    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(StorageError, match="is a file"):
        StorageSpec(str(tmp_path / "f.jpg")).open().check_input()
    with pytest.raises(StorageError, match="no such directory"):
        StorageSpec(str(tmp_path / "nope")).open().check_input()


def test_worker_load_rows_only_for_missing_files_and_pixel_limit(monkeypatch):
    import struct
    import zlib
    from types import SimpleNamespace

    from PIL import Image

    from batchmask.batch.outputs import decode_for_model
    from batchmask.batch.worker import MaskWorker, WorkerOptions, set_pixel_limit
    from batchmask.data import DataError

    def read(rel, max_bytes=None):
        raise {"gone.jpg": FileNotFoundError, "denied.jpg": PermissionError}[rel](rel)

    w = object.__new__(MaskWorker)
    w.inp, w.opts, w.model = SimpleNamespace(read_bytes=read), WorkerOptions(), SimpleNamespace(image_size=64)
    w.out = SimpleNamespace(check_name=lambda rel: None)
    assert "cannot read" in w._load("gone.jpg", "masks/gone.png").error
    with pytest.raises(PermissionError):  # S3 AccessDenied: fail the shard, not an error row per image
        w._load("denied.jpg", "masks/denied.png")

    def png_header(wd, ht):  # a PNG that only claims its size
        ihdr = struct.pack(">IIBBBBB", wd, ht, 8, 0, 0, 0, 0)
        chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    big = png_header(20_000, 20_000)  # 400 M pixels: over PIL's default limit
    for limit in (300_000_000, 1000):  # above PIL's default; far below the image
        set_pixel_limit(limit)
        with pytest.raises(DataError, match=f"exceeds the limit of {limit} \\(--max-pixels\\)"):
            decode_for_model(big, 64, limit, "big.png")
    set_pixel_limit(500_000_000)  # --max-pixels above PIL's default: PIL now opens such images
    Image.open(io.BytesIO(big)).close()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16", "CMYK", "RGB-exif6"])
def test_run_input_is_the_training_preprocessing_pixel_for_pixel(mode):
    """The batch run resizes in PIL (issue 11, fewer copies); its network input must stay exactly
    what training and evaluation feed the network: resize_rgb(pil_to_rgb(image))."""
    import numpy as np
    from PIL import Image

    from batchmask.batch.outputs import decode_for_model
    from batchmask.data import pil_to_rgb
    from batchmask.image import resize_rgb

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (90, 130, 3), np.uint8))
    exif = None
    if mode == "I;16":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    elif mode == "RGB-exif6":  # rotated 90° by its EXIF orientation
        im, exif = base, Image.Exif()
        exif[0x0112] = 6
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    fmt = "JPEG" if mode in ("CMYK", "RGB-exif6") else "PNG"
    im.save(buf, fmt, **({"exif": exif} if exif else {}))
    x, w, h = decode_for_model(buf.getvalue(), 64, 10**6, "x.img")
    with Image.open(io.BytesIO(buf.getvalue())) as ref_im:
        ref = resize_rgb(pil_to_rgb(ref_im), 64, 64)
    assert (w, h) == ((90, 130) if mode == "RGB-exif6" else (130, 90))
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8
    assert np.array_equal(x, ref)


def test_mask_png_is_8_bit_single_channel_lossless_and_compact():
    """The mask format (README, "Masks"): mode L, 0/255, same pixels; run-length zlib keeps it small."""
    import numpy as np
    from PIL import Image

    from batchmask.batch.outputs import encode_png

    m = np.zeros((683, 1024), np.uint8)
    m[100:180, 200:260] = 255
    m[400:430, 700:725] = 255
    data = encode_png(m)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (1024, 683))
        assert np.array_equal(np.asarray(im), m)
    plain = io.BytesIO()
    Image.fromarray(m, "L").save(plain, "PNG", compress_level=1)  # zlib's default strategy
    assert len(data) < len(plain.getvalue()) / 2
