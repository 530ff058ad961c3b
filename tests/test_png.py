"""The mask PNG writer: any PNG reader gets the exact array back, as an 8-bit grayscale image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from batchmask.inference import png
from batchmask.inference.png import encode_gray_png


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, checking each CRC on the way: the file's structure, read by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        i += 12 + n
    return out


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((683, 1024), np.uint8)
    blob[100:300, 200:260] = 255
    return [
        np.zeros((1, 1), np.uint8),
        np.full((1, 1), 255, np.uint8),
        np.full((3, 5), 255, np.uint8),
        np.zeros((7, 1), np.uint8),
        (rng.random((37, 53)) > 0.5).astype(np.uint8) * 255,  # noise: the worst case for compression
        rng.integers(0, 256, (19, 23), dtype=np.uint8),  # any grey level, not only 0/255
        blob,
        np.ascontiguousarray(blob.T),
        blob[::2, 1::3],  # a strided view
    ]


@pytest.mark.parametrize("k", range(len(masks())))
def test_pil_reads_back_the_same_array_as_an_8_bit_grayscale_image(k):
    m = masks()[k]
    im = decoded(encode_gray_png(m))
    assert im.mode == "L" and im.size == (m.shape[1], m.shape[0])
    assert np.array_equal(np.asarray(im), m)


def test_the_same_pixels_as_pillows_own_png_of_the_mask():
    m = masks()[6]
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, "PNG")
    ours, pillows = decoded(encode_gray_png(m)), decoded(buf.getvalue())
    assert ours.mode == pillows.mode and np.array_equal(np.asarray(ours), np.asarray(pillows))


def test_header_and_chunks_follow_the_png_spec():
    m = masks()[6]
    found = chunks(encode_gray_png(m))
    assert [k for k, _ in found] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", found[0][1])
    assert (w, h, depth, colour, comp, filt, interlace) == (1024, 683, 8, 0, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(found[1][1]), np.uint8).reshape(683, 1025)
    assert not raw[:, 0].any()  # filter type 0 on every row
    assert np.array_equal(raw[:, 1:], m)


def test_a_long_stream_is_cut_into_several_idat_chunks(monkeypatch):
    monkeypatch.setattr(png, "_IDAT_MAX", 64)
    m = masks()[4]
    found = chunks(encode_gray_png(m))
    idat = [body for kind, body in found if kind == b"IDAT"]
    assert len(idat) > 3 and all(len(b) <= 64 for b in idat)
    assert np.array_equal(np.asarray(decoded(encode_gray_png(m))), m)


def test_the_standard_zlib_writes_the_same_image(monkeypatch):
    m = masks()[6]
    monkeypatch.setattr(png, "_deflate", zlib)
    assert np.array_equal(np.asarray(decoded(encode_gray_png(m))), m)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)])
def test_what_is_not_a_mask_is_refused(bad):
    with pytest.raises(ValueError, match="mask PNG|cannot be"):
        encode_gray_png(bad)


def test_libpng_reads_it_too():
    """OpenCV decodes PNGs with its own libpng/libspng, not Pillow's code."""
    import cv2  # opencv-python-headless, in the test extra

    for m in masks():
        got = cv2.imdecode(np.frombuffer(encode_gray_png(m), np.uint8), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and np.array_equal(got, m)


def test_rows_compressed_in_blocks_give_the_same_file(monkeypatch):
    m = masks()[4]
    whole = encode_gray_png(m)
    monkeypatch.setattr(png, "_BLOCK_BYTES", 100)  # a block of one or two rows
    assert encode_gray_png(m) == whole
