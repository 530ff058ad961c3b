"""``batchmask export-coco``: a run's ``results.parquet`` as a COCO instances JSON.

One category (``face``), one image per ``ok`` row with its RLE known, one annotation per face
region counted in ``faces``: the region's own mask as compressed RLE, its ``bbox`` (the row's box)
and ``score`` (the region's mean face probability). pycocotools' ``COCO`` loads it, and CVAT,
FiftyOne and Detectron2 import COCO instances. docs/design.md says why each choice was made.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from ..version import __version__
from .storage import StorageSpec
from .table import RESULTS

log = logging.getLogger(__name__)

CATEGORY = {"id": 1, "name": "face", "supercategory": "face"}


class ExportError(RuntimeError):
    """Nothing to export (no results.parquet)."""


@dataclass
class ExportSummary:
    images: int
    annotations: int
    left_out: int  # ok rows recorded before the table had their RLE (an older version's rows)


def region_annotations(row: dict, image_id: int, first_id: int) -> list[dict]:
    """The annotations of one ``ok`` row: each counted region's mask, found as the connected
    component (8-connectivity, as ``faces`` counts them) whose bounding box is the row's box."""
    from pycocotools import mask as cocomask
    from scipy import ndimage

    h, w = row["height"], row["width"]
    boxes = row["boxes"] or []
    if not boxes:
        return []
    full = cocomask.decode({"size": [h, w], "counts": row["mask_rle"]})
    labels, _ = ndimage.label(full, structure=np.ones((3, 3), bool))
    by_box: dict[tuple[int, int, int, int], list[int]] = {}
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        sy, sx = sl
        by_box.setdefault((sx.start, sy.start, sx.stop - sx.start, sy.stop - sy.start), []).append(lab)
    out = []
    for k, b in enumerate(boxes):
        key = (b["x"], b["y"], b["w"], b["h"])
        labs = by_box.get(key)
        if not labs:  # cannot happen for a table written by batchmask: the mask and boxes come from one pass
            raise ExportError(f"{row['image']}: no face region has the box {list(key)}")
        # two regions with one bounding box (interleaved shapes): the larger is the counted one
        lab = max(labs, key=lambda n: int(np.count_nonzero(labels[labels_slice(key)] == n)))
        rle = cocomask.encode(np.asfortranarray(labels == lab, dtype=np.uint8))
        out.append({
            "id": first_id + k,
            "image_id": image_id,
            "category_id": CATEGORY["id"],
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "area": int(cocomask.area(rle)),
            "bbox": [b["x"], b["y"], b["w"], b["h"]],
            "score": round(float(b["score"]), 4),
            "iscrowd": 0,
        })
    return out


def labels_slice(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    x, y, w, h = box
    return slice(y, y + h), slice(x, x + w)


def coco_dict(rows: list[dict]) -> tuple[dict, ExportSummary]:
    """The COCO instances document of ``results.parquet`` rows."""
    images, annotations, left_out = [], [], 0
    for row in rows:
        if row["status"] != "ok":
            continue
        if row["mask_rle"] is None or row["boxes"] is None:
            left_out += 1
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": row["image"], "width": row["width"], "height": row["height"]})
        annotations += region_annotations(row, image_id, len(annotations) + 1)
    doc = {
        "info": {"description": "batchmask face masks", "version": __version__,
                 "date_created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [CATEGORY],
    }
    return doc, ExportSummary(len(images), len(annotations), left_out)


def export_coco(output: str, dest: str | None = None, endpoint_url: str | None = None,
                storage_options: dict | None = None) -> tuple[str, ExportSummary]:
    """Write the COCO JSON of the run output ``output`` (a folder or ``s3://`` prefix) to ``dest``
    (a local path; default ``coco.json`` in ``output``). Returns where it went and the counts."""
    out = StorageSpec(output, endpoint_url, dict(storage_options or {})).resolved().open()
    if not out.exists(RESULTS):
        raise ExportError(f"{output}: no {RESULTS} (not a batchmask run output, or written by a version "
                          f"without it: run `batchmask run` on it once)")
    rows = pq.read_table(io.BytesIO(out.read_bytes(RESULTS))).to_pylist()
    doc, summary = coco_dict(rows)
    if summary.left_out:
        log.warning("%d ok images have no mask_rle/boxes (recorded before results.parquet existed) and are left "
                    "out; `batchmask run --overwrite` recomputes them", summary.left_out)
    data = json.dumps(doc, separators=(",", ":")).encode()
    if dest is None:
        out.write_bytes("coco.json", data)
        return output.rstrip("/") + "/coco.json", summary
    with open(dest, "wb") as f:
        f.write(data)
    return dest, summary
