"""``results.parquet``: the same images as coverage.csv, typed, with each mask as COCO RLE and its
face regions as boxes; checked against pycocotools' decoder and the PNG masks of real runs.

Runs are in process (a handful of small images) with the tiny untrained model, whose probabilities
all lie within 1e-4 of 0.5: threshold 0.5 gives irregular masks with several regions, 0.4 all face.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as cocomask
from test_promises_run import images as random_images

from batchmask.batch.runner import run
from batchmask.batch.table import SCHEMA
from batchmask.batch.tablerow import table_fields
from batchmask.inference.pixels import measure, rle_counts

DEMO = Path(__file__).resolve().parents[1] / "demo" / "wider" / "images"


def images(root: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> Path:
    return random_images(root, names, size)


def coverage(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def table(out: Path) -> dict[str, dict]:
    t = pq.read_table(out / "results.parquet")
    assert t.schema.equals(SCHEMA), t.schema
    got = t.to_pylist()
    assert [r["image"] for r in got] == sorted({r["image"] for r in got}), "sorted, one row per image"
    return {r["image"]: r for r in got}


def decode(row: dict) -> np.ndarray:
    return cocomask.decode({"size": [row["height"], row["width"]], "counts": row["mask_rle"]})


def test_measure_gives_one_box_per_counted_region_and_an_rle_pycocotools_decodes():
    prob = np.zeros((64, 64), np.float32)
    prob[10:20, 10:20] = 0.9  # a face
    prob[40:50, 30:45] = 0.7  # another
    prob[60, 60] = 0.8  # one network pixel: below the minimum area, not counted, still in the mask
    r = measure(prob, 64, 64, 0.5, 64)  # same size: no resampling, exact boxes
    assert r.faces == 2 and len(r.boxes) == 2
    assert [b[:4] for b in r.boxes] == [(10, 10, 10, 10), (30, 40, 15, 10)]
    assert [b[4] for b in r.boxes] == pytest.approx([0.9, 0.7])
    back = cocomask.decode({"size": [64, 64], "counts": r.rle()})
    assert np.array_equal(back, r.mask > 0) and back[60, 60] == 1
    # column-major as COCO, on a non-square mask whose transpose would differ
    m = np.zeros((3, 5), np.uint8)
    m[0, 1:4] = 1
    m[2, 4] = 1
    assert np.array_equal(cocomask.decode({"size": [3, 5], "counts": rle_counts(m)}), m)
    assert cocomask.area({"size": [3, 5], "counts": rle_counts(m).encode()}) == 4
    empty = measure(np.zeros((64, 64), np.float32), 30, 20, 0.5, 64)
    assert (empty.faces, empty.boxes, table_fields(empty)["boxes"]) == (0, [], "[]")
    assert not cocomask.decode({"size": [20, 30], "counts": empty.rle()}).any()


def test_results_parquet_matches_coverage_csv_and_the_png_masks(tmp_path, tiny_model_dir):
    inp = images(tmp_path / "in", ["a.png", "sub/b.jpg"])
    shutil.copy(next(iter(sorted(DEMO.glob("*/*.jpg")))), inp / "wider.jpg")
    (inp / "bad.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    assert (s.ok, s.failed) == (3, 1)
    csv_rows, rows = coverage(out), table(out)
    assert sorted(rows) == sorted(csv_rows) == ["a.png", "bad.jpg", "sub/b.jpg", "wider.jpg"]
    assert "mask_rle" not in next(iter(csv_rows.values())), "coverage.csv keeps its columns"
    assert sum(rows[k]["faces"] for k in rows if rows[k]["status"] == "ok") >= 3, "threshold 0.5 gives regions"
    for k, r in rows.items():
        c = csv_rows[k]
        assert (r["mask"], r["status"], r["error"]) == (c["mask"], c["status"], c["error"])
        if r["status"] == "error":
            assert r["mask_rle"] is None and r["boxes"] is None and r["faces"] is None
            continue
        assert (str(r["width"]), str(r["height"]), str(r["face_pixels"]), str(r["faces"])) == (
            c["width"], c["height"], c["face_pixels"], c["faces"])
        assert f"{r['coverage']:.6f}" == c["coverage"]
        png = np.asarray(Image.open(out / r["mask"])) > 0
        assert np.array_equal(decode(r), png), k
        assert len(r["boxes"]) == r["faces"]
        for b in r["boxes"]:  # a box encloses face pixels only from inside the image, touching all four sides
            assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= r["width"] and b["y"] + b["h"] <= r["height"]
            box = png[b["y"] : b["y"] + b["h"], b["x"] : b["x"] + b["w"]]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            assert 0.5 <= b["score"] <= 1.0


def test_rerun_keeps_earlier_rows_rle_and_an_old_output_gains_the_table_without_redoing(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    first = table(out)
    images(inp, ["c.png"], size=(20, 10))
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    assert (s.ok, s.skipped) == (1, 2)
    second = table(out)
    assert sorted(second) == ["a.png", "b.png", "c.png"]
    assert {k: second[k] for k in first} == first, "rows not redone keep their RLE and boxes"
    assert np.array_equal(decode(second["c.png"]), np.asarray(Image.open(out / "masks/c.png")) > 0)
    # An output of a version without the table: the next run writes it and redoes nothing; RLE and
    # boxes of rows recorded before are unknown (null), their CSV columns are there.
    (out / "results.parquet").unlink()
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    assert (s.ok, s.skipped) == (0, 3)
    third = table(out)
    assert sorted(third) == ["a.png", "b.png", "c.png"]
    assert all(r["mask_rle"] is None and r["boxes"] is None for r in third.values())
    assert [third[k]["face_pixels"] for k in third] == [second[k]["face_pixels"] for k in second]


def test_damaged_results_parquet_is_kept_aside_and_rebuilt(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["a.png"]), tmp_path / "out"
    run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    (out / "results.parquet").write_bytes(b"PAR1 not really")
    images(inp, ["b.png", "a.png"])  # one new image: the merge rewrites the table
    s = run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    assert (s.ok, s.skipped) == (1, 1)
    assert (out / "results.parquet.unreadable").read_bytes() == b"PAR1 not really"
    rows = table(out)
    assert sorted(rows) == ["a.png", "b.png"] and rows["a.png"]["mask_rle"] is None
    assert rows["b.png"]["mask_rle"] is not None


def test_a_users_column_in_coverage_csv_survives_and_stays_out_of_the_table(tmp_path, tiny_model_dir):
    inp, out = images(tmp_path / "in", ["a.png"]), tmp_path / "out"
    run(str(inp), str(out), str(tiny_model_dir), quiet=True)
    text = (out / "coverage.csv").read_text().splitlines()
    (out / "coverage.csv").write_text("\n".join([text[0] + ",note", text[1] + ",checked"]) + "\n")
    s = run(str(inp), str(out), str(tiny_model_dir), overwrite=True, quiet=True)
    assert s.ok == 1
    assert coverage(out)["a.png"]["note"] == "checked"
    assert list(coverage(out)["a.png"])[-1] == "note"
    assert pa.parquet.read_schema(out / "results.parquet").names == SCHEMA.names


def test_the_readme_snippet_reads_results_parquet_and_decodes_a_mask(tmp_path, tiny_model_dir, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index('df = pd.read_parquet("out/results.parquet")')
    code = readme[readme.rindex("```python", 0, start) + len("```python"): readme.index("```", start)]
    run(str(images(tmp_path / "in", ["a.png", "b.png"])), str(tmp_path / "out"), str(tiny_model_dir),
        threshold=0.5, quiet=True)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # its own assert checks the decoded mask
    assert scope["m"].shape == (30, 40) and len(scope["row"].boxes) == scope["row"].faces


def test_no_masks_writes_the_table_and_csv_without_pngs_and_resumes(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from batchmask.cli import main

    inp, out = images(tmp_path / "in", ["a.png", "sub/b.png"]), tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir), "-q",
                                    "--threshold", "0.5", "--no-masks"])
    assert res.exit_code == 0, res.output
    assert not (out / "masks").exists()
    rows = table(out)
    assert [(r["mask"], r["status"]) for r in rows.values()] == [("", "ok")] * 2
    assert all(c["mask"] == "" for c in coverage(out).values())
    for r in rows.values():
        assert decode(r).sum() == r["face_pixels"] and len(r["boxes"]) == r["faces"]
    # done = a row: nothing is redone, a new image is the only work
    images(inp, ["c.png"], size=(20, 10))
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, no_masks=True, quiet=True)
    assert (s.ok, s.skipped) == (1, 2) and not (out / "masks").exists()
    assert {k: r for k, r in table(out).items() if k != "c.png"} == rows
    # asking for masks later: the rows without one are done again, with their masks
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    assert (s.ok, s.skipped) == (3, 0)
    for r in table(out).values():
        assert np.array_equal(decode(r), np.asarray(Image.open(out / r["mask"])) > 0)
    # and a --no-masks run over an output with masks has nothing to do
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, no_masks=True, quiet=True)
    assert (s.ok, s.skipped) == (0, 3)


def test_no_masks_in_a_job_file_reaches_the_run():
    from batchmask.jobs.spec import parse_job

    job = parse_job({"name": "n", "schedule": "0 2 * * *", "input": "in", "output": "out", "no_masks": True})
    assert job.run.no_masks is True and job.run.recorded()["no_masks"] is True


@pytest.mark.slow
def test_ray_workers_write_the_table_from_their_part_files(tmp_path, tiny_model_dir):
    """The actors' part files (not the in-process path) carry mask_rle and boxes to the table."""
    inp = images(tmp_path / "in", [f"d{k}/i{j}.png" for k in range(2) for j in range(3)])
    out = tmp_path / "out"
    s = run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, workers=2, shard_size=2, in_process_max=0,
            no_masks=True, quiet=True)
    assert (s.ok, s.run_json["plan"]["mode"]) == (6, "ray")
    rows = table(out)
    assert len(rows) == 6 and not (out / "masks").exists()
    assert all(decode(r).sum() == r["face_pixels"] and len(r["boxes"]) == r["faces"] for r in rows.values())


def counted_regions(png: np.ndarray, image_size: int = 64) -> list[np.ndarray]:
    """The face regions of a PNG mask that ``faces`` counts, found here independently of batchmask."""
    from scipy import ndimage

    h, w = png.shape
    labels, n = ndimage.label(png, structure=np.ones((3, 3), bool))
    min_area = max(16, 4 * w * h / image_size**2)
    return [labels == k for k in range(1, n + 1) if np.count_nonzero(labels == k) >= min_area]


def test_export_coco_loads_in_pycocotools_and_its_masks_are_the_png_masks(tmp_path, tiny_model_dir):
    import json

    from click.testing import CliRunner
    from pycocotools.coco import COCO

    from batchmask.cli import main

    inp = images(tmp_path / "in", ["a.png", "sub/b.jpg"], size=(80, 60))
    shutil.copy(next(iter(sorted(DEMO.glob("*/*.jpg")))), inp / "wider.jpg")
    (inp / "bad.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    run(str(inp), str(out), str(tiny_model_dir), threshold=0.5, quiet=True)
    rows = table(out)
    res = CliRunner().invoke(main, ["export-coco", str(out), "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    coco = COCO(str(tmp_path / "c.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["face"]
    imgs = {i["file_name"]: i for i in coco.loadImgs(coco.getImgIds())}
    assert sorted(imgs) == ["a.png", "sub/b.jpg", "wider.jpg"]  # ok rows only
    n_ann = 0
    for name, im in imgs.items():
        r = rows[name]
        assert (im["width"], im["height"]) == (r["width"], r["height"])
        png = np.asarray(Image.open(out / r["mask"])) > 0
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        assert len(anns) == r["faces"]
        want = counted_regions(png)
        got = [coco.annToMask(a).astype(bool) for a in anns]
        # each annotation is one counted region of the PNG (regions under the minimum area have none)
        assert sorted(m.tobytes() for m in got) == sorted(m.tobytes() for m in want), name
        for a, m in zip(anns, got, strict=True):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == m.sum() and 0.5 <= a["score"] <= 1 and a["category_id"] == 1
        n_ann += len(anns)
    assert n_ann >= 3
    assert f"3 images, {n_ann} face annotations" in res.output
    # all face (threshold 0.4): one region per image, its annotation is exactly the PNG mask
    out2 = tmp_path / "out2"
    run(str(inp), str(out2), str(tiny_model_dir), threshold=0.4, quiet=True)
    assert CliRunner().invoke(main, ["export-coco", str(out2)]).exit_code == 0  # default: OUT_DIR/coco.json
    coco = COCO(str(out2 / "coco.json"))
    for im in coco.loadImgs(coco.getImgIds()):
        (a,) = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        png = np.asarray(Image.open(out2 / table(out2)[im["file_name"]]["mask"])) > 0
        assert png.all() and np.array_equal(coco.annToMask(a).astype(bool), png)
        assert a["bbox"] == [0, 0, im["width"], im["height"]]
    assert json.loads((out2 / "coco.json").read_text())["info"]["description"] == "batchmask face masks"


def test_export_coco_leaves_out_rows_without_rle_and_refuses_a_folder_without_a_table(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from batchmask.cli import main

    inp, out = images(tmp_path / "in", ["a.png", "b.png"]), tmp_path / "out"
    run(str(inp), str(out), str(tiny_model_dir), threshold=0.4, quiet=True)
    (out / "results.parquet").unlink()  # as an older version left it
    run(str(inp), str(out), str(tiny_model_dir), threshold=0.4, quiet=True)  # table rebuilt, RLE unknown
    images(inp, ["c.png"])
    run(str(inp), str(out), str(tiny_model_dir), threshold=0.4, quiet=True)
    res = CliRunner().invoke(main, ["export-coco", str(out), "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "1 images, 1 face annotations, 2 left out" in res.output
    res = CliRunner().invoke(main, ["export-coco", str(inp)])
    assert res.exit_code == 1 and "no results.parquet" in res.output and not (inp / "coco.json").exists()


def test_the_readme_coco_snippet_reads_an_export(tmp_path, tiny_model_dir, monkeypatch):
    from batchmask.batch.coco import export_coco

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index('coco = COCO("out/coco.json")')
    code = readme[readme.rindex("```python", 0, start) + len("```python"): readme.index("```", start)]
    run(str(images(tmp_path / "in", ["a.png"])), str(tmp_path / "out"), str(tiny_model_dir), threshold=0.4,
        quiet=True)
    assert export_coco(str(tmp_path / "out"))[1].annotations == 1
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["region"].shape == (30, 40) and scope["region"].all()


@pytest.mark.slow
def test_table_and_coco_export_on_s3(s3_server, tiny_model_dir, tmp_path):
    """results.parquet and coco.json are written through the same storage layer on S3 (SeaweedFS)."""
    import json

    from pycocotools.coco import COCO

    from batchmask.batch.coco import export_coco

    bucket = s3_server.new_bucket("table")
    fs = s3_server.fs()
    local = images(tmp_path / "in", ["a.png", "sub/b.png"])
    for p in sorted(local.rglob("*.png")):
        fs.pipe_file(f"{bucket}/in/{p.relative_to(local).as_posix()}", p.read_bytes())
    creds = {"key": s3_server.key, "secret": s3_server.secret}
    out = f"s3://{bucket}/out/"
    s = run(f"s3://{bucket}/in/", out, str(tiny_model_dir), threshold=0.4, no_masks=True, quiet=True,
            endpoint_url=s3_server.endpoint_url, storage_options=creds)
    assert (s.ok, s.failed) == (2, 0)
    assert not fs.find(f"{bucket}/out/masks/")
    (tmp_path / "r.parquet").write_bytes(fs.cat_file(f"{bucket}/out/results.parquet"))
    rows = {r["image"]: r for r in pq.read_table(tmp_path / "r.parquet").to_pylist()}
    assert sorted(rows) == ["a.png", "sub/b.png"] and all(decode(r).all() for r in rows.values())
    where, summary = export_coco(out, endpoint_url=s3_server.endpoint_url, storage_options=creds)
    assert where == f"s3://{bucket}/out/coco.json" and (summary.images, summary.annotations) == (2, 2)
    (tmp_path / "c.json").write_bytes(fs.cat_file(f"{bucket}/out/coco.json"))
    coco = COCO(str(tmp_path / "c.json"))
    assert all(coco.annToMask(a).all() for a in coco.loadAnns(coco.getAnnIds()))
    assert s3_server.secret not in json.dumps(json.loads((tmp_path / "c.json").read_text()))


def test_a_row_replaced_by_a_part_file_never_keeps_the_old_rle(tmp_path):
    """A part file without the table columns (written by an older worker) replaces the image's row:
    its mask_rle/boxes become unknown (null), never the previous row's, which belong to another mask."""
    from batchmask.batch.outputs import merge_parts, ok_row, part_name, rows_to_csv
    from batchmask.batch.storage import StorageSpec

    out = StorageSpec(str(tmp_path)).resolved().open()
    r = measure(np.full((8, 8), 0.9, np.float32), 4, 4, 0.5, 8)
    rows = [{**ok_row(n, f"masks/{n}.png", 4, 4, 16, 1, 0.9), **table_fields(r)} for n in ("a.jpg", "b.jpg")]
    out.write_bytes(part_name("r1", 0), rows_to_csv(rows))
    merge_parts(out)
    assert [t["mask_rle"] for t in table(tmp_path).values()] == [r.rle()] * 2
    out.write_bytes(part_name("r2", 0), rows_to_csv([ok_row("a.jpg", "masks/a.jpg.png", 4, 4, 0, 0, None)]))
    merge_parts(out)
    got = table(tmp_path)
    assert (got["a.jpg"]["mask_rle"], got["a.jpg"]["boxes"], got["a.jpg"]["face_pixels"]) == (None, None, 0)
    assert got["b.jpg"]["mask_rle"] == r.rle() and got["b.jpg"]["boxes"][0]["w"] == 4
    assert not list((tmp_path / "_parts").iterdir())
