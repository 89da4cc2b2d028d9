"""What GenEval's rules need from a detector and a colour classifier, and the shapes-world pair.

A :class:`Detector` returns every candidate object with a confidence; the GenEval rules do the
thresholding, ordering and counting. A :class:`ColorClassifier` names the colour of each detected
object. :class:`ShapeDetector` reads the synthetic shapes world exactly (segmenting the palette
colours), so it knows each object's colour and serves as its own colour classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

# GenEval's colour vocabulary (what its CLIP classifier chooses from).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` is (x0, y0, x1, y1) in pixels, ``mask`` an optional HxW bool array,
    ``color`` set by detectors that read colours themselves."""
    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    mask: np.ndarray | None = None
    color: str | None = None


class Detector(Protocol):
    def detect(self, image: Image.Image, classes: Sequence[str]) -> list[Detection]:
        """Candidate objects of ``classes`` (any confidence; the rules threshold them)."""
        ...


class ColorClassifier(Protocol):
    def classify(self, image: Image.Image, detections: Sequence[Detection], label: str) -> list[str]:
        """The colour (one of :data:`COLORS`) of each detection of class ``label``."""
        ...


class ShapeDetector:
    """The shapes world's detector: palette segmentation (:func:`irg.data.synth.measure`), exact colours."""

    def __init__(self, min_area: float = 0.004):
        self.min_area = min_area

    def detect(self, image: Image.Image, classes: Sequence[str]) -> list[Detection]:
        from irg.data.synth import measure

        wanted = set(classes)
        return [Detection(d.shape, tuple(float(v) for v in d.box), 1.0, None, d.color)
                for d in measure(image, self.min_area) if d.shape in wanted]

    def classify(self, image: Image.Image, detections: Sequence[Detection], label: str) -> list[str]:
        return [d.color or "" for d in detections]
