"""What every scorer is: it scores images (one round of one prompt each) and summarises the scores.

A scorer sees one round at a time, so round 1 and round 2 are scored by the same rules and
reported side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from irg.eval.benchmarks import EvalPrompt


@dataclass
class Verdict:
    """The score of one image in [0, 1] and why (GenEval: the failed conditions; WISE: the judge's marks);
    None where the image's dimension is not scored (absent, never zero: OneIG's reasoning without its model)."""
    score: float | None
    details: dict = field(default_factory=dict)


class Scorer(Protocol):
    name: str

    def score(self, items: Sequence[tuple[EvalPrompt, Image.Image]]) -> list[Verdict]: ...


def summarize(rows: Iterable[tuple[str, float]], overall: str = "categories") -> dict[str, float]:
    """Per-category means of ``(category, score)`` rows and their ``overall``: "categories" = the mean of
    the category means (GenEval), "prompts" = the mean over all prompts, i.e. categories weighted by
    their counts (WISE)."""
    by_category: dict[str, list[float]] = {}
    for category, score in rows:
        by_category.setdefault(category, []).append(score)
    if not by_category:
        return {}
    means = {c: sum(s) / len(s) for c, s in by_category.items()}
    if overall == "categories":
        means["overall"] = sum(means.values()) / len(means)
    elif overall == "prompts":
        scores = [s for values in by_category.values() for s in values]
        means["overall"] = sum(scores) / len(scores)
    else:
        raise ValueError(f"overall: unknown {overall!r}, expected 'categories' or 'prompts'")
    return means
