"""The part-file columns that reach ``results.parquet`` only: an image's mask as COCO RLE and its
face regions' boxes, as text (a part file is CSV).

The worker computes them where the mask is (:func:`batchmask.inference.pixels.measure`) and adds
them to the image's row; the merge writes them to the table and leaves them out of ``coverage.csv``.
No pyarrow here: the worker imports this module.
"""

from __future__ import annotations

import json

from ..inference.pixels import Measured

#: COCO RLE counts, and the boxes as JSON ``[[x, y, w, h, score], ...]`` (compact).
TABLE_FIELDS = ("mask_rle", "boxes")


def table_fields(m: Measured) -> dict[str, str]:
    """The :data:`TABLE_FIELDS` of one ``ok`` image's row."""
    boxes = [[x, y, w, h, round(s, 4)] for x, y, w, h, s in m.boxes]
    return {"mask_rle": m.rle(), "boxes": json.dumps(boxes, separators=(",", ":"))}


def parse_boxes(text: str | None) -> list[dict] | None:
    """The part file's ``boxes`` JSON as ``results.parquet``'s structs; None when not recorded."""
    if not text:
        return None
    return [{"x": x, "y": y, "w": w, "h": h, "score": s} for x, y, w, h, s in json.loads(text)]
