"""GenEval's rules (Ghosh et al., 2023), as its evaluation script applies them to detections.

Per class, detections above the confidence threshold (0.9 for counting prompts, else 0.3) are kept
best first, at most 16, with optional non-maximum suppression. A prompt is correct only if every
``include`` holds (at least ``count`` objects; of the best ``count``, at least ``count`` have the
asked colour; each of them stands in the asked relation to every object of the target group) and no
``exclude`` does (fewer than ``count`` objects). Per-tag means, then the mean of the six tag means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from irg.eval.benchmarks import EvalPrompt
from irg.eval.detection import ColorClassifier, Detection, Detector, ShapeDetector
from irg.eval.scoring import Verdict


@dataclass(frozen=True)
class GenEvalRules:
    """The evaluation script's defaults."""
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 keeps overlapping detections
    position_threshold: float = 0.1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel areas (+1 per side)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str, rules: GenEvalRules = GenEvalRules()
                   ) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval counts: above threshold, best first, capped, de-duplicated."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    objects: dict[str, list[Detection]] = {}
    for label in dict.fromkeys(d.label for d in detections):
        ranked = sorted((d for d in detections if d.label == label and d.score > threshold),
                        key=lambda d: d.score, reverse=True)[:rules.max_objects]
        kept = []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if rules.max_overlap < 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < rules.max_overlap]
        if kept:
            objects[label] = kept
    return objects


def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> set[str]:
    """Where ``a`` is relative to ``b``: centre offsets shrunk by ``threshold`` of both sizes, then any
    direction holding more than half of the (unshrunk) offset's length. Image y grows downwards."""
    boxes = np.array([a.box[:4], b.box[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(record: dict, objects: dict[str, list[Detection]],
             colors_of: Callable[[str, list[Detection]], list[str]],
             rules: GenEvalRules = GenEvalRules()) -> tuple[bool, list[str]]:
    """Whether ``objects`` (from :func:`select_objects`) satisfy the GenEval ``record``, and why not.

    ``colors_of(label, detections)`` names the colours of detections; it is asked only for groups
    with a colour condition that were found in sufficient number.
    """
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []  # per include: its matched objects, None if it failed
    for req in record.get("include", []):
        label, count = req["class"], req["count"]
        found = objects.get(label, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {label}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(label, found)
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {label}>={count}, found colours {colors}")
            if "position" in req and matched:
                relation, target = req["position"]
                if target >= len(groups) or groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {label} to be {relation}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            actual = relative_position(obj, other, rules.position_threshold)
                            if relation not in actual:
                                matched = False
                                found_text = " and ".join(sorted(actual)) or "no clear relation to"
                                reasons.append(f"expected {label} {relation} target, found {found_text} target")
                                break
                        if not matched:
                            break
        correct &= matched
        groups.append(found if matched else None)
    for req in record.get("exclude", []):
        label, count = req["class"], req["count"]
        if len(objects.get(label, [])) >= count:
            correct = False
            reasons.append(f"expected {label}<{count}, found {len(objects[label])}")
    return correct, reasons


class GenEvalScorer:
    """GenEval on any :class:`Detector` and :class:`ColorClassifier`; 1.0 for a correct image, else 0.0."""

    def __init__(self, detector: Detector, colors: ColorClassifier, rules: GenEvalRules = GenEvalRules(),
                 name: str = "geneval"):
        self.detector, self.colors, self.rules, self.name = detector, colors, rules, name

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]:
        return [self._score_one(prompt.metadata, image) for prompt, image in items]

    def _score_one(self, record: dict, image: Image.Image) -> Verdict:
        classes = sorted({req["class"] for req in record.get("include", []) + record.get("exclude", [])})
        objects = select_objects(self.detector.detect(image, classes), record["tag"], self.rules)
        correct, reasons = evaluate(record, objects, lambda label, found: self.colors.classify(image, found, label),
                                    self.rules)
        return Verdict(float(correct), {"reasons": reasons, "counts": {k: len(v) for k, v in objects.items()}})


def shapes_scorer() -> GenEvalScorer:
    """GenEval's categories and rules over the synthetic shapes world, read by palette segmentation."""
    detector = ShapeDetector()
    return GenEvalScorer(detector, detector, name="shapes")
