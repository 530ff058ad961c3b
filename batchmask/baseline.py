"""A face-detector baseline: OpenCV's Haar frontal-face cascade, boxes painted as masks.

The cascade XML ships inside ``opencv-python-headless`` 4.x wheels (``cv2.data.haarcascades``;
5.x wheels lack it), installed with ``pip install 'batchmask[baseline]'``. OpenCV is
imported only when a baseline is asked for.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import boxes_to_mask

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'batchmask[baseline]'"


class BaselineUnavailableError(RuntimeError):
    """OpenCV (or its cascade file) is missing."""


@dataclass(frozen=True)
class HaarSettings:
    """``detectMultiScale`` parameters (OpenCV's usual values; not tuned on any data)."""

    cascade: str = "haarcascade_frontalface_default.xml"
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 16
    #: Equalise the grayscale histogram first (common practice; helps dark images).
    equalize: bool = True


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise BaselineUnavailableError(
            f"the Haar baseline needs OpenCV, which is not installed: {INSTALL_HINT}"
        ) from exc
    return cv2


class HaarBaseline:
    """Detect frontal faces with a Haar cascade and paint the boxes as a 0/1 mask."""

    name = "haar"

    def __init__(self, settings: HaarSettings | None = None):
        self.cfg = settings or HaarSettings()
        cv2 = _import_cv2()
        root = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = Path(root or "") / self.cfg.cascade
        if not root or not path.is_file():
            raise BaselineUnavailableError(
                f"OpenCV {cv2.__version__} has no {self.cfg.cascade} (cv2.data.haarcascades); "
                f"the 4.x wheels ship it: {INSTALL_HINT}"
            )
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise BaselineUnavailableError(f"{path}: OpenCV cannot load this cascade file")

    def settings(self) -> dict:
        return {**asdict(self.cfg), "opencv_version": self._cv2.__version__}

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Face boxes (k, 4) as float32 ``x1, y1, x2, y2`` in pixels of an HxWx3 RGB image."""
        cv2 = self._cv2
        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        if self.cfg.equalize:
            gray = cv2.equalizeHist(gray)
        found = self._cascade.detectMultiScale(
            gray, scaleFactor=self.cfg.scale_factor, minNeighbors=self.cfg.min_neighbors,
            minSize=(self.cfg.min_size, self.cfg.min_size),
        )
        boxes = np.asarray(found, np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        return boxes

    def predict_proba(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """0/1 float32 masks at each image's size (the detector has no probabilities)."""
        out = []
        for im in images:
            h, w = im.shape[:2]
            out.append(boxes_to_mask(self.detect(im), h, w).astype(np.float32))
        return out
