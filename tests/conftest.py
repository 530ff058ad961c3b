"""Shared fixtures. Tests run offline: models use random weights (``backbone_weights=None``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# ONNX exports made by tests (run/evaluate default to --runtime auto) never go to ~/.cache.
os.environ.setdefault("BATCHMASK_CACHE_DIR", tempfile.mkdtemp(prefix="batchmask-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
DEMO_WIDER = REPO / "demo" / "wider"
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"


def synthetic_wider(root: Path, events: dict[str, int], split: str = "val") -> Path:
    """A WIDER folder with ``events[name]`` 32x32 images each, one box per image."""
    import numpy as np
    from PIL import Image

    from batchmask.convert import write_wider_annotations

    entries = []
    for event, n in events.items():
        (root / "images" / event).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{event}/{event}_{i}.jpg"
            Image.new("RGB", (32, 32), (i * 7 % 255, 90, 160)).save(root / "images" / name)
            entries.append((name, np.array([[2 + i % 5, 3, 20, 24]], np.float32)))
    write_wider_annotations(entries, root / f"wider_face_{split}_bbx_gt.txt")
    return root


@pytest.fixture(scope="session")
def demo_wider() -> Path:
    """The 10 WIDER FACE images shipped in demo/wider (native WIDER layout)."""
    return DEMO_WIDER


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small untrained model directory (alpha 0.25, 64x64, random weights).

    Its predictions are meaningless but deterministic: enough for I/O, plumbing and
    round-trip tests.
    """
    import keras

    from batchmask.config import ModelConfig
    from batchmask.inference import base_meta, save_model
    from batchmask.model import build_unet

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(alpha=0.25, image_size=64, decoder_filters=(32, 16, 16, 8, 8))
    net = build_unet(cfg, backbone_weights=None)
    out = tmp_path_factory.mktemp("tiny_model")
    meta = base_meta(cfg)
    meta["note"] = "untrained test model"
    save_model(net, out, meta)
    return out
from s3server import s3_server  # noqa: E402,F401  (SeaweedFS fixture, tests/s3server.py)
