"""Where ``--overlays`` writes each image's preview: named after its mask path, so two images that
differ only by extension (``a.jpg``, ``a.png``) never share one, in a run or across runs.

Fast tier: a few solid-colour images of different sizes, run in process with the tiny model at
threshold 0.6, where no pixel is face (tests/test_promises_run.py), so an overlay is its own
image re-encoded: its size and colour say whose it is.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from batchmask.batch.options import RunError
from batchmask.batch.outputs import (
    COVERAGE,
    MaskNames,
    mask_rel,
    ok_row,
    overlay_of,
    read_records,
    rows_to_csv,
)
from batchmask.batch.runner import run
from batchmask.batch.storage import StorageSpec
from batchmask.cli import main
from batchmask.jobs.spec import JobError, parse_job

#: name -> (width, height, RGB): every image its own size and colour
LOOKS = {
    "a.jpg": (20, 10, (0, 200, 0)),
    "a.png": (24, 16, (0, 0, 200)),
    "a.jpeg": (28, 12, (200, 200, 0)),
    "sub/a.JPG": (16, 20, (200, 0, 200)),
    "a.jpg/b.jpg": (12, 18, (0, 200, 200)),  # a folder named like a.png's overlay
}


def paint(root: Path, names: list[str]) -> Path:
    for name in names:
        w, h, rgb = LOOKS[name]
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(p, "PNG" if name.endswith(".png") else "JPEG",
                                                                quality=95)
    return root


def rows(out: Path) -> dict[str, dict]:
    with open(out / "coverage.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def overlays(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in (out / "overlays").rglob("*") if p.is_file()}


def assert_own_overlay(path: Path, name: str) -> None:
    """The overlay at ``path`` is the preview of image ``name``: its size, and its colour (JPEG: near)."""
    w, h, rgb = LOOKS[name]
    with Image.open(path) as ov:
        assert ov.format == "JPEG" and ov.size == (w, h), f"{path} is not {name}'s overlay"
        mean = np.asarray(ov.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
    assert np.abs(mean - rgb).max() < 12, f"{path}: colour {mean}, {name} is {rgb}"


def go(inp: Path, out: Path, model: Path, **kw):
    return run(str(inp), str(out), str(model), threshold=0.6, overlays=True, quiet=True, **kw)


def test_images_that_differ_by_extension_get_an_overlay_each(tmp_path, tiny_model_dir):
    names = [n for n in LOOKS if "/b" not in n]
    inp, out = paint(tmp_path / "in", names), tmp_path / "out"
    s = go(inp, out, tiny_model_dir)
    assert (s.ok, s.failed) == (4, 0)
    by = rows(out)
    masks = {name: by[name]["mask"] for name in names}
    assert len(set(masks.values())) == 4
    assert "masks/a.png" in masks.values() and masks["sub/a.JPG"] == "masks/sub/a.png"  # as before, for the first
    assert overlays(out) == {overlay_of(m) for m in masks.values()}  # one per image, named after its mask
    assert {"overlays/a.jpg", "overlays/sub/a.jpg"} <= overlays(out)
    for name, mask in masks.items():
        assert_own_overlay(out / overlay_of(mask), name)


@pytest.mark.parametrize("first", ["a.jpg", "a.png"])
def test_a_later_image_with_the_same_stem_leaves_the_earlier_overlay_alone(tmp_path, tiny_model_dir, first):
    """Run 1 does one image; run 2 finds the other: each keeps or gets its own overlay."""
    later = "a.png" if first == "a.jpg" else "a.jpg"
    inp, out = paint(tmp_path / "in", [first]), tmp_path / "out"
    go(inp, out, tiny_model_dir)
    assert overlays(out) == {"overlays/a.jpg"}
    before = (out / "overlays/a.jpg").read_bytes()
    paint(inp, [later])
    s = go(inp, out, tiny_model_dir)
    assert (s.ok, s.skipped) == (1, 1)
    by = rows(out)
    assert by[first]["mask"] == "masks/a.png" and by[later]["mask"] == f"masks/{later}.png"
    assert (out / "overlays/a.jpg").read_bytes() == before  # the earlier image's, untouched
    assert overlays(out) == {"overlays/a.jpg", f"overlays/{later}.jpg"}
    assert_own_overlay(out / "overlays/a.jpg", first)
    assert_own_overlay(out / f"overlays/{later}.jpg", later)


@pytest.mark.parametrize("runs", [[["a.jpg/b.jpg", "a.png"]], [["a.png"], ["a.jpg/b.jpg"]], [["a.jpg/b.jpg"], ["a.png"]]])
def test_a_folder_named_like_another_images_overlay_gets_overlays_beside_it(tmp_path, tiny_model_dir, runs):
    """a.png's overlay is the file overlays/a.jpg; a folder a.jpg/ would put b.jpg's in that name
    as a folder (a local output failed every run): whichever comes first, in one run or two, each
    image gets an overlay and both files exist."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for names in runs:
        paint(inp, names)
        s = go(inp, out, tiny_model_dir)
        assert (s.ok, s.failed) == (len(names), 0)
    by = rows(out)
    assert len(overlays(out)) == 2
    for name in ("a.png", "a.jpg/b.jpg"):
        assert_own_overlay(out / overlay_of(by[name]["mask"]), name)
    first = runs[0][0]  # in one run, the first listed
    assert by[first]["mask"] == {"a.png": "masks/a.png", "a.jpg/b.jpg": "masks/a.jpg/b.png"}[first]  # as before


@pytest.mark.parametrize("no_masks", [False, True])
def test_a_list_runs_overlays_follow_its_mask_paths_with_or_without_masks(tmp_path, tiny_model_dir, no_masks):
    """A list run's mask path keeps the entry's extension (masks/relative/imgs/a.jpg.png), so its
    overlays never collided; they are still named after it, and --no-masks (a mask path that
    depends on the key alone) names them the same."""
    paint(tmp_path / "imgs", ["a.jpg", "a.png"])
    lst = tmp_path / "l.txt"
    lst.write_text("imgs/a.jpg\nimgs/a.png\n")
    out = tmp_path / "out"
    s = run(None, str(out), str(tiny_model_dir), input_list=str(lst), threshold=0.6, overlays=True,
            no_masks=no_masks, quiet=True)
    assert s.ok == 2
    assert overlays(out) == {"overlays/relative/imgs/a.jpg.jpg", "overlays/relative/imgs/a.png.jpg"}
    for name in ("a.jpg", "a.png"):
        assert_own_overlay(out / f"overlays/relative/imgs/{name}.jpg", name)
        assert rows(out)[f"imgs/{name}"]["mask"] == ("" if no_masks else f"masks/relative/imgs/{name}.png")


def test_a_folder_run_refuses_no_masks_with_overlays(tmp_path, tiny_model_dir):
    """Without a recorded mask path a later run could give a new a.jpg the overlay name of an
    earlier a.png (docs/design.md): the combination is refused before anything is written."""
    inp, out = paint(tmp_path / "in", ["a.jpg"]), tmp_path / "out"
    with pytest.raises(RunError, match="--no-masks cannot go with --overlays in a folder run"):
        go(inp, out, tiny_model_dir, no_masks=True)
    res = CliRunner().invoke(main, ["run", "-i", str(inp), "-o", str(out), "-m", str(tiny_model_dir),
                                    "--overlays", "--no-masks"])
    assert res.exit_code == 1 and "drop --no-masks" in res.output, res.output
    assert not out.exists()
    with pytest.raises(JobError, match="field 'no_masks' = True: cannot go with --overlays"):
        parse_job({"name": "n", "schedule": "0 2 * * *", "input": "in", "output": "out", "overlays": True,
                   "no_masks": True})


def test_images_of_one_folder_named_like_a_file_share_its_mask_folder(tmp_path):
    """Only a clash moves a folder to <name>.d: images side by side in x.jpg/ or q.png/ stay
    together, given out in one run or recorded by an earlier one (the record index)."""
    order = ["q.png/r.jpg", "q.png/s.jpg", "x.jpg/b.jpg", "x.jpg/c.jpg"]
    names = MaskNames()
    assert [names.assign(r) for r in order] == ["masks/q.png/r.png", "masks/q.png/s.png", "masks/x.jpg/b.png",
                                                "masks/x.jpg/c.png"]
    out = StorageSpec(str(tmp_path / "out")).open()
    out.write_bytes(COVERAGE, rows_to_csv([ok_row(r, mask_rel(r), 1, 1, 0, 0, None) for r in order[::2]]))
    later = MaskNames(read_records(out))
    assert [later.assign(r) for r in order] == ["masks/q.png/r.png", "masks/q.png/s.png", "masks/x.jpg/b.png",
                                                "masks/x.jpg/c.png"]
    assert later.assign("x.png") == "masks/x.png.png" and later.assign("q.png") == "masks/q.png.png"
