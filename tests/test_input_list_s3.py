"""``--input-list`` with S3: a Parquet list in a bucket naming objects of two buckets (same base
name), a key relative to the list's prefix, local files and a missing object; then the list grown
by two, done by Ray actors (the list's source pickled to them) from the CLI with credentials from
the environment. Slow: the SeaweedFS server and a local Ray."""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from test_promises_run import images

from batchmask.batch.runner import run
from batchmask.cli import main

pytestmark = pytest.mark.slow


def _jpeg(size, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _parquet(entries: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"path": entries}), buf)
    return buf.getvalue()


def test_parquet_list_on_s3_mixing_buckets_and_local_files_then_grown(s3_server, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    fs = s3_server.fs()
    b1, b2 = s3_server.new_bucket("la"), s3_server.new_bucket("lb")
    fs.pipe_file(f"{b1}/x/a.jpg", _jpeg((30, 20), (200, 30, 30)))
    fs.pipe_file(f"{b2}/x/a.jpg", _jpeg((16, 40), (30, 200, 30)))
    fs.pipe_file(f"{b1}/lists/imgs/c.jpg", _jpeg((24, 24), (30, 30, 200)))
    imgs = images(tmp_path / "imgs", ["d.jpg", "e.jpg", "f.jpg", "h %~é.jpg"])
    entries = [f"s3://{b1}/x/a.jpg", f"s3://{b2}/x/a.jpg", "imgs/c.jpg", f"{imgs}/d.jpg", f"file://{imgs}/e.jpg",
               f"s3://{b1}/x/missing.jpg"]
    fs.pipe_file(f"{b1}/lists/new.parquet", _parquet(entries))
    out = f"s3://{b1}/out"
    kw = {"endpoint_url": s3_server.endpoint_url, "storage_options": s3_server.storage_options, "quiet": True}
    s = run(None, out, str(tiny_model_dir), input_list=f"s3://{b1}/lists/new.parquet", **kw)
    assert (s.total, s.ok, s.failed) == (6, 5, 1)

    def rows() -> dict[str, dict]:
        fs.invalidate_cache()
        return {r["image"]: r for r in csv.DictReader(io.StringIO(fs.cat_file(f"{b1}/out/coverage.csv").decode()))}

    got = rows()
    assert got[f"s3://{b1}/x/a.jpg"]["mask"] == f"masks/s3/{b1}/x/a.jpg.png"
    assert got[f"s3://{b2}/x/a.jpg"]["mask"] == f"masks/s3/{b2}/x/a.jpg.png"
    assert (got[f"s3://{b1}/x/a.jpg"]["width"], got[f"s3://{b2}/x/a.jpg"]["width"]) == ("30", "16")
    assert got["imgs/c.jpg"]["width"] == "24"  # read from the list's prefix, s3://b1/lists/imgs/c.jpg
    assert got[f"s3://{b1}/x/missing.jpg"]["status"] == "error"
    for r in got.values():
        if r["status"] == "ok":
            assert fs.exists(f"{b1}/out/{r['mask']}")

    # grown by two, run from the CLI (credentials from the environment) by a Ray actor
    fs.pipe_file(f"{b1}/lists/new.parquet", _parquet([*entries, f"{imgs}/f.jpg", f"s3://{b1}/lists/imgs/c.jpg",
                                                      f"{imgs}/h %~é.jpg"]))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    res = CliRunner().invoke(main, ["run", "--input-list", f"s3://{b1}/lists/new.parquet", "-o", out, "-m",
                                    str(tiny_model_dir), "--endpoint-url", s3_server.endpoint_url,
                                    "--in-process-max", "0", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "3 ok, 0 failed, 6 skipped (already done) of 9 images" in res.output
    got = rows()
    assert len(got) == 9 and got[f"s3://{b1}/lists/imgs/c.jpg"]["mask"] == f"masks/s3/{b1}/lists/imgs/c.jpg.png"
    odd = got[f"{imgs}/h %~é.jpg"]["mask"]
    assert odd.endswith("/h %25%7Eé.jpg.png") and fs.exists(f"{b1}/out/{odd}")  # "%" and "~" escaped
    assert s3_server.secret not in fs.cat_file(f"{b1}/out/run.json").decode()
