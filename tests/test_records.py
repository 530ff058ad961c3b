"""The output's bookkeeping at scale: the compact record index answers as the old done set and
mask names did, and the streaming merge writes what the in-memory merge wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchmask.batch import merge as merge_mod
from batchmask.batch.outputs import (
    COLUMNS,
    COVERAGE,
    UNREADABLE,
    MaskNames,
    csv_to_rows,
    done_set,
    error_row,
    load_records,
    merge_parts,
    ok_row,
    part_name,
    read_records,
    recorded_masks,
    rows_to_csv,
)
from batchmask.batch.records import RecordIndex, image_key, key
from batchmask.batch.storage import StorageSpec
from batchmask.batch.table import RESULTS, build_results, read_results, write_results
from batchmask.batch.tablerow import TABLE_FIELDS


def _out(path: Path):
    st = StorageSpec(str(path)).open()
    st.ensure_root()
    return st


def _ok(rel: str, mask: str, fp: int = 1) -> dict:
    return ok_row(rel, mask, 4, 4, fp, 1, 0.9)


def _fresh(rel: str, mask: str, fp: int = 1) -> dict:
    """A part-file row as a worker writes it, with the table's columns."""
    return _ok(rel, mask, fp) | {"mask_rle": f"rle-{rel}-{fp}", "boxes": f"[[0,0,1,1,0.{fp}]]"}


def _varied(root: Path):
    """An output with every kind of row: masks present and missing, --no-masks rows, error rows
    (and an older version's storage-error row), collisions (a.png and a.jpg), a mask path with a
    folder named *.png, a carriage return, a user column, and an image given twice (last wins)."""
    out = _out(root)
    rows = [
        _ok("a.png", "masks/a.png"), _ok("a.jpg", "masks/a.jpg.png"), _ok("b/c.jpg", "masks/b/c.png"),
        _ok("gone.jpg", "masks/gone.png"), _ok("nomask.jpg", ""), _ok("q.png", "masks/q.png"),
        _ok("q.png/r.jpg", "masks/q.png.d/r.png"), _ok("cam\rera/x.jpg", "masks/cam\rera/x.png"),
        error_row("bad.jpg", "bad.jpg: cannot decode image"),
        error_row("disk.jpg", "cannot write outputs (OSError: [Errno 28] No space left on device)"),
        _ok("dup.jpg", "masks/dup.png"),
    ]
    rows = sorted((r | {"note": f"n-{r['image']}"} for r in rows), key=lambda r: r["image"])
    k = next(i for i, r in enumerate(rows) if r["image"] == "dup.jpg")
    # sorted, as written; dup.jpg twice: its later row (an error) wins
    out.write_bytes(COVERAGE, rows_to_csv([*rows[:k + 1], error_row("dup.jpg", "dup.jpg: later row"), *rows[k + 1:]]))
    for r in rows:
        if r["mask"] and r["image"] != "gone.jpg":
            out.write_bytes(r["mask"], b"")
    out.write_bytes("masks/orphan.png", b"")  # a mask no row names
    return out


LISTED = ["a.gif", "a.jpg", "a.png", "a.tif", "b/c.jpg", "b/c.png", "bad.jpg", "cam\rera/x.jpg", "disk.jpg",
          "dup.jpg", "gone.jpg", "new.jpg", "nomask.jpg", "orphan.jpg", "q.png", "q.png/r.jpg", "q.png/s.png",
          "q.tif", "z/y.jpg"]


@pytest.mark.parametrize("retry_errors", [False, True])
@pytest.mark.parametrize("masks", [True, False])
def test_record_index_answers_as_the_done_set_and_mask_names(tmp_path, retry_errors, masks):
    out = _varied(tmp_path)
    records, _ = load_records(out)
    index = read_records(out, retry_errors, masks)
    want = done_set(out, records, retry_errors, masks)
    assert {k for k in LISTED if k in index} == want
    assert len(index) == len(want)
    assert "a.png" in want and ("gone.jpg" in want) == ("nomask.jpg" in want) == (not masks)
    assert ("bad.jpg" in want) == ("dup.jpg" in want) == (not retry_errors) and "disk.jpg" not in want
    old, new = MaskNames(recorded_masks(records)), MaskNames(index)
    assert [new.assign(k) for k in LISTED] == [old.assign(k) for k in LISTED]
    assert new.assign("a.jpg") == "masks/a.jpg.png"  # kept, not the default


def test_the_runner_skips_what_the_index_says_is_done(tmp_path, tiny_model_dir):
    """An output as the previous version wrote it (coverage.csv and masks, no index of any kind)
    is read as it is: the first run after the upgrade redoes only what the old rule redid."""
    from batchmask.batch.runner import run

    inp, out = tmp_path / "in", tmp_path / "out"
    listed = [k for k in LISTED if k != "q.png"]  # a folder here
    for k in listed:
        p = inp / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    st = _varied(out)
    records = load_records(st)[0]
    before = done_set(st, records)
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert s.skipped == len(before & set(listed)) == 7 and s.total == len(listed)
    rows = {r["image"]: r for r in csv_to_rows((out / COVERAGE).read_bytes(), COVERAGE)}
    assert set(rows) == set(records) | set(listed)
    assert all(rows[k] == records[k] for k in before)  # not redone
    assert rows["a.png"]["note"] == "n-a.png" and rows["a.jpg"]["mask"] == "masks/a.jpg.png"
    assert rows["gone.jpg"]["status"] == "error" and rows["gone.jpg"]["note"] == "n-gone.jpg"  # redone
    again = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert again.ok == 0 and again.failed == 0  # the empty files are error rows now: done


def test_a_hash_ending_in_zero_bytes_is_found(tmp_path):
    """NumPy's fixed-width bytes drop trailing NULs when an element is read: such entries (and
    mask hashes) must still match, whatever their flag byte."""
    names = [f"z{i}.jpg" for i in range(20_000) if image_key(f"z{i}.jpg").endswith(b"\0")][:2]
    masks = [f"masks/m{i}.png" for i in range(5000) if key(f"masks/m{i}.png").endswith(b"\0")][:1]
    assert len(names) == 2 and masks
    out = _out(tmp_path)
    rows = [error_row(names[0], "x"), _ok(names[1], f"masks/{names[1][:-4]}.png"), _ok("m.jpg", masks[0])]
    out.write_bytes(COVERAGE, rows_to_csv(sorted(rows, key=lambda r: r["image"])))
    out.write_bytes(masks[0], b"")
    index = read_records(out)
    assert names[0] in index and names[1] not in index and "m.jpg" in index and "other.jpg" not in index
    assert index.get(names[1]) == f"masks/{names[1][:-4]}.png"  # flags DEFAULT_MASK only: read back
    assert index.reserves(masks[0]) and MaskNames(index).assign("m.png") == "masks/m.png"
    assert read_records(out, retry_errors=True).get(names[0]) is None  # flag byte 0


def test_records_of_a_coverage_csv_out_of_order_and_damaged_are_rebuilt(tmp_path):
    out = _varied(tmp_path)
    data = out.read_bytes(COVERAGE)
    out.write_bytes(COVERAGE, data + OUT_OF_ORDER_THEN_DAMAGED)
    assert len(read_records(out)) == 0
    assert (tmp_path / (COVERAGE + UNREADABLE)).read_bytes().startswith(data)
    assert csv_to_rows((tmp_path / COVERAGE).read_bytes(), COVERAGE) == []


def test_a_coverage_csv_out_of_order_is_sorted_then_read(tmp_path):
    out = _varied(tmp_path)
    records, _ = load_records(out)
    rows = csv_to_rows(out.read_bytes(COVERAGE), COVERAGE)
    out.write_bytes(COVERAGE, rows_to_csv(rows[::-1]))  # reversed: dup.jpg's ok row is now the later one
    records, _ = load_records(out)
    index = read_records(out)
    assert {k for k in LISTED if k in index} == done_set(out, records) and "dup.jpg" in index
    assert load_records(out)[0] == records
    rows = csv_to_rows(out.read_bytes(COVERAGE), COVERAGE)
    assert [r["image"] for r in rows] == sorted(records)  # written sorted


def test_the_index_names_default_masks_as_outputs_does(tmp_path):
    from batchmask.batch.outputs import mask_rel

    out = _out(tmp_path)
    names = ["a/b.c.jpg", "x.JPEG", "q.png/r.tif"]
    out.write_bytes(COVERAGE, rows_to_csv([_ok(n, mask_rel(n)) for n in sorted(names)]))
    index = read_records(out)
    assert [index.get(n) for n in names] == [mask_rel(n) for n in names] and not index._odd


def test_an_empty_or_missing_record_is_empty(tmp_path):
    out = _out(tmp_path)
    assert len(read_records(out)) == 0 and "a.jpg" not in read_records(out)
    out.write_bytes(COVERAGE, b"")
    assert len(RecordIndex.read(out)) == 0


# ----------------------------------------------------------------------------- the merge


def _merge_in_memory(out) -> None:
    """The merge as it was before it streamed: every row in memory (the reference)."""
    records, parts = load_records(out)
    fresh = (k for k, r in records.items() if TABLE_FIELDS[0] in r)
    write_results(out, build_results(records, fresh, read_results(out)))
    out.write_bytes(COVERAGE, rows_to_csv({k: v for k, v in records[k].items() if k not in TABLE_FIELDS}
                                          for k in sorted(records)))
    for p in parts:
        out.delete(p)


def _both(tmp_path: Path, make) -> tuple[Path, Path]:
    """The same output merged by the streaming merge (first) and by the reference (second)."""
    a, b = tmp_path / "stream", tmp_path / "memory"
    make(_out(a))
    shutil.copytree(a, b)
    merge_parts(_out(a))
    _merge_in_memory(_out(b))
    return a, b


def _same(a: Path, b: Path) -> None:
    assert (a / COVERAGE).read_bytes() == (b / COVERAGE).read_bytes()
    assert pq.read_table(a / RESULTS).to_pylist() == pq.read_table(b / RESULTS).to_pylist()
    assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in b.rglob("*"))


def _history(out) -> None:
    """A first merge (with the table), then two runs' part files that replace and add rows."""
    out.write_bytes(part_name("r1", 0), rows_to_csv([_fresh(f"{c}.jpg", f"masks/{c}.png") for c in "fbdca"]))
    merge_parts(out)
    rows = csv_to_rows(out.read_bytes(COVERAGE), COVERAGE)
    out.write_bytes(COVERAGE, rows_to_csv([r | {"note": f"by hand {r['image']}"} for r in rows]))
    out.write_bytes(part_name("r2", 0), rows_to_csv([_fresh("b.jpg", "masks/b.png", 2), _fresh("e.jpg", "masks/e.png"),
                                                    _ok("c.jpg", "masks/c.png", 3),  # an older worker: no table columns
                                                    error_row("cam\rera/x.jpg", "cannot decode")]))
    out.write_bytes(part_name("r3", 0), rows_to_csv([_fresh("b.jpg", "masks/b.png", 4), _fresh("0.jpg", "masks/0.png"),
                                                    _fresh("zz.jpg", "masks/zz.png")]))


@pytest.mark.parametrize("batch", [2, 65_536])
def test_streaming_merge_writes_what_the_in_memory_merge_wrote(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(merge_mod, "BATCH", batch)  # 2: many row groups, previous rows across batches
    a, b = _both(tmp_path, _history)
    _same(a, b)
    got = {r["image"]: r for r in pq.read_table(a / RESULTS).to_pylist()}
    assert got["b.jpg"]["mask_rle"] == "rle-b.jpg-4" and got["b.jpg"]["face_pixels"] == 4
    assert got["a.jpg"]["mask_rle"] == "rle-a.jpg-1" and got["c.jpg"]["mask_rle"] is None
    rows = csv_to_rows((a / COVERAGE).read_bytes(), COVERAGE)
    assert [r["image"] for r in rows] == sorted(r["image"] for r in rows)
    assert {r["image"]: r["note"] for r in rows}["b.jpg"] == "by hand b.jpg"
    assert not list((a / "_parts").iterdir())


def test_a_coverage_csv_sorted_by_hand_otherwise_is_merged_in_memory(tmp_path):
    def make(out):
        _history(out)
        rows = csv_to_rows(out.read_bytes(COVERAGE), COVERAGE)
        out.write_bytes(COVERAGE, rows_to_csv(rows[::-1] + [rows[0] | {"faces": "7"}]))  # reversed, a.jpg twice

    a, b = _both(tmp_path, make)
    _same(a, b)
    assert [r["image"] for r in csv_to_rows((a / COVERAGE).read_bytes(), COVERAGE)][:2] == ["0.jpg", "a.jpg"]


#: Rows out of order, then, after more than a reader's first pieces (64 KiB), bytes that are not UTF-8.
OUT_OF_ORDER_THEN_DAMAGED = (b"a.jpg,,,,,,,,error,x\n" + b"".join(b"pad%06d.jpg,,,,,,,,error,x\n" % i for i in range(5000))
                             + b'"x.jpg\xff,ok\n')


@pytest.mark.parametrize("damage", ["coverage-header", "coverage-body", "coverage-unsorted-body", "results"])
def test_damaged_files_are_kept_beside_as_before(tmp_path, damage):
    def make(out):
        _history(out)
        data = out.read_bytes(COVERAGE)
        if damage == "results":
            out.write_bytes(RESULTS, b"PAR1 not a table")
        elif damage == "coverage-header":
            out.write_bytes(COVERAGE, b"what,is,this\n1,2,3\n")
        elif damage == "coverage-body":
            out.write_bytes(COVERAGE, data + b'"x.jpg\xff,ok\n')
        else:  # out of order first, then (past the first pieces decoded) not UTF-8
            out.write_bytes(COVERAGE, data + OUT_OF_ORDER_THEN_DAMAGED)

    a, b = _both(tmp_path, make)
    _same(a, b)
    kept = COVERAGE + UNREADABLE if damage != "results" else RESULTS + ".unreadable"
    assert (a / kept).read_bytes() == (b / kept).read_bytes()


def test_a_merge_that_stops_part_way_changes_nothing_and_is_redone(tmp_path, monkeypatch):
    out = _out(tmp_path)
    _history(out)
    before = out.read_bytes(COVERAGE)
    real = merge_mod._merged

    def failing(old, fresh):
        for k, item in enumerate(real(old, fresh)):
            if k == 3 and failing.on:
                raise OSError("disk full")
            yield item

    failing.on = True
    monkeypatch.setattr(merge_mod, "_merged", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_parts(out)
    assert out.read_bytes(COVERAGE) == before and len(list((tmp_path / "_parts").iterdir())) == 2
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    failing.on = False
    copy = tmp_path.parent / "copy"
    shutil.copytree(tmp_path, copy)
    merge_parts(out)
    _merge_in_memory(_out(copy))
    _same(tmp_path, copy)


def test_a_streamed_write_to_s3_is_all_or_nothing(s3_server):
    bucket = s3_server.new_bucket("rec")
    out = StorageSpec(f"s3://{bucket}/out", storage_options=s3_server.storage_options).open()
    out.write_bytes(COVERAGE, b"old")
    with pytest.raises(RuntimeError), out.open_write(COVERAGE) as f:
        f.write(b"x" * (out.fs.default_block_size + 1))  # past one block: a multipart upload has begun
        raise RuntimeError("stopped")
    import gc

    gc.collect()  # a file object's __del__ would complete the upload, if it were still open
    assert out.read_bytes(COVERAGE) == b"old"
    assert not out.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")  # aborted, not left
    with out.open_write(COVERAGE) as f:
        f.write(b"new " * 3_000_000)
    assert out.read_bytes(COVERAGE) == b"new " * 3_000_000


def test_an_s3_output_merges_in_pieces(s3_server, monkeypatch):
    monkeypatch.setattr(merge_mod, "BATCH", 2)
    bucket = s3_server.new_bucket("recm")
    out = StorageSpec(f"s3://{bucket}/out", storage_options=s3_server.storage_options).open()
    _history(out)
    merge_parts(out)
    records, parts = load_records(out)
    assert parts == [] and sorted(records) == sorted(["0.jpg", "a.jpg", "b.jpg", "c.jpg", "cam\rera/x.jpg",
                                                      "d.jpg", "e.jpg", "f.jpg", "zz.jpg"])
    assert records["b.jpg"]["face_pixels"] == "4" and records["a.jpg"]["note"] == "by hand a.jpg"
    assert [c for c in COLUMNS] == list(records["a.jpg"])[:len(COLUMNS)]
