"""gs://, az:// and http(s):// storage against real servers (tests/stores.py): Google's storage
emulator, Azurite and the standard library's http.server. No mocks: each request goes over a
socket to a server that stores and answers.

Runs here are small (a handful of 32x32 images), so they are processed in process, with the tiny
untrained model, as in test_promises_run. Tests that start a server are in the slow tier (with the
S3 ones); the URL checks and the missing-extra message are fast.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
import time

import pytest
from stores import AZ_KEY
from test_promises_run import images

from batchmask.batch import backends
from batchmask.batch.entrystore import open_entry_storage
from batchmask.batch.lock import LockLost, OutputLock, OutputLocked
from batchmask.batch.runner import run
from batchmask.batch.storage import (
    EntryError,
    Storage,
    StorageError,
    StorageSpec,
    UnsafePathError,
    redact_urls,
    split_entry_url,
)

KEYS = ["a.jpg", "b c/ü ñ.jpeg", "b/x.jpg", "b0.jpg", "z/deep/er.png", "Z.jpg"]


def _paged(st: Storage, page_size: int) -> list[list[str]]:
    bucket, _, key_root = st.root.partition("/")
    return list(st.backend.pages(st.fs, bucket, key_root + "/", page_size))


# ----------------------------------------------------------------------------- GCS
@pytest.fixture
def gcs(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    return gcs_server


@pytest.mark.slow
def test_gcs_lists_in_code_point_order_reads_writes_and_refuses_escapes(gcs):
    bucket = gcs.new_bucket("st")
    fs = gcs.fs()
    for k in [*KEYS, "other.jpg"]:
        fs.pipe_file(f"{bucket}/in/{k}", k.encode())
    fs.pipe_file(f"{bucket}/inx.jpg", b"not under in/")
    st = StorageSpec(f"gs://{bucket}/in").open()
    assert type(st.backend) is backends.GCS
    st.page_size = 2
    listed = list(st.iter_files())
    assert listed == sorted([*KEYS, "other.jpg"])  # code point order: "Z" < "a" < "b c" < "b/" < "b0"
    # The emulator returns one page whatever maxResults says; Google's servers page (the same loop).
    assert sum(_paged(st, 2), []) == [f"in/{k}" for k in listed]
    assert st.read_bytes("b c/ü ñ.jpeg") == "b c/ü ñ.jpeg".encode()
    with pytest.raises(EntryError, match="over the limit"):
        st.read_bytes("a.jpg", max_bytes=2)
    out = StorageSpec(f"gs://{bucket}/out/").open()
    out.ensure_root()
    out.write_bytes("masks/q.png", b"png")
    assert fs.cat_file(f"{bucket}/out/masks/q.png") == b"png"
    assert out.exists("masks/q.png") and not out.exists("masks/r.png")
    with pytest.raises(UnsafePathError):
        out.write_bytes("../escape.png", b"x")
    with pytest.raises(StorageError, match="not found"):
        StorageSpec("gs://no-such-bucket-batchmask/x").open().ensure_root()


@pytest.mark.slow
def test_gcs_run_in_and_out_then_rerun_does_nothing(gcs, tmp_path, tiny_model_dir, monkeypatch):
    bucket = gcs.new_bucket("run")
    fs = gcs.fs()
    src = images(tmp_path / "src", ["cam1/a.jpg", "cam1/b.jpg", "cam2/c.jpg", "d.jpg", "e.jpg"])
    for p in sorted(src.rglob("*.jpg")):
        fs.pipe_file(f"{bucket}/incoming/{p.relative_to(src).as_posix()}", p.read_bytes())
    fs.pipe_file(f"{bucket}/incoming/bad.jpg", b"")
    monkeypatch.setattr(Storage, "page_size", 2)  # several list requests (where the server pages)
    s = run(f"gs://{bucket}/incoming/", f"gs://{bucket}/masks/", str(tiny_model_dir), quiet=True)
    assert (s.total, s.ok, s.failed, s.exit_code) == (6, 5, 1, 3)
    got = {r["image"]: r for r in csv.DictReader(io.StringIO(fs.cat_file(f"{bucket}/masks/coverage.csv").decode()))}
    assert sorted(got) == ["bad.jpg", "cam1/a.jpg", "cam1/b.jpg", "cam2/c.jpg", "d.jpg", "e.jpg"]
    assert fs.exists(f"{bucket}/masks/{got['cam2/c.jpg']['mask']}")
    assert not fs.exists(f"{bucket}/masks/_lock.json")  # released
    s2 = run(f"gs://{bucket}/incoming/", f"gs://{bucket}/masks/", str(tiny_model_dir), quiet=True)
    assert (s2.skipped, s2.ok, s2.failed) == (6, 0, 0)


@pytest.mark.slow
def test_gcs_output_lock_falls_back_to_settle_on_the_emulator(gcs):
    """The emulator ignores ifGenerationMatch: the probe finds out, and the lock still excludes."""
    bucket = gcs.new_bucket("lock")
    out = StorageSpec(f"gs://{bucket}/o").open()
    first = OutputLock(out).acquire()
    try:
        assert first._conditional is False
        with pytest.raises(OutputLocked):
            OutputLock(StorageSpec(f"gs://{bucket}/o").open()).acquire()
        first.check(renew=True)
    finally:
        first.release()
    assert not out.exists("_lock.json")
    OutputLock(out).acquire().release()


# ----------------------------------------------------------------------------- Azure
@pytest.fixture
def az(azurite, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    return azurite


@pytest.mark.slow
def test_azure_lists_page_by_page_in_code_point_order_reads_and_writes(az):
    container = az.new_container("st")
    fs = az.fs()
    for k in [*KEYS, "other.jpg"]:
        fs.pipe_file(f"{container}/in/{k}", k.encode())
    fs.pipe_file(f"{container}/inx.jpg", b"not under in/")
    # what an account with a hierarchical namespace (ADLS Gen2) lists for a folder: not a file
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(az.connection_string).get_blob_client(
        container, "in/b c").upload_blob(b"", metadata={"hdi_isfolder": "true"})
    st = StorageSpec(f"az://{container}/in").open()
    assert type(st.backend) is backends.Azure
    pages = _paged(st, 2)
    assert len(pages) == 4 and all(len(p) <= 2 for p in pages)  # 8 blobs, the folder left out of its page
    st.page_size = 2
    listed = list(st.iter_files())
    assert [f"in/{k}" for k in listed] == sum(pages, [])
    assert listed == sorted([*KEYS, "other.jpg"])
    assert st.read_bytes("b c/ü ñ.jpeg") == "b c/ü ñ.jpeg".encode()
    out = StorageSpec(f"abfs://{container}/out").open()
    out.ensure_root()
    out.write_bytes("masks/q.png", b"png")
    assert fs.cat_file(f"{container}/out/masks/q.png") == b"png"
    assert out.exists("masks/q.png") and not out.exists("masks/r.png")
    with pytest.raises(StorageError, match="not found"):
        StorageSpec("az://no-such-container/x").open().ensure_root()


@pytest.mark.slow
def test_azure_run_in_and_out_with_a_conditional_lock(az, tmp_path, tiny_model_dir, monkeypatch):
    container = az.new_container("run")
    fs = az.fs()
    src = images(tmp_path / "src", ["cam1/a.jpg", "cam1/b.jpg", "cam2/c.jpg", "d.jpg", "e.jpg"])
    for p in sorted(src.rglob("*.jpg")):
        fs.pipe_file(f"{container}/incoming/{p.relative_to(src).as_posix()}", p.read_bytes())
    monkeypatch.setattr(Storage, "page_size", 2)  # three list requests
    s = run(f"az://{container}/incoming", f"az://{container}/masks", str(tiny_model_dir), quiet=True)
    assert (s.total, s.ok, s.failed) == (5, 5, 0)
    got = list(csv.DictReader(io.StringIO(fs.cat_file(f"{container}/masks/coverage.csv").decode())))
    assert sorted(r["image"] for r in got) == ["cam1/a.jpg", "cam1/b.jpg", "cam2/c.jpg", "d.jpg", "e.jpg"]
    images(src, ["f.jpg"])
    fs.pipe_file(f"{container}/incoming/f.jpg", (src / "f.jpg").read_bytes())
    s2 = run(f"az://{container}/incoming", f"az://{container}/masks", str(tiny_model_dir), quiet=True)
    assert (s2.skipped, s2.ok) == (5, 1)
    record = fs.cat_file(f"{container}/masks/run.json").decode()
    assert AZ_KEY not in record and "AccountKey" not in record and '"adlfs"' in record
    # Azure honours If-None-Match / If-Match: the lock takes the conditional protocol, and of two
    # takers of a free lock only one wins.
    out = StorageSpec(f"az://{container}/masks").open()
    lock = OutputLock(out).acquire()
    try:
        assert lock._conditional is True
        other = OutputLock(StorageSpec(f"az://{container}/masks").open())
        other._conditional = True
        assert other._take_conditional(None) is not None  # If-None-Match: * on an existing lock
        with pytest.raises(OutputLocked):
            other.acquire()
        lock.check(renew=True)  # If-Match with our ETag
        # another run takes the output over (its write changes the ETag): the renewal is refused
        fs.pipe_file(f"{container}/masks/_lock.json", json.dumps({"token": "other", "pid": 7, "host": "h",
                                                                   "expires": time.time() + 100}).encode())
        with pytest.raises(LockLost, match="taken over by pid 7 on h"):
            lock.check(renew=True)
    finally:
        lock.release()
    assert fs.exists(f"{container}/masks/_lock.json")  # the other run's, left alone
    fs.rm_file(f"{container}/masks/_lock.json")
    lock = OutputLock(out).acquire()
    lock.release()
    assert not fs.exists(f"{container}/masks/_lock.json")


# ----------------------------------------------------------------------------- HTTP
@pytest.mark.slow
def test_http_entries_read_through_one_storage_per_host(http_server):
    (http_server.root / "p q").mkdir()
    (http_server.root / "p q" / "x.jpg").write_bytes(b"jpeg bytes")
    st, rel = open_entry_storage(f"{http_server.url}/p%20q/x.jpg?size=large")
    assert (st.root, rel) == (http_server.url, "p%20q/x.jpg?size=large")
    assert st.read_bytes(rel) == b"jpeg bytes"  # the query is sent; http.server ignores it
    st2, rel2 = open_entry_storage(f"{http_server.url}/p%20q/x.jpg")
    assert st2 is st and rel2 == "p%20q/x.jpg"
    with pytest.raises(FileNotFoundError):
        st.read_bytes("p%20q/missing.jpg")
    with pytest.raises(EntryError, match="over the limit"):
        st.read_bytes(rel, max_bytes=4)
    with pytest.raises(StorageError, match=r"cannot list http\(s\) URLs; use --input-list"):
        list(StorageSpec(http_server.url).open().iter_files())
    with pytest.raises(StorageError, match="read-only"):
        st.write_bytes("y.png", b"x")
    with pytest.raises(StorageError, match="read-only"):
        StorageSpec(http_server.url + "/out").open().ensure_root()


@pytest.mark.slow
def test_a_run_refuses_an_http_input_or_output_before_writing_anything(http_server, tmp_path, tiny_model_dir):
    images(tmp_path / "in", ["a.jpg"])
    with pytest.raises(StorageError, match=r"cannot list http\(s\) URLs; use --input-list"):
        run(f"{http_server.url}/photos/", str(tmp_path / "out"), str(tiny_model_dir), quiet=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(StorageError, match="read-only"):
        run(str(tmp_path / "in"), f"{http_server.url}/out/", str(tiny_model_dir), quiet=True)


@pytest.mark.slow
def test_http_retries_a_503_and_times_out_on_a_server_that_never_answers(http_server, monkeypatch):
    (http_server.root / "ok.jpg").write_bytes(b"fine")
    st, rel = open_entry_storage(f"{http_server.url}/fail-once/ok.jpg")
    assert st.read_bytes(rel) == b"fine"  # 503, then the retry
    monkeypatch.setattr(backends, "HTTP_READ_TIMEOUT_S", 1)
    hung = StorageSpec(http_server.url).open()  # a new filesystem, with the 1 s read timeout
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot read"):
        hung.read_bytes("hang/x.jpg")
    took = time.monotonic() - t0
    assert 2.5 < took < 15, took  # three attempts of 1 s, 0.5 s and 1 s apart


def test_entry_urls_split_into_a_root_and_a_safe_relative_path():
    assert split_entry_url("gs://bkt/a/b.jpg") == ("gs://bkt", "a/b.jpg")
    assert split_entry_url("s3://bkt/k.jpg") == ("s3://bkt", "k.jpg")
    assert split_entry_url("az://c/d/e.png") == ("az://c", "d/e.png")
    assert split_entry_url("HTTPS://Host:8443/x/y.jpg?a=1&b=/c") == ("https://Host:8443", "x/y.jpg?a=1&b=/c")
    for bad in ("gs://bkt/../x.jpg", "gs://bkt/a//b.jpg", "gs://bkt/", "https://h/a/../../x.jpg",
                "https://h/a/%2e%2e/x.jpg", "https://h/a%2F..%2Fx.jpg", "https://h/", "https://h/x.jpg#frag",
                "https:///x.jpg"):
        with pytest.raises(UnsafePathError):
            split_entry_url(bad)


def test_secrets_in_urls_and_connection_strings_are_redacted():
    text = ("https://acct.blob.core.windows.net/c/x.jpg?sv=2024&sig=SeCrEt%2Fsig&se=1 "
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=S3cr3tKey==;EndpointSuffix=x "
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x")
    out = redact_urls(text)
    for secret in ("SeCrEt", "S3cr3tKey", "abc123", "AKIA"):
        assert secret not in out
    assert "sv=2024" in out and "AccountName=a" in out
    spec = StorageSpec("https://h/c?sig=SeCrEt")
    assert "SeCrEt" not in repr(spec) and "SeCrEt" not in str(spec.public())
    # older and other signing schemes: S3 SigV2 / GCS V2 (Signature=), CloudFront (Policy=), bearer tokens
    v2 = ("https://b.s3.amazonaws.com/k.jpg?AWSAccessKeyId=A&Expires=1&Signature=V2sEcReT "
          "https://d.cloudfront.net/k.jpg?Policy=PoLiCy&Signature=CfSiG&Key-Pair-Id=K "
          "https://h/k.jpg?access_token=ToKeN1&x=1 https://h/k.jpg?token=ToKeN2")
    out = redact_urls(v2)
    for secret in ("V2sEcReT", "PoLiCy", "CfSiG", "ToKeN1", "ToKeN2"):
        assert secret not in out
    assert "Expires=1" in out and "x=1" in out


def test_a_probes_last_words_about_a_signed_url_are_redacted():
    """The probe child reads the entry with its signature; its dying line is logged by the driver."""
    from batchmask.batch.probe import verdict_of

    v = verdict_of(1, "Traceback ...\nFileNotFoundError: https://h/x.jpg?X-Amz-Signature=SeCrEt: 404\n")
    assert "SeCrEt" not in v["how"] and "https://h/x.jpg?X-Amz-Signature=<redacted>" in v["how"]


def test_a_filesystem_without_a_paged_listing_is_listed_whole_with_one_warning(caplog):
    """fsspec's in-memory filesystem stands for any store this package has no backend class for."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for k in KEYS:
        fs.pipe_file(f"/whole/in/{k}", k.encode())
    fs.pipe_file("/whole/inx.jpg", b"not under in/")
    backends.WholeListing._warned.discard("memory")
    st = StorageSpec("memory://whole/in").open()
    assert type(st.backend) is backends.WholeListing
    with caplog.at_level("WARNING", logger="batchmask.batch.backends"):
        assert list(st.iter_files()) == list(st.iter_files()) == sorted(KEYS)
    assert [r.getMessage() for r in caplog.records] == [
        "memory:// has no paged listing here: listing it whole, in memory"]
    out = StorageSpec("memory://whole/out").open()
    out.write_bytes("m/a.png", b"png")
    lock = OutputLock(out).acquire()  # no conditional writes: the settle protocol
    try:
        assert lock._conditional is False
    finally:
        lock.release()


def test_workers_get_the_drivers_azure_and_gcs_emulator_settings(monkeypatch):
    """Ray workers on other nodes do not share the driver's environment: the spec carries them."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=k")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    az = StorageSpec("az://c/p").resolved()
    assert az.storage_options == {"connection_string": "AccountName=a;AccountKey=k"}
    assert "AccountKey" not in repr(az) and "AccountKey" not in str(az.public())
    assert StorageSpec("az://c/p", storage_options={"account_name": "x", "anon": True}).resolved().storage_options == {
        "account_name": "x", "anon": True}  # options of the user's own win
    assert StorageSpec("gs://b/p").resolved().storage_options == {"endpoint_url": "http://127.0.0.1:4443"}


@pytest.mark.parametrize(("url", "module", "extra"), [("gs://b/p", "gcsfs", "gcs"), ("az://c/p", "adlfs", "azure"),
                                                      ("abfs://c/p", "adlfs", "azure")])
def test_a_missing_extra_is_one_line_naming_it(url, module, extra):
    """The library really is unimportable in that process (sys.modules blocks it), as on a plain install."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None
        from batchmask.batch.storage import StorageSpec, StorageError
        try:
            StorageSpec({url!r}).open()
        except StorageError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    scheme = url.split("://")[0]
    assert out.stdout == f"{url}: install batchmask[{extra}] ({module}) to read {scheme}:// URLs\n", out.stderr


@pytest.mark.slow
def test_http_entries_in_a_worker_a_404_is_the_images_error_row_a_dead_server_is_the_runs(http_server,
                                                                                        monkeypatch):
    """What a run does with URL entries read through :func:`open_entry_storage`: the worker's own
    load step (the model left out), against the real server."""
    from types import SimpleNamespace

    from batchmask.batch.worker import MaskWorker, WorkerOptions

    images(http_server.root, ["w/ok.jpg"])
    monkeypatch.setattr(backends, "HTTP_READ_TIMEOUT_S", 1)
    w = object.__new__(MaskWorker)
    w.opts, w.model = WorkerOptions(), SimpleNamespace(image_size=64)
    w.out = SimpleNamespace(check_name=lambda rel: None)
    w.inp, rel = open_entry_storage(f"{http_server.url}/w/ok.jpg?v=1", StorageSpec("https://", storage_options={
        "headers": {"User-Agent": "batchmask-test"}}))  # options of its own: a fresh filesystem, 1 s timeout
    d = w._load(rel, "masks/ok.png")
    assert not d.error and (d.width, d.height) == (32, 24) and d.x.shape == (64, 64, 3)
    gone = w._load("w/gone.jpg", "masks/gone.png")
    assert "cannot read (FileNotFoundError" in gone.error and "404" in gone.error
    with pytest.raises(StorageError, match="no answer after 3 attempts"):  # fails the shard, then the run
        w._load("hang/x.jpg", "masks/x.png")


@pytest.mark.slow
def test_entries_of_every_scheme_read_through_one_storage_per_bucket(s3_server, gcs, az, http_server):
    """A list mixing s3://, gs://, az:// and http:// entries (what --input-list reads), each read by
    the helper; the run's S3 endpoint and options go to the S3 entries only."""
    s3b, gsb, azc = s3_server.new_bucket("mix"), gcs.new_bucket("mix"), az.new_container("mix")
    s3_server.fs().pipe_file(f"{s3b}/p/1.jpg", b"s3 one")
    s3_server.fs().pipe_file(f"{s3b}/p/2.jpg", b"s3 two")
    gcs.fs().pipe_file(f"{gsb}/q/1.jpg", b"gs one")
    az.fs().pipe_file(f"{azc}/r/1.jpg", b"az one")
    (http_server.root / "s").mkdir()
    (http_server.root / "s" / "1.jpg").write_bytes(b"http one")
    defaults = StorageSpec("", s3_server.endpoint_url, {"key": s3_server.key, "secret": s3_server.secret})
    entries = {f"s3://{s3b}/p/1.jpg": b"s3 one", f"s3://{s3b}/p/2.jpg": b"s3 two", f"gs://{gsb}/q/1.jpg": b"gs one",
               f"az://{azc}/r/1.jpg": b"az one", f"{http_server.url}/s/1.jpg": b"http one"}
    stores = []
    for url, want in entries.items():
        st, rel = open_entry_storage(url, defaults)
        assert st.read_bytes(rel, max_bytes=100) == want
        stores.append(st)
    assert stores[0] is stores[1] and len({id(s) for s in stores}) == 4
    with pytest.raises(FileNotFoundError):
        st, rel = open_entry_storage(f"gs://{gsb}/q/missing.jpg", defaults)
        st.read_bytes(rel)
