"""`batchmask evaluate` on the command line, the HTML report and the Haar baseline."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, need, report_browser
from PIL import Image

from batchmask.cli import main


def test_cli_help():
    res = CliRunner().invoke(main, ["evaluate", "--help"])
    assert res.exit_code == 0
    for opt in ("--model", "--data", "--out", "--subset", "--tune-threshold", "--report", "--baseline", "--limit"):
        assert opt in res.output


@pytest.mark.parametrize("case", ["missing_data", "bad_model"])
def test_cli_errors(case, tiny_model_dir, demo_wider, tmp_path):
    args = {
        "missing_data": ["--model", str(tiny_model_dir), "--data", str(tmp_path / "nope")],
        "bad_model": ["--model", str(tmp_path), "--data", str(demo_wider)],
    }[case]
    res = CliRunner().invoke(main, ["evaluate", *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    err = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(err) == 1 and str(tmp_path) in err[0]
    assert "Traceback" not in res.output


def test_cli_report_with_haar_baseline(tiny_model_dir, demo_wider, tmp_path):
    out, rep = tmp_path / "out", tmp_path / "report"
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dir), "--data", str(demo_wider),
                                    "--out", str(out), "--report", str(rep), "--baseline", "haar"])
    assert res.exit_code == 0, res.output
    assert "haar baseline" in res.output and "mean Dice (per image)" in res.output
    page = (rep / "index.html").read_text()
    assert not re.search(r"https?:", page), "the report must not reference network assets"
    srcs = re.findall(r'src="([^"]+)"', page)
    # three plots, then 5 best and 5 worst: with 10 images the two lists cannot both have 6 without
    # overlapping (6 + 6 from 12 images on: test_promises_report.py)
    assert len(srcs) == 3 + 2 * 5
    assert all((rep / s).is_file() and (rep / s).stat().st_size > 1000 for s in srcs)
    assert "Haar baseline" in page and "By face size" in page and "By event" in page
    doc = json.loads((out / "metrics.json").read_text())
    # Per event: the mean of that event's per-image Dice in per_image.csv (2 demo images per event).
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [g["images"] for g in doc["by_group"]] == [2] * 5
    for g in doc["by_group"]:
        mine = [float(r["dice"]) for r in rows if r["group"] == g["group"]]
        assert g["dice"] == pytest.approx(sum(mine) / len(mine), abs=1e-5)
        assert f"<td>{g['group']}</td>" in page
    haar = doc["baseline"]
    assert haar["info"]["settings"]["cascade"] == "haarcascade_frontalface_default.xml"
    # the detector finds faces in these photos: its Dice is clearly above zero
    assert haar["metrics"]["images"] == 10 and haar["metrics"]["dice"] > 0.2
    assert (out / "per_image_haar.csv").is_file()

    # render it like a user's browser would: the browser render_report.sh finds (its --which);
    # skipped without one, a failure under BATCHMASK_REQUIRE_ALL=1 (CI installs Debian's chromium)
    need(report_browser(), "no browser for scripts/render_report.sh (apt-get install -y chromium, or set "
                           "CHROMIUM=): report not rendered")
    shot = tmp_path / "shot.png"
    subprocess.run([str(REPO / "scripts" / "render_report.sh"), str(rep), str(shot)], check=True, timeout=120)
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert np.asarray(im.convert("L")).std() > 10  # not a blank page


def test_haar_detects_and_paints_boxes(demo_wider):
    from batchmask.baseline import HaarBaseline
    from batchmask.data import read_image

    im = read_image(demo_wider / "images/13--Interview/13_Interview_Interview_Sequences_13_746.jpg")
    haar = HaarBaseline()
    boxes = haar.detect(im)
    assert boxes.shape[1] == 4 and len(boxes) >= 1
    (mask,) = haar.predict_proba([im])
    assert mask.shape == im.shape[:2] and set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0


def test_haar_without_opencv_names_the_extra(monkeypatch):
    from batchmask.baseline import BaselineUnavailableError, HaarBaseline

    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
    with pytest.raises(BaselineUnavailableError, match=r"batchmask\[baseline\]"):
        HaarBaseline()
