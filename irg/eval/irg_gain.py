"""Does round 2 (after the model's reflection) beat round 1, and is it the reflection that helps?

Per prompt the model draws round 1 (its own think and image) once; two round 2s then continue from
that same round 1, given back to the pipeline as the prompt's own think and image: one after the
model's own reflection, one (the control) after :data:`NEUTRAL_THINK`, a think in the reflection's
four-part structure that names no flaw. Both round 2s run under the same seed (so the round-1 image
is fed back with the same VAE-encode noise) and start from the same initial noise, so they differ
only in the think: ``reflection_vs_control`` is what the reflection's content adds, ``control_delta``
what a second draw alone gives. Round 2's seeds and noise are derived from the prompt's seed, not
taken from it, so they do not repeat round 1's draws; each is an ordinary draw, so round 2 is
distributed as in one ``pipe(prompt, rounds=2)`` call, except that the round-1 think goes back as
text (``think_texts``), so it is re-tokenised: the same for both round 2s, though not always the very
tokens sampled.

Every image is scored by the shapes world's GenEval rules; scores and rates come with 95 % stratified
bootstrap intervals (prompts resampled within their category, the same resamples for every statistic,
so differences are paired). For each round-1 image the scorer fails, the shapes judge lists its flaws
and :func:`irg.eval.shapes_judge.reflection_names_flaw` says whether the reflection names one.
"""

from __future__ import annotations

import json
import logging
import random
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from irg.eval.benchmarks import EvalPrompt
from irg.eval.geneval import shapes_scorer

log = logging.getLogger(__name__)

BENCHMARK = "shapes_irg"
# The control's round-2 think: the reflection's four parts, each only asking for the image again, so it
# says nothing about what is wrong (and, unlike a reflection, does not restate the scene either).
NEUTRAL_THINK = ("<think> Draw the image again.\n\n"
                 "### Detailed Explanation of Required Improvements:\n- Draw the image again.\n\n"
                 "### Step-by-Step Modification Guidance:\n1. Draw the image again.\n\n"
                 "### Final Comprehensive Prompt for the Improved Image:\nDraw the image again. </think>")
RESAMPLES = 2000
CONFIDENCE = 0.95
GENERATION_SETTINGS = ("height", "width", "num_steps", "max_think_tokens", "think_temperature", "round_settings")


# ---------------------------------------------------------------------------------------------- statistics

class Bootstrap:
    """Resamples of the prompts drawn within each category (the benchmark is balanced over them by
    design), shared by every statistic so that a difference's interval is a paired one."""

    def __init__(self, categories: Sequence[str], resamples: int = RESAMPLES, seed: int = 0):
        rng = np.random.default_rng(seed)
        labels = np.asarray(categories)
        self.positions = {c: np.flatnonzero(labels == c) for c in dict.fromkeys(categories)}
        self.draws = {c: p[rng.integers(0, len(p), size=(resamples, len(p)))] for c, p in self.positions.items()}

    def ratio(self, numerator, denominator, category: str | None = None) -> dict:
        """``sum(numerator) / sum(denominator)`` over one category's prompts (None: all of them, pooled).
        Resamples whose denominator is 0 are left out of the interval."""
        names = [category] if category else list(self.positions)
        positions = np.concatenate([self.positions[c] for c in names])
        draws = np.concatenate([self.draws[c] for c in names], axis=1)
        num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
        total = den[positions].sum()
        if total == 0:
            return _estimate(None, None, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            resampled = num[draws].sum(axis=1) / den[draws].sum(axis=1)
        return _estimate(num[positions].sum() / total, resampled, int(total))

    def mean_of_categories(self, values) -> dict:
        """The mean of the category means (GenEval's overall score)."""
        values = np.asarray(values, dtype=float)
        point = np.mean([values[p].mean() for p in self.positions.values()])
        resampled = np.mean([values[d].mean(axis=1) for d in self.draws.values()], axis=0)
        return _estimate(point, resampled, len(values))


def _estimate(value, resampled, n: int) -> dict:
    """A value with its percentile interval and the count it is over."""
    if value is None:
        return {"value": None, "low": None, "high": None, "n": n}
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return {"value": round(float(value), 4), "low": round(float(low), 4), "high": round(float(high), 4), "n": n}


def gain_report(categories: Sequence[str], round1, round2, control, names_flaw: Sequence[bool | None],
                resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Scores, paired differences and fixed/broken rates per category and overall, with intervals.

    ``round1``, ``round2``, ``control`` are per-prompt scores (GenEval's are 1 or 0; 0.5 or more is
    right); ``names_flaw`` is whether the reflection names a flaw of the round-1 image, None where
    round 1 was right. Scores overall are the mean of the category means, as GenEval's; rates are
    pooled over the group's prompts.
    """
    boot = Bootstrap(categories, resamples, seed)
    r1, r2, c2 = (np.asarray(s, dtype=float) for s in (round1, round2, control))
    judged = np.array([n is not None for n in names_flaw])
    named = np.array([bool(n) for n in names_flaw])
    right1 = r1 >= 0.5
    series = {"round1": r1, "round2": r2, "control_round2": c2, "delta": r2 - r1, "control_delta": c2 - r1,
              "reflection_vs_control": r2 - c2}
    ones = np.ones(len(r1))

    def block(category: str | None) -> dict:
        scores = {k: boot.ratio(v, ones, category) if category else boot.mean_of_categories(v)
                  for k, v in series.items()}
        transitions = {}
        for name, after in (("reflection", r2 >= 0.5), ("control", c2 >= 0.5)):
            fixed, broken = ~right1 & after, right1 & ~after
            transitions[name] = {"fixed": boot.ratio(fixed, ones, category),
                                 "fixed_of_wrong": boot.ratio(fixed, ~right1, category),
                                 "broken_of_right": boot.ratio(broken, right1, category)}
        return {"n": len(boot.positions[category]) if category else len(r1), **scores, **transitions,
                "names_flaw": boot.ratio(named & judged, judged, category)}

    return {"prompts": len(r1), "resamples": resamples, "confidence": CONFIDENCE,
            "categories": {c: block(c) for c in boot.positions}, "overall": block(None)}


def gain_metrics(report: dict) -> dict[str, float]:
    """MLflow metrics of a :func:`gain_report`: ``round2/overall``, ``round2/overall/low``, ...,
    ``reflection.fixed_of_wrong/counting``; statistics without a value are left out."""
    groups = {**report["categories"], "overall": report["overall"]}
    metrics = {}
    for group, stats in groups.items():
        estimates = {k: v for k, v in stats.items() if k not in ("n", "reflection", "control")}
        for name in ("reflection", "control"):
            estimates.update({f"{name}.{k}": v for k, v in stats[name].items()})
        for name, est in estimates.items():
            if est["value"] is not None:
                metrics.update({f"{name}/{group}": est["value"], f"{name}/{group}/low": est["low"],
                                f"{name}/{group}/high": est["high"]})
    return metrics


# --------------------------------------------------------------------------------------------- measurement

@dataclass
class PromptResult:
    """One prompt's think, reflection, three images (round 1, round 2, control round 2) and their scores."""
    prompt: EvalPrompt
    think: str
    reflection: str
    images: tuple[Image.Image, Image.Image, Image.Image]
    scores: tuple[float, float, float] | None = None
    flaws: list[str] | None = None  # the judge's, for a round-1 image the scorer fails
    names_flaw: bool | None = None

    def to_dict(self) -> dict:
        return {"id": self.prompt.id, "category": self.prompt.category, "prompt": self.prompt.prompt,
                "think": self.think, "reflection": self.reflection,
                "scores": dict(zip(("round1", "round2", "control_round2"), self.scores)),
                "flaws": self.flaws, "names_flaw": self.names_flaw}


@dataclass
class GainResult:
    rows: list[PromptResult]
    report: dict


def measure_irg_gain(pipe, prompts: Sequence[EvalPrompt], batch_size: int = 8, seed: int = 0,
                     resamples: int = RESAMPLES, **settings) -> GainResult:
    """Generate, score and judge every prompt (see the module's docstring) and build the report.

    ``settings`` are the pipeline's :data:`GENERATION_SETTINGS`; None (or left out) is the model's
    default. Round 2 runs the reflection and the control together: 2 x ``batch_size`` prompts a call.
    """
    unknown = set(settings) - set(GENERATION_SETTINGS)
    if unknown:
        raise ValueError(f"settings: unknown {sorted(unknown)}, expected some of {GENERATION_SETTINGS}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("prompts: at least one is required")
    start = time.perf_counter()
    rows: list[PromptResult] = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b: b + batch_size]
        rows += _generate_batch(pipe, batch, [seed + b + i for i in range(len(batch))], settings)
        log.info("generated %d/%d prompts (%.0f s)", len(rows), len(prompts), time.perf_counter() - start)
    scorer = shapes_scorer()
    scores = [[v.score for v in scorer.score([(r.prompt, r.images[k]) for r in rows])] for k in range(3)]
    for row, row_scores in zip(rows, zip(*scores)):
        row.scores = row_scores
    _judge_reflections(rows)
    report = gain_report([r.prompt.category for r in rows], *scores, [r.names_flaw for r in rows],
                         resamples=resamples, seed=seed)
    width, height = rows[0].images[0].size
    report = {"benchmark": BENCHMARK, "seed": seed, "batch_size": batch_size, "image_size": [width, height],
              "settings": {k: settings.get(k) for k in GENERATION_SETTINGS}, "neutral_think": NEUTRAL_THINK,
              "elapsed_s": round(time.perf_counter() - start, 1), **report}
    return GainResult(rows, report)


def _generate_batch(pipe, batch: Sequence[EvalPrompt], seeds: list[int], settings: dict) -> list[PromptResult]:
    """Round 1 once, then round 2 after the reflection and after :data:`NEUTRAL_THINK` in one call."""
    texts = [p.prompt for p in batch]
    per_round = settings.get("round_settings")
    first = pipe(texts, rounds=1, seed=seeds, **{**settings, "round_settings": per_round and per_round[:1]})
    size = first[0].images[0].size
    unit, channels = pipe.config.pixels_per_latent_token, pipe.config.latent_channels
    tokens = (size[0] // unit) * (size[1] // unit)
    noise = torch.stack([torch.randn((tokens, channels), generator=torch.Generator().manual_seed(_derived(s, "noise")))
                         for s in seeds])
    given_images = [[o.images[0], None] for o in first] * 2
    thinks = [[o.texts[0], None] for o in first] + [[o.texts[0], NEUTRAL_THINK] for o in first]
    second = pipe(texts * 2, rounds=2, seed=[_derived(s, "round2") for s in seeds] * 2, images=given_images,
                  think_texts=thinks, init_noise=[None, noise.repeat(2, 1, 1)], **settings)
    n = len(batch)
    return [PromptResult(p, o.texts[0], second[i].texts[1], (o.images[0], second[i].images[1], second[n + i].images[1]))
            for i, (p, o) in enumerate(zip(batch, first))]


def _derived(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` drawn from the prompt's, so round 2 does not replay round 1's draws."""
    return random.Random(f"irg-gain:{purpose}:{seed}").getrandbits(63)


def _judge_reflections(rows: list[PromptResult]) -> None:
    """For each failed round-1 image: the judge's flaws and whether the reflection names one of them."""
    from irg.eval.shapes_judge import ShapesJudge, reflection_names_flaw

    judge = ShapesJudge()
    for row in rows:
        if row.scores[0] < 0.5:
            flaws = judge.judge(row.images[0], row.prompt.prompt, row.prompt.metadata).flaws
            row.flaws = [str(f) for f in flaws]
            row.names_flaw = reflection_names_flaw(row.reflection, flaws)


# -------------------------------------------------------------------------------------------------- grid

GRID_PROMPTS = 8
CELL = 192
TEXT_WIDTH = 300
REFLECTION_WIDTH = 420
PAD = 8


def gain_grid(rows: Sequence[PromptResult], count: int = GRID_PROMPTS) -> Image.Image:
    """One line per prompt, fixed, broken and unchanged cases taken in turn: the prompt and round-1 think,
    the round-1 image, the reflection, the round-2 image and the control's round-2 image."""
    shown = _mixed_outcomes(rows, count)
    font = ImageFont.load_default(size=10)
    columns = [("prompt, round-1 think", TEXT_WIDTH), ("round 1", CELL), ("reflection", REFLECTION_WIDTH),
               ("round 2", CELL), ("control round 2", CELL)]
    row_height = CELL + 2 * PAD + 14
    grid = Image.new("RGB", (sum(w + PAD for _, w in columns) + PAD, 24 + row_height * max(1, len(shown))), "white")
    draw = ImageDraw.Draw(grid)
    lefts = np.cumsum([PAD] + [w + PAD for _, w in columns])[:-1].tolist()
    for (title, _), left in zip(columns, lefts):
        draw.text((left, 6), title, fill="black")
    for i, (outcome, row) in enumerate(shown):
        top = 24 + i * row_height + PAD
        texts = {0: f"[{row.prompt.category}, {outcome}] {row.prompt.prompt}\n{row.think}", 2: row.reflection}
        for column, text in texts.items():
            draw.multiline_text((lefts[column], top), _fit(text, font, columns[column][1], CELL + 14), font=font,
                                fill="black")
        for column, image, score in zip((1, 3, 4), row.images, row.scores):
            grid.paste(_scaled(image), (lefts[column], top))
            draw.text((lefts[column], top + CELL + 2), f"score {score:.0f}",
                      fill="darkgreen" if score >= 0.5 else "red")
    return grid


def _mixed_outcomes(rows: Sequence[PromptResult], count: int) -> list[tuple[str, PromptResult]]:
    """Up to ``count`` rows, taking one of each outcome in turn, in prompt order."""
    groups: dict[str, list[PromptResult]] = {"fixed": [], "broken": [], "still wrong": [], "still right": []}
    for row in rows:
        right1, right2 = row.scores[0] >= 0.5, row.scores[1] >= 0.5
        key = ("still right" if right2 else "broken") if right1 else ("fixed" if right2 else "still wrong")
        groups[key].append(row)
    shown = []
    while len(shown) < count and any(groups.values()):
        for outcome, members in groups.items():
            if members and len(shown) < count:
                shown.append((outcome, members.pop(0)))
    return shown


def _fit(text: str, font, width: int, height: int) -> str:
    """``text`` wrapped to ``width`` pixels and cut to the lines that fit ``height``."""
    sample = "the previous image shows three red circles"
    chars = max(10, int(width * len(sample) / font.getlength(sample)))
    lines = [line for paragraph in text.splitlines() for line in textwrap.wrap(paragraph, chars)]
    keep = max(1, int(height // (font.size + 4)))  # 4: multiline_text's line spacing
    return "\n".join(lines[:keep - 1] + ["…"] if len(lines) > keep else lines)


def _scaled(image: Image.Image) -> Image.Image:
    """Fit into a cell; small images (64 px) are enlarged without smoothing, so their pixels stay visible."""
    scale = CELL / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------ MLflow

def log_gain_run(result: GainResult, grid: Image.Image, model: str, tracking_uri: str | None = None,
                 params: dict | None = None) -> str:
    """Log a measurement as a new run of the evaluation experiment: metrics, the report and the
    per-prompt texts as JSON, the grid PNG. Returns the run id."""
    from irg import tracking
    from irg.eval.run import EXPERIMENT

    key = f"{BENCHMARK}-{model.rstrip('/').rsplit('/', 1)[-1]}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"irg.eval.model": model, "irg.eval.benchmark": BENCHMARK, "irg.eval.scorer": "shapes"}
    params = {"model": model, **{k: json.dumps(v) for k, v in (params or {}).items()}}
    files = {"report.json": result.report, "prompts.json": {"prompts": [r.to_dict() for r in result.rows]}}
    return tracking.log_measurement(EXPERIMENT, key, tags, params, gain_metrics(result.report), files,
                                    {"grid.png": grid}, tracking_uri)
