"""Everything from encoded image bytes to a mask: one package used by ``predict``, ``evaluate``
and the batch worker alike (``batch/`` keeps only the orchestration).

* :mod:`.model` - model directories (``model.keras`` + ``model.json``): reading, writing, checks;
  :class:`FaceMaskModel` and :func:`load_model`, where the backend is chosen.
* :mod:`.backends` - Keras or ONNX Runtime (CPU, CUDA), sessions, and the cached, hash- and
  parity-checked ONNX export (also importable as ``batchmask.runtime``).
* :mod:`.int8` / :mod:`.quantize` - the int8 ONNX file: using it, and making it.
* :mod:`.pixels` - decode (JPEG draft mode), resize, upsample, mask statistics, PNG encode (also
  importable as ``batchmask.image``).
"""

from __future__ import annotations

from .backends import MODEL_FILE
from .model import (
    FORMAT_VERSION,
    META_FILE,
    FaceMaskModel,
    ModelNotFoundError,
    base_meta,
    default_model_dir,
    load_model,
    precision_of,
    predict,
    read_meta,
    resolve_model_dir,
    save_model,
    write_meta,
)
from .pixels import resize_rgb, upsample_probs

__all__ = [
    "FORMAT_VERSION", "META_FILE", "MODEL_FILE", "FaceMaskModel", "ModelNotFoundError", "base_meta",
    "default_model_dir", "load_model", "precision_of", "predict", "read_meta", "resize_rgb", "resolve_model_dir",
    "save_model", "upsample_probs", "write_meta",
]
