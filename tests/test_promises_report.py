"""README: the evaluation report shows "the 6 best and 6 worst images" (issue 14)."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil

import numpy as np
from PIL import Image

from batchmask.convert import write_wider_annotations
from batchmask.evaluation import evaluate


def test_report_shows_the_6_best_and_the_6_worst_images(tmp_path, tiny_model_dir):
    # 14 images whose Dice all differ: the model (threshold 0.4; its probabilities are all
    # within 1e-4 of 0.5) calls every pixel a face, so an image's Dice grows with its box.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    meta = json.loads((model / "model.json").read_text())
    meta["model"]["threshold"] = 0.4
    (model / "model.json").write_text(json.dumps(meta))
    data = tmp_path / "wider"
    entries = []
    for i in range(14):
        name = f"{i % 2}--Ev/img_{(i * 5) % 14:02d}.jpg"  # names do not follow the Dice order
        (data / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (90, 90 + i, 160)).save(data / "images" / name)
        entries.append((name, np.array([[1, 1, 5 + 2 * i, 5 + 2 * i]], np.float32)))
    write_wider_annotations(entries, data / "wider_face_val_bbx_gt.txt")
    rep, out = tmp_path / "report", tmp_path / "out"
    evaluate(str(model), str(data), out_dir=str(out), report_dir=str(rep), runtime="onnx")
    page = (rep / "index.html").read_text()
    best_html = page.split("<h2>Best images</h2>", 1)[1].split("<h2>Worst images</h2>", 1)[0]
    worst_html = page.split("<h2>Worst images</h2>", 1)[1].split("<h2>", 1)[0]

    def shown(part):
        names = [html.unescape(n) for n in re.findall(r'<img src="images/[^"]+" alt="([^"]+)"', part)]
        for src in re.findall(r'<img src="([^"]+)"', part):
            assert (rep / src).is_file() and (rep / src).stat().st_size > 300
        return names

    best, worst = shown(best_html), shown(worst_html)
    with open(out / "per_image.csv", newline="") as f:
        dice = {r["name"]: float(r["dice"]) for r in csv.DictReader(f)}
    assert len(dice) == 14 and len(set(dice.values())) == 14
    assert len(best) == 6 and len(worst) == 6  # 14 images: no overlap
    ranked = sorted(dice, key=lambda n: -dice[n])
    assert best == ranked[:6] and worst == ranked[::-1][:6]
