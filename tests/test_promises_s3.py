"""README mask-name promises on S3 (issue 14): `a.jpg` and `a.png` in one bucket get two masks,
and an image added later never takes a recorded mask name. Slow: it starts the SeaweedFS server.
Two images are done in process (no Ray)."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from batchmask.batch.runner import run

pytestmark = pytest.mark.slow


def _png(size, colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def _rows(fs, url) -> dict[str, dict]:
    fs.invalidate_cache()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(url).decode())))
    assert len(rows) == len({r["image"] for r in rows})
    return {r["image"]: r for r in rows}


def test_s3_mask_name_collision_and_recorded_names(s3_server, tiny_model_dir):
    fs = s3_server.fs()
    bucket = s3_server.new_bucket("names")
    kw = {"endpoint_url": s3_server.endpoint_url, "storage_options": s3_server.storage_options, "quiet": True}

    # one run sees both: the second in listing order (a.png) gets masks/a.png.png
    fs.pipe_file(f"{bucket}/in/a.jpg", _png((30, 20), fmt="JPEG"))
    fs.pipe_file(f"{bucket}/in/a.png", _png((16, 40)))
    s = run(f"s3://{bucket}/in/", f"s3://{bucket}/out/", str(tiny_model_dir), **kw)
    assert (s.total, s.ok, s.exit_code) == (2, 2, 0)
    by = _rows(fs, f"{bucket}/out/coverage.csv")
    assert (by["a.jpg"]["mask"], by["a.png"]["mask"]) == ("masks/a.png", "masks/a.png.png")
    for rel, size in (("masks/a.png", (30, 20)), ("masks/a.png.png", (16, 40))):
        with Image.open(io.BytesIO(fs.cat_file(f"{bucket}/out/{rel}"))) as m:
            assert m.size == size and m.mode == "L"
    assert sorted(p.rsplit("/out/", 1)[1] for p in fs.find(f"{bucket}/out/masks/")) == ["masks/a.png",
                                                                                     "masks/a.png.png"]

    # a.png done first; a.jpg added later (it sorts first) must not take masks/a.png
    fs.pipe_file(f"{bucket}/in2/a.png", _png((16, 40)))
    run(f"s3://{bucket}/in2/", f"s3://{bucket}/out2/", str(tiny_model_dir), **kw)
    before = fs.cat_file(f"{bucket}/out2/masks/a.png")
    fs.pipe_file(f"{bucket}/in2/a.jpg", _png((30, 20), fmt="JPEG"))
    s = run(f"s3://{bucket}/in2/", f"s3://{bucket}/out2/", str(tiny_model_dir), **kw)
    assert (s.ok, s.skipped) == (1, 1)
    by = _rows(fs, f"{bucket}/out2/coverage.csv")
    assert by["a.png"]["mask"] == "masks/a.png" and by["a.jpg"]["mask"] not in ("", "masks/a.png")
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/out2/masks/a.png") == before
    with Image.open(io.BytesIO(fs.cat_file(f"{bucket}/out2/{by['a.jpg']['mask']}"))) as m:
        assert m.size == (30, 20)
