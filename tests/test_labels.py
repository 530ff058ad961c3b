"""COCO and YOLO face labels (fast tier): boxes in pixels, the category/class picked, errors naming
file and line or entry, several formats in one training's data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchmask.config import LabelOptions
from batchmask.data import DataError, data_format, load_datasets
from batchmask.labels import load_coco, load_yolo


def _image(path: Path, w: int, h: int, exif_rotate: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (w, h), (120, 90, 60))
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: the loaders see an h x w image
        im.save(path, exif=exif)
    else:
        im.save(path)
    return path


def _coco(tmp_path: Path, annotations: list, categories=None, images=None) -> Path:
    root = tmp_path / "coco"
    _image(root / "images" / "a" / "one.jpg", 200, 100)
    _image(root / "images" / "b" / "two.jpg", 80, 60)
    doc = {
        "images": images if images is not None else [{"id": 1, "file_name": "a/one.jpg", "width": 200, "height": 100},
                                                     {"id": 7, "file_name": "b/two.jpg", "width": 80, "height": 60}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "person"}, {"id": 3, "name": "Face"}],
    }
    path = root / "annotations" / "instances_default.json"  # CVAT's export layout
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def test_coco_reads_the_face_category_in_pixels_and_keeps_negatives(tmp_path):
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 100]},  # a person, not a face
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [190, 90, 20, 20]},  # clipped to the image
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 8]},  # no area: skipped
    ])
    samples = load_coco(path)
    assert [s.name for s in samples] == ["a/one.jpg", "b/two.jpg"]
    np.testing.assert_array_equal(samples[0].boxes, [[10, 20, 40, 60], [190, 90, 200, 100]])
    assert samples[1].boxes.shape == (0, 4)  # listed, no face: a negative
    assert samples[0].group == "a" and Path(samples[0].path).is_file()
    assert samples[0].load_image().shape == (100, 200, 3)
    # another category by name; an explicit images folder
    people = load_coco(path, LabelOptions(category="PERSON", images=str(path.parent.parent / "images")))
    np.testing.assert_array_equal(people[0].boxes, [[0, 0, 200, 100]])


@pytest.mark.parametrize(("change", "message"), [
    ({"annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}]},
     r"instances_default.json: annotations\[0\] \(id 9\): bbox must be 4 numbers"),
    ({"categories": [{"id": 1, "name": "person"}]}, r"no category named 'face' \(categories: person\)"),
    ({"annotations": [{"id": 9, "image_id": 42, "category_id": 3, "bbox": [1, 2, 3, 4]}]},
     r"image ids not in 'images': \[42\]"),
    ({"images": [{"id": 1, "file_name": "a/missing.jpg"}]}, r"'a/missing.jpg' is neither beside the JSON"),
    ({"annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [500, 500, 3, 4]}]},
     r"images\[0\] \(a/one.jpg\): box 0 .* lies outside the 200x100 image"),
])
def test_coco_errors_name_the_file_and_entry(tmp_path, change, message):
    path = _coco(tmp_path, change.get("annotations", []), change.get("categories"), change.get("images"))
    with pytest.raises(DataError, match=message):
        load_coco(path)


def test_coco_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"bad.json:2: not valid JSON"):
        load_coco(path)


def _yolo(tmp_path: Path, labels: dict[str, str]) -> Path:
    root = tmp_path / "yolo"
    _image(root / "images" / "train" / "x.jpg", 200, 100)
    _image(root / "images" / "train" / "y.png", 50, 50)
    _image(root / "images" / "val" / "z.jpg", 40, 80, exif_rotate=True)  # seen as 80 x 40
    for rel, text in labels.items():
        p = root / "labels" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_yolo_reads_the_face_class_in_pixels(tmp_path):
    root = _yolo(tmp_path, {"train/x.txt": "0 0.5 0.5 0.2 0.4\n1 0.5 0.5 1 1\n\n", "val/z.txt": "0 0.25 0.5 0.5 1\n"})
    samples = load_yolo(root)
    by_name = {s.name: s for s in samples}
    assert sorted(by_name) == ["train/x.jpg", "train/y.png", "val/z.jpg"]
    np.testing.assert_allclose(by_name["train/x.jpg"].boxes, [[80, 30, 120, 70]])
    assert by_name["train/y.png"].boxes.shape == (0, 4)  # no label file: no faces, as in YOLO
    np.testing.assert_allclose(by_name["val/z.jpg"].boxes, [[0, 0, 40, 40]])  # after EXIF rotation: 80 x 40
    assert by_name["train/x.jpg"].group == "train"
    other = {s.name: s for s in load_yolo(root, LabelOptions(class_id=1))}
    np.testing.assert_allclose(other["train/x.jpg"].boxes, [[0, 0, 200, 100]])


@pytest.mark.parametrize(("text", "message"), [
    ("0 0.5 0.5 0.2 0.4\n0 0.5 oops 0.2 0.4\n", r"labels/train/x.txt:2: expected 'class cx cy w h' numbers"),
    ("0 0.1 0.1 0.2 0.1 0.3 0.3\n", r"x.txt:1: expected 'class cx cy w h' \(5 values\), found 7"),
    ("0 50 40 20 10\n", r"x.txt:1: coordinates must be normalised to 0..1"),
])
def test_yolo_errors_name_the_file_and_line(tmp_path, text, message):
    root = _yolo(tmp_path, {"train/x.txt": text})
    with pytest.raises(DataError, match=message):
        load_yolo(root)


def test_several_formats_in_one_training_data(tmp_path, demo_wider):
    coco = _coco(tmp_path, [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]}])
    yolo = _yolo(tmp_path, {"train/x.txt": "0 0.5 0.5 0.2 0.4\n"})
    assert [data_format(p) for p in (coco, yolo, demo_wider)] == ["coco", "yolo", "wider"]
    samples, sources = load_datasets([coco, yolo, demo_wider])
    assert [s["format"] for s in sources] == ["coco", "yolo", "wider"]
    assert [s["images"] for s in sources] == [2, 3, 10] and len(samples) == 15
    assert all(len(s["fingerprint"]) == 64 for s in sources)
    assert len({s["fingerprint"] for s in sources}) == 3
    # The same names from two sources are refused (validation splits are recorded by name).
    with pytest.raises(DataError, match="sources must not overlap"):
        load_datasets([yolo, yolo])
