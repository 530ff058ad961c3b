"""``batchmask run --input-list``: .txt/.csv/.parquet lists of local paths and URLs, read streaming;
one mask path per entry that never leaves masks/; reruns with a grown list do only the new entries.

Runs are in process (a handful of small images, the tiny untrained model). S3 entries and lists:
test_input_list_s3.py (slow tier: the SeaweedFS server).
"""

from __future__ import annotations

import csv
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_promises_run import images

from batchmask.batch import manifest
from batchmask.batch.entries import (
    EntryReader,
    ListSource,
    entry_key,
    entry_mask,
    entry_overlay,
    entry_problem,
    locate,
)
from batchmask.batch.manifest import EntryList, ListError
from batchmask.batch.options import RunError
from batchmask.batch.runner import run
from batchmask.batch.seen import SeenKeys
from batchmask.batch.storage import EntryError, StorageError, StorageSpec, check_rel
from batchmask.cli import main
from batchmask.jobs.spec import JobError, load_job


def rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len({r["image"] for r in got}), "an image has two rows"
    return {r["image"]: r for r in got}


def files_under(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_txt_list_of_relative_absolute_and_file_entries_then_only_new_ones(tmp_path, tiny_model_dir, monkeypatch):
    imgs = images(tmp_path / "imgs", [f"p{i}.jpg" for i in range(6)])
    lists = tmp_path / "lists"
    lists.mkdir()
    lst = lists / "new.txt"
    lst.write_text("\ufeff# tonight's uploads\n../imgs/p0.jpg\n\n"  # relative to the list's folder
                   f"  {imgs}/p1.jpg  \r\nfile://{imgs}/p2.jpg\n{tmp_path}/gone.jpg\n")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "imgs")  # not the list's folder: relative entries do not depend on it
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), quiet=True)
    assert (s.total, s.ok, s.failed, s.skipped, s.exit_code) == (4, 3, 1, 0, 3)
    got = rows(out)
    assert set(got) == {"../imgs/p0.jpg", f"{imgs}/p1.jpg", f"file://{imgs}/p2.jpg", f"{tmp_path}/gone.jpg"}
    assert got["../imgs/p0.jpg"]["mask"] == "masks/relative/%2E./imgs/p0.jpg.png"
    assert got[f"{imgs}/p1.jpg"]["mask"] == f"masks/local{imgs}/p1.jpg.png"
    assert got[f"file://{imgs}/p2.jpg"]["mask"] == f"masks/file/~e{imgs}/p2.jpg.png"
    assert got[f"{tmp_path}/gone.jpg"]["status"] == "error" and "cannot read" in got[f"{tmp_path}/gone.jpg"]["error"]
    for r in got.values():
        assert r["status"] == "error" or (out / r["mask"]).is_file()
    table = pq.read_table(out / "results.parquet").to_pydict()
    assert sorted(table["image"]) == sorted(got)
    info = json.loads((out / "run.json").read_text())
    assert info["input"]["list"] == str(lst) and info["input"]["base"] == str(lists)

    # the same list again: nothing to do; grown by two: only those two
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), quiet=True)
    assert (s.total, s.ok, s.failed, s.skipped) == (4, 0, 0, 4)
    with open(lst, "a") as f:
        f.write("../imgs/p3.jpg\n../imgs/p4.jpg\n")
    before = {m: (out / r["mask"]).stat().st_mtime_ns for m, r in got.items() if r["mask"]}
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), quiet=True)
    assert (s.total, s.ok, s.failed, s.skipped) == (6, 2, 0, 4)
    assert len(rows(out)) == 6
    assert {m: (out / got[m]["mask"]).stat().st_mtime_ns for m in before} == before  # not rewritten

    # A list run's masks are where entry_mask puts them: the record index keeps each as a flag bit,
    # none by name (by name, an output of 10 M list entries would cost gigabytes in the driver).
    from batchmask.batch.outputs import read_records

    index = read_records(StorageSpec(str(out)).open(), default_mask=entry_mask)
    assert index._odd == {} and index.get(f"{imgs}/p1.jpg") == f"masks/local{imgs}/p1.jpg.png"


def test_csv_and_parquet_lists_with_a_named_column_and_duplicates(tmp_path, tiny_model_dir):
    imgs = images(tmp_path / "imgs", ["a.jpg", "a.png", "sub/a.jpg"])
    lst = tmp_path / "l.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", " uri"])
        for i, name in enumerate(["a.jpg", "a.png", "sub/a.jpg", "a.jpg", "", f"{imgs}/a.png"]):
            w.writerow([i, f"imgs/{name}" if name and not name.startswith("/") else name])
    out = tmp_path / "out"
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), list_column="uri", overlays=True, quiet=True)
    # 5 entries (the empty one skipped); imgs/a.jpg twice: done once, counted as skipped
    assert (s.total, s.ok, s.skipped) == (5, 4, 1)
    got = rows(out)
    masks = [r["mask"] for r in got.values()]
    assert len(set(masks)) == 4 and "masks/relative/imgs/a.jpg.png" in masks and "masks/relative/imgs/a.png.png" in masks
    assert json.loads((out / "run.json").read_text())["input"]["duplicates"] == 1
    assert (out / "overlays/relative/imgs/sub/a.jpg.jpg").is_file()  # beside its mask's path, not the entry's

    pql = tmp_path / "l.parquet"
    pq.write_table(pa.table({"path": [f"{imgs}/a.jpg", None, f"{imgs}/sub/a.jpg", f"{imgs}/a.jpg"]}), pql)
    out2 = tmp_path / "out2"
    s = run(None, str(out2), str(tiny_model_dir), input_list=str(pql), no_masks=True, quiet=True)
    assert (s.total, s.ok, s.skipped) == (3, 2, 1)
    got = rows(out2)
    assert set(got) == {f"{imgs}/a.jpg", f"{imgs}/sub/a.jpg"} and {r["mask"] for r in got.values()} == {""}
    assert not (out2 / "masks").exists()
    s = run(None, str(out2), str(tiny_model_dir), input_list=str(pql), quiet=True)  # now with masks: redone
    assert (s.ok, s.skipped) == (2, 1) and (out2 / rows(out2)[f"{imgs}/a.jpg"]["mask"]).is_file()


@pytest.mark.parametrize("name,content,column,expected", [
    ("l.csv", "id,url\n1,a.jpg\n", None, "no column 'path' (columns: 'id', 'url'); name the column"),
    ("l.csv", "", None, "empty; expected a header row"),
    ("l.csv", "id,path\n1\n", None, "line 2: 1 fields, no value for column 'path'"),
    ("l.txt", b"a.jpg\nb\xff.jpg\n", None, "line 2: not UTF-8"),
    ("l.txt", "a.jpg\n", "path", "--list-column applies to .csv and .parquet lists"),
    ("l.json", "[]", None, "unknown list format"),
    ("gone.txt", None, None, "no such list file"),
])
def test_list_errors_name_the_file_and_the_line(tmp_path, name, content, column, expected):
    lst = tmp_path / name
    if content is not None:
        lst.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ListError) as ei:
        EntryList(str(lst), column).check()
        list(EntryList(str(lst), column))
    assert str(ei.value).startswith(str(lst)) and expected in str(ei.value), str(ei.value)


def test_parquet_list_errors_and_nothing_written_before_the_list_is_checked(tmp_path, tiny_model_dir):
    lst = tmp_path / "l.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg"], "n": [1]}), lst)
    with pytest.raises(ListError, match=r"no column 'path' \(columns: 'uri', 'n'\)"):
        run(None, str(tmp_path / "out"), str(tiny_model_dir), input_list=str(lst), quiet=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ListError, match="column 'n' holds int64, not strings"):
        EntryList(str(lst), "n").check()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ListError, match="not a Parquet file"):
        EntryList(str(tmp_path / "bad.parquet")).check()


def test_cli_input_and_input_list_are_exclusive(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg\n")
    for args, msg in ((["-i", str(tmp_path), "--input-list", str(lst)], "mutually exclusive"),
                      ([], "give --input"), (["-i", str(tmp_path), "--list-column", "x"], "give --input-list too")):
        res = CliRunner().invoke(main, ["run", *args, "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and msg in res.output, res.output
    with pytest.raises(RunError, match="mutually exclusive"):
        run(str(tmp_path), str(tmp_path / "out"), input_list=str(lst))
    with pytest.raises(RunError, match="--glob filters a folder's listing"):
        run(None, str(tmp_path / "out"), input_list=str(lst), glob="*.jpg")


HOSTILE = [
    "../../etc/passwd", "/etc/passwd", "a/../../b.jpg", "..", ".", "", "/", "//x.jpg", "%2e%2e/%2e%2e/x.jpg",
    "a\\..\\..\\b.jpg", "x\x00.jpg", "C:\\x.jpg", ".tmp-123", ".hidden.jpg", "~e", "a.jpg.png/b.jpg", "a.jpg.png", "a.jpg.jpg/b.png", "a.jpg.jpg",
    "a.jpg", "a.png", "x" * 5000 + ".jpg", "é/" * 300 + "x.jpg", "\u202egpj.exe", "a~hdeadbeef.jpg",
    "https://h/a.jpg", "https://h/a.jpg?x=1", "https://h/a.jpg?x=2", "https://h/a.jpg?", "https://h/a.jpg#f",
    "https://h//a.jpg", "https://h", "https://h/", "https://h/../../x.jpg", "https://h/%2e%2e/x.jpg",
    "s3://b/a.jpg", "s3://c/a.jpg", "s3://b/x/a.jpg", "s3://b//a.jpg", "s3://b/a.jpg?x=1", "s3://b/..",
    "s3a://b/a.jpg", "gs://b/a.jpg", "az://b/a.jpg", "file:///etc/passwd", "file://etc/passwd",
    "local://etc/passwd", "relative://x", "s3://" + "k" * 300 + "/a.jpg",
]


def test_hostile_entries_get_distinct_masks_that_never_leave_masks():
    masks = {k: entry_mask(k) for k in HOSTILE}
    assert len(set(masks.values())) == len(HOSTILE), "two entries share a mask path"
    for k, m in masks.items():
        check_rel(m)  # no '..', '.', empty segment, absolute, backslash or NUL
        parts = m.split("/")
        assert parts[0] == "masks" and m.endswith(".png"), (k, m)
        assert all(len(p.encode()) <= 255 and not p.startswith(".") for p in parts), (k, m)
        assert not any(p.endswith(".png") for p in parts[:-1]), (k, m)  # no folder named like a mask file
    # no mask path is a folder of another
    folders = {"/".join(m.split("/")[:i]) for m in masks.values() for i in range(2, len(m.split("/")))}
    assert not folders & set(masks.values())
    overlays = {entry_overlay(k) for k in HOSTILE}  # the same for overlays: a.jpg's is a.jpg.jpg
    assert len(overlays) == len(HOSTILE)
    assert not {"/".join(o.split("/")[:i]) for o in overlays for i in range(2, len(o.split("/")))} & overlays
    assert masks["s3://b/a.jpg"] == "masks/s3/b/a.jpg.png" and masks["s3://c/a.jpg"] == "masks/s3/c/a.jpg.png"
    assert masks["https://h/a.jpg?x=1"].startswith("masks/https/h/a.jpg~q")
    assert masks["/etc/passwd"] == "masks/local/etc/passwd.png"


def test_entries_that_cannot_be_read_as_given_are_error_rows_without_credentials(tmp_path):
    base = str(tmp_path)
    assert entry_problem("s3://AKIA:hunter2@b/a.jpg", base) == \
        "s3://b/a.jpg: credentials in the URL are not supported; use the environment or a profile"
    assert entry_key("https://u:hunter2@h/a.jpg") == "https://h/a.jpg"
    assert "unsupported scheme 'ftp'" in entry_problem("ftp://h/a.jpg", base)
    assert "unsupported scheme 'local'" in entry_problem("local://etc/passwd", base)
    assert entry_problem("x\x00.jpg", base)
    assert entry_problem("s3://b//a.jpg", base) and entry_problem("https://h", base)
    assert entry_problem("../x.jpg", base) is None  # local: the list's folder's sibling, as written
    assert entry_problem("../x.jpg", "s3://b/lists") is not None  # remote: never out of the list's prefix
    assert locate("x/a.jpg", "s3://b/lists") == "s3://b/lists/x/a.jpg"
    assert locate("../x.jpg", base) == os.path.normpath(f"{tmp_path}/../x.jpg")


def test_hostile_local_file_names_run_and_stay_under_masks(tmp_path, tiny_model_dir):
    names = ["a\\..\\b.jpg", "%2e%2e.jpg", ".hidden.jpg", "~x.jpg", "q?x=1.jpg", "x" * 240 + ".jpg", "é ü.jpg"]
    imgs = images(tmp_path / "imgs", names)
    lst = tmp_path / "imgs" / "l.parquet"
    pq.write_table(pa.table({"path": names + ["../" * 40 + "etc/passwd", "a\x00b.jpg"]}), lst)
    out = tmp_path / "out"
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), quiet=True)
    assert (s.total, s.ok, s.failed) == (9, 6, 3)
    got = rows(out)
    assert "a NUL in the entry" in got["a\x00b.jpg"]["error"]  # kept in the image column, never read
    assert "refusing unsafe path" in got["a\\..\\b.jpg"]["error"]  # a backslash is refused, as in a folder run
    assert got["../" * 40 + "etc/passwd"]["status"] == "error"  # read (the list may name any file), not an image
    written = files_under(out)
    assert all(w.startswith(("masks/relative/", "_", ".")) or "/" not in w for w in written), written
    assert {got[n]["mask"] for n in names if got[n]["status"] == "ok"} <= written
    assert sorted(p.name for p in imgs.iterdir()) == sorted([*names, "l.parquet"])  # nothing written beside


def test_reader_refuses_local_entries_where_workers_cannot_see_them(tmp_path):
    images(tmp_path, ["a.jpg"])
    src = ListSource(str(tmp_path / "l.txt"), str(tmp_path))
    assert EntryReader(src).read_bytes("a.jpg")[:2] == b"\xff\xd8"
    with pytest.raises(EntryError, match=f"^{tmp_path}/a.jpg: .* bytes, over the limit of 10 "):
        EntryReader(src).read_bytes(f"{tmp_path}/a.jpg", max_bytes=10)  # the entry, not a path under "/"
    remote_only = ListSource(str(tmp_path / "l.txt"), str(tmp_path), local_entries=False)
    with pytest.raises(StorageError, match="--shared-fs"):  # fails the shard and the run, not an error row
        EntryReader(remote_only).read_bytes("a.jpg")


def test_parquet_list_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    n = 200_000
    lst = tmp_path / "big.parquet"
    pq.write_table(pa.table({"path": [f"s3://bucket/some/deep/prefix/image-{i:09d}.jpg" for i in range(n)]}), lst,
                   row_group_size=10_000)
    monkeypatch.setattr(manifest, "PARQUET_BATCH", 1000)

    def peaks(read) -> tuple[int, int, object]:
        """(Python peak, Arrow peak, the result) of ``read()``."""
        tracemalloc.start()
        try:
            base = pa.total_allocated_bytes()
            got = read()
            return tracemalloc.get_traced_memory()[1], pa.total_allocated_bytes() - base, got
        finally:
            tracemalloc.stop()

    def stream():
        arrow, count, last = 0, 0, None
        for i, entry in enumerate(EntryList(str(lst))):
            count, last = count + 1, entry
            if i % 5000 == 0:
                arrow = max(arrow, pa.total_allocated_bytes())
        return arrow, count, last

    whole_py, _, whole = peaks(lambda: pq.read_table(lst).column("path").to_pylist())
    py, _, (arrow, count, last) = peaks(stream)
    assert count == n == len(whole) and last == whole[-1]
    del whole
    assert py < whole_py / 10, (py, whole_py)  # the whole list as Python strings: some 20 MB
    assert arrow < n * len(last) / 4, arrow  # the column's text alone: 9.6 MB


def test_seen_keys_is_exact_across_its_sorted_levels():
    seen, ref = SeenKeys(buffer=64), set()
    keys = [f"s3://b/{i % 700}.jpg" for i in range(3000)]
    for k in keys:
        assert seen.add(k) == (k not in ref)
        ref.add(k)
    assert len(seen) == 700 and len(seen._levels) <= 6


JOB = """\
name = "nightly"
schedule = "0 3 * * *"
output = "out"
model = "{model}"
"""


def test_job_file_input_list(tmp_path, tiny_model_dir):
    images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "new.csv").write_text("file\n../imgs/a.jpg\n../imgs/b.jpg\n")
    job_file = tmp_path / "jobs" / "n.toml"
    job_file.write_text(JOB.format(model=tiny_model_dir) + 'input_list = "new.csv"\nlist_column = "file"\n')
    job = load_job(job_file)
    assert job.input is None and job.input_list == str(tmp_path / "jobs" / "new.csv") and job.list_column == "file"
    assert load_job(_write(tmp_path, job.to_toml())).input_list == job.input_list  # what `jobs submit` ships
    res = CliRunner().invoke(main, ["jobs", "validate", str(job_file)])
    assert res.exit_code == 0 and f"list {job.input_list} -> " in res.output, res.output
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "k8s", str(job_file)])
    assert res.exit_code == 0 and "WARNING: local input/output paths in nightly" in res.output
    s = run(**{**job.runner_kwargs(), "quiet": True})
    assert (s.total, s.ok) == (2, 2)
    assert set(rows(tmp_path / "jobs" / "out")) == {"../imgs/a.jpg", "../imgs/b.jpg"}


def _write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("extra,expected", [
    ('input = "in"\ninput_list = "l.txt"\n', "'input' and 'input_list' are mutually exclusive"),
    ("", "missing required field 'input' (a folder or prefix) or 'input_list'"),
    ('input_list = "l.json"\n', "field 'input_list' = 'l.json': must end in .txt, .csv or .parquet"),
    ('input = "in"\nlist_column = "x"\n', "field 'list_column' = 'x': is the column of --input-list's entries"),
    ('input_list = "l.txt"\nglob = "*.jpg"\n', "field 'glob' = '*.jpg': filters a folder's listing"),
    ('input_list = "https://u:pw@h/l.txt"\n', "field 'input_list' = <redacted>: credentials in the URL"),
])
def test_job_file_input_list_problems(tmp_path, extra, expected):
    with pytest.raises(JobError) as ei:
        load_job(_write(tmp_path, JOB.format(model="m") + extra))
    assert expected in str(ei.value), str(ei.value)
    assert "pw" not in str(ei.value)


def test_http_entries_with_query_strings_get_masks_of_their_own(tmp_path, tiny_model_dir):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    images(tmp_path / "www", ["a.jpg"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        lst = tmp_path / "l.txt"
        lst.write_text(f"{url}/a.jpg\n{url}/a.jpg?size=2\n{url}/gone.jpg\n")
        s = run(None, str(tmp_path / "out"), str(tiny_model_dir), input_list=str(lst), quiet=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (s.total, s.ok, s.failed) == (3, 2, 1)
    got = rows(tmp_path / "out")
    host = f"127.0.0.1%3A{server.server_port}"
    assert got[f"{url}/a.jpg"]["mask"] == f"masks/http/{host}/a.jpg.png"
    assert got[f"{url}/a.jpg?size=2"]["mask"].startswith(f"masks/http/{host}/a.jpg~q")
    assert "cannot read" in got[f"{url}/gone.jpg"]["error"]


def test_one_output_holds_a_folder_run_or_a_list_run_not_both(tmp_path, tiny_model_dir):
    imgs = images(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "l.txt").write_text(f"{imgs}/a.jpg\n")
    run(str(imgs), str(tmp_path / "out"), str(tiny_model_dir), quiet=True)
    with pytest.raises(RunError, match="holds the results of the folder or prefix .*use another --output"):
        run(None, str(tmp_path / "out"), str(tiny_model_dir), input_list=str(tmp_path / "l.txt"), quiet=True)
    run(None, str(tmp_path / "out2"), str(tiny_model_dir), input_list=str(tmp_path / "l.txt"), quiet=True)
    with pytest.raises(RunError, match="holds the results of the list"):
        run(str(imgs), str(tmp_path / "out2"), str(tiny_model_dir), quiet=True)


def test_the_probe_of_a_listed_image_reads_it_from_its_own_storage(tmp_path):
    from batchmask.batch.probe import probe_image

    images(tmp_path / "imgs", ["a.jpg"])
    src = ListSource(str(tmp_path / "l.txt"), str(tmp_path))
    settings = {"max_bytes": 1 << 20, "max_pixels": 10**6, "draft": True, "image_size": 64}
    assert probe_image(src, "imgs/a.jpg", settings) == {"crashed": False, "how": "decoded alone without a crash"}
    assert probe_image(src, f"file://{tmp_path}/imgs/a.jpg", settings)["crashed"] is False


def test_an_entry_whose_store_is_not_installed_stops_the_run_with_the_pip_line(tmp_path, monkeypatch):
    from batchmask.batch.backends import BACKENDS
    from batchmask.batch.entries import require_store

    monkeypatch.setattr(BACKENDS["gs"], "package", "batchmask_no_such_module")  # as without gcsfs
    checked: set[str] = set()
    require_store("s3://b/a.jpg", checked)
    require_store("/data/a.jpg", checked)
    with pytest.raises(RunError, match=r"^gs://b/a.jpg: install batchmask\[gcs\]"):
        require_store("gs://b/a.jpg", checked)


def test_signed_urls_are_read_with_their_signature_which_is_never_stored(tmp_path, tiny_model_dir):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Signed(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            asked.append(self.path)
            if "X-Amz-Signature=s3cr3t" not in self.path and "sig=s3cr3t" not in self.path:
                self.send_error(403, "no signature")
                return
            self.path = self.path.split("?", 1)[0]
            super().do_GET()

    images(tmp_path / "www", ["a.jpg"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Signed, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        lst = tmp_path / "l.txt"
        lst.write_text(f"{url}/a.jpg?X-Amz-Date=1&X-Amz-Signature=s3cr3t\n{url}/gone.jpg?sv=1&sig=s3cr3t\n")
        s = run(None, str(tmp_path / "out"), str(tiny_model_dir), input_list=str(lst), quiet=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (s.total, s.ok, s.failed) == (2, 1, 1)
    assert any("X-Amz-Signature=s3cr3t" in p for p in asked)  # read with it
    got = rows(tmp_path / "out")
    assert set(got) == {f"{url}/a.jpg?X-Amz-Date=1&X-Amz-Signature=<redacted>", f"{url}/gone.jpg?sv=1&sig=<redacted>"}
    assert "cannot read" in got[f"{url}/gone.jpg?sv=1&sig=<redacted>"]["error"]
    for name in ("coverage.csv", "run.json"):
        assert "s3cr3t" not in (tmp_path / "out" / name).read_text()
    assert b"s3cr3t" not in (tmp_path / "out" / "results.parquet").read_bytes()


def test_a_signed_list_url_is_read_by_its_path_and_never_echoed():
    """A signed URL's query neither hides the list's format nor shows up in an error."""
    from batchmask.batch.manifest import list_location_problem

    url = "https://acct.blob.core.windows.net/c/list.txt?sv=2022&sig=SeCrEtSiG"
    assert EntryList(url).format == ".txt" and list_location_problem(url) is None
    with pytest.raises(ListError) as e:
        EntryList("https://acct.blob.core.windows.net/c/list.json?sv=2022&sig=SeCrEtSiG")
    assert "SeCrEtSiG" not in str(e.value) and "unknown list format" in str(e.value)
