"""``--input-list`` with object stores: a Parquet list in a bucket naming objects of two buckets (same base
name), a key relative to the list's prefix, local files and a missing object; then the list grown
by two, done by Ray actors (the list's source pickled to them) from the CLI with credentials from
the environment; and a list mixing every store (S3, GCS, Azure, HTTP emulators) grown by five.
Slow: the servers and a local Ray."""

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


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    return gcs_server


@pytest.fixture
def az(azurite, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    return azurite


def test_a_parquet_list_of_every_store_then_grown_by_five(s3_server, gcs, az, http_server, tiny_model_dir, tmp_path):
    """A local Parquet list mixing local files, s3://, gs://, az:// and http:// entries (the
    emulators); then the same list grown by five, done by a Ray actor: only those five are done."""
    from stores import AZ_KEY

    s3b, gsb, azc = s3_server.new_bucket("ms"), gcs.new_bucket("mg"), az.new_container("ma")
    s3fs_, gcsfs_, azfs = s3_server.fs(), gcs.fs(), az.fs()
    imgs = images(tmp_path / "imgs", [f"l{i}.jpg" for i in range(3)])
    entries = []
    for i in range(3):
        s3fs_.pipe_file(f"{s3b}/p/{i}.jpg", _jpeg((20 + i, 16), (200, 30, 30)))
        gcsfs_.pipe_file(f"{gsb}/p/{i}.jpg", _jpeg((24 + i, 16), (30, 200, 30)))
        azfs.pipe_file(f"{azc}/p/{i}.jpg", _jpeg((28 + i, 16), (30, 30, 200)))
        (http_server.root / "m").mkdir(exist_ok=True)
        (http_server.root / "m" / f"{i}.jpg").write_bytes(_jpeg((32 + i, 16), (90, 90, 90)))
        entries += [f"{imgs}/l{i}.jpg", f"s3://{s3b}/p/{i}.jpg", f"gs://{gsb}/p/{i}.jpg", f"az://{azc}/p/{i}.jpg",
                    f"{http_server.url}/m/{i}.jpg"]
    first, later = entries[:10], entries[10:]  # two of each kind, then one of each
    lst = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": first}), lst)
    out = tmp_path / "out"
    kw = {"endpoint_url": s3_server.endpoint_url, "storage_options": s3_server.storage_options, "quiet": True}
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), **kw)
    assert (s.total, s.ok, s.failed) == (10, 10, 0)

    pq.write_table(pa.table({"path": first + later}), lst)
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), in_process_max=0, workers=1, **kw)
    assert (s.total, s.ok, s.failed, s.skipped) == (15, 5, 0, 10)
    with open(out / "coverage.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(entries) and all(r["status"] == "ok" for r in rows.values())
    widths = {e: int(rows[e]["width"]) for e in entries}
    assert [widths[f"s3://{s3b}/p/{i}.jpg"] for i in range(3)] == [20, 21, 22]
    assert [widths[f"gs://{gsb}/p/{i}.jpg"] for i in range(3)] == [24, 25, 26]
    assert [widths[f"az://{azc}/p/{i}.jpg"] for i in range(3)] == [28, 29, 30]
    assert [widths[f"{http_server.url}/m/{i}.jpg"] for i in range(3)] == [32, 33, 34]
    assert {rows[e]["mask"].split("/")[1] for e in entries} == {"local", "s3", "gs", "az", "http"}
    assert all((out / r["mask"]).is_file() for r in rows.values())
    written = (out / "run.json").read_text() + (out / "coverage.csv").read_text()
    assert AZ_KEY not in written and s3_server.secret not in written
