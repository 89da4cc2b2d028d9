"""IRGL rows from a model's own round-1 images, the way the paper built IRGL-300K, in the shapes world.

The base model draws round 1 for a prompt; a judge (:mod:`irg.eval.shapes_judge`) says what is wrong
with it; this module writes the reflection on exactly those flaws and the round-2 target: a clean
shapes-world render that keeps what the model drew right where it drew it, repairs wrong objects in
place, adds missing ones in free room and drops extras, so the detector reads it as exactly the
prompt's scene. An image the judge passes is kept: its reflection says so and its target is the image.
In the six learning modes the model's round-1 image plays the flawed image, the target the correct one.

Which think goes where: the improving modes condition on a think (no loss), and there the model's own
round-1 think is right, since it is what its image was drawn from; the initial modes *learn* a think,
and there it is the world's planning think of the target (:func:`~irg.data.synth.think_text`), not
the base model's own think that the training is meant to improve. A blank own think (a model may
close its think at once) falls back to the planning think, since IRGL text parts cannot be empty.

A judge is any object with ``judge(image, prompt, metadata)`` returning ``flaws`` (a list of
:class:`~irg.data.synth.Flaw`) and ``detections`` (what it read from the image, or None: then the
detector reads the image for the target's placements). This module does not import the judges
(``irg.eval`` builds on ``irg.data``, not the other way round).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image
from tqdm import tqdm

from irg import storage
from irg.data.format import MODES
from irg.data.synth import (
    BACKGROUND,
    CATEGORIES,
    COLOR_NAMED,
    COLOR_TOLERANCE,
    GRID,
    MARGIN,
    REGIONS,
    RELATIONS,
    Detection,
    Example,
    Flaw,
    ObjectSpec,
    Placed,
    Scene,
    color_flaw,
    count_flaw,
    draw,
    example_conversation,
    extra_flaw,
    geneval_metadata,
    kept_reflection_text,
    layout,
    measure,
    missing_flaw,
    reflection_text,
    relation_flaw,
    sample_scene,
    scene_from_metadata,
    shape_flaw,
    style_flaw,
    think_text,
    write_rows,
)
from irg.pipeline.prompts import SYSTEM_PROMPT

SEED_NAMESPACE = "irgl-synthesis"  # not irg.eval.benchmarks' "shapes-eval": training prompts are drawn apart
SIDE_RANGE = (0.12, 0.4)  # a kept shape's side, of the image's: readable, and leaving room for the rest
GAP = 0.03  # of the image side: the least empty space between two shapes of a target
STYLE_TOLERANCE = 0.02  # the share of the image that may be neither background nor in a shape's box
RELATION_MARGIN = 0.2  # see clearly_related
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class TargetObject:
    """One shape of the corrected image: its shape and colour, and where the model drew it (None: add it)."""
    shape: str
    color: str
    drawn: Detection | None


@dataclass(frozen=True)
class Correction:
    """How to turn what a model drew into the prompt's scene, and the flaws that names.

    ``scene`` is the target's scene: the prompt's, with the colours the prompt leaves open as drawn.
    ``objects`` follow the prompt's objects (a relation's two objects first and second).
    ``relation_fix`` is "swap" or "move" (objects[0]) when the drawn relation is wrong, else None."""
    scene: Scene
    objects: tuple[TargetObject, ...]
    flaws: tuple[Flaw, ...]
    relation_fix: str | None = None


def correct(scene: Scene, image: Image.Image, detections: Sequence[Detection] | None = None) -> Correction:
    """The edits from ``image`` (read as ``detections``, by default with :func:`~irg.data.synth.measure`)
    to ``scene``, each named by a flaw. Drawn shapes are matched to the prompt's objects in reading order:
    exact matches first, then (colour-named prompts) a same-shape one to recolour, then (single objects)
    one to reshape: same colour, or any shape when the prompt names no colour. What is still short is
    added, a group's surplus removed as a count flaw, anything else removed as an extra."""
    detections = measure(image) if detections is None else list(detections)
    named = scene.category in COLOR_NAMED
    unused = list(detections)

    def take(wanted: Callable[[Detection], bool], limit: int) -> list[Detection]:
        chosen = [d for d in unused if wanted(d)][:max(limit, 0)]
        for d in chosen:
            unused.remove(d)
        return chosen

    def exact(c: ObjectSpec) -> Callable[[Detection], bool]:
        return lambda d: d.shape == c.shape and (not named or d.color == c.color)

    groups = scene.objects
    assigned = [[TargetObject(c.shape, c.color if named else d.color, d) for d in take(exact(c), c.count)]
                for c in groups]
    flaws: list[list[Flaw]] = [[] for _ in groups]
    for g, c in enumerate(groups):
        if c.count > 1 and (surplus := take(exact(c), len(unused))):
            flaws[g].append(count_flaw(c, c.count + len(surplus)))
    if named:
        for g, c in enumerate(groups):
            recoloured = take(lambda d, c=c: d.shape == c.shape, c.count - len(assigned[g]))
            assigned[g] += [TargetObject(c.shape, c.color, d) for d in recoloured]
            for color, n in Counter(d.color for d in recoloured).items():
                flaws[g].append(color_flaw(c, color, n))
    for g, c in enumerate(groups):
        if c.count == 1 and not assigned[g]:
            for d in take(lambda d, c=c: not named or d.color == c.color, 1):
                wanted = replace(c, color=c.color if named else d.color)
                assigned[g].append(TargetObject(c.shape, wanted.color, d))
                flaws[g].append(shape_flaw(scene, wanted, ObjectSpec(d.shape, d.color)))
    for g, c in enumerate(groups):
        n = len(assigned[g])
        if 0 < n < c.count:
            flaws[g].append(count_flaw(c, n))
        elif n == 0:
            flaws[g].append(missing_flaw(scene, g))
        assigned[g] += [TargetObject(c.shape, c.color, None)] * (c.count - len(assigned[g]))
    found = [f for group in flaws for f in group]
    found += [extra_flaw(scene, ObjectSpec(shape, color, n))
              for (shape, color), n in Counter((d.shape, d.color) for d in unused).items()]
    objects = tuple(o for group in assigned for o in group)
    fix = None
    if scene.relation and all(o.drawn for o in objects):
        a, b = (o.drawn.box for o in objects)
        if not clearly_related(a, b, scene.relation):
            opposite = RELATIONS[scene.relation]
            actual = opposite if clearly_related(a, b, opposite) else _rough_relation(a, b, scene.relation)
            fix = "swap" if actual == opposite else "move"  # as relation_flaw's text says
            found.append(relation_flaw(scene, actual))
    if _stray_share(image, detections) > STYLE_TOLERANCE:
        found.append(style_flaw())
    counts = Counter((o.shape, o.color) for o in objects)
    target = Scene(scene.category, tuple(ObjectSpec(s, c, n) for (s, c), n in counts.items()), scene.relation)
    return Correction(target, objects, tuple(found), fix)


def clearly_related(a: Sequence[float], b: Sequence[float], relation: str) -> bool:
    """Box ``a`` is clearly ``relation`` box ``b``: along the relation's axis their centres are further
    apart than across it, by :data:`RELATION_MARGIN` of their two extents along it. GenEval's position
    rule (threshold 0.1) then always reads the relation, since ``|dx| + |dy|`` bounds the offset's length."""
    horizontal = relation in ("left of", "right of")
    axis = 0 if horizontal else 1
    offset = [(a[i] + a[i + 2] - b[i] - b[i + 2]) / 2 for i in (0, 1)]
    along = -offset[axis] if relation in ("left of", "above") else offset[axis]
    extents = (a[axis + 2] - a[axis]) + (b[axis + 2] - b[axis])
    return along > abs(offset[1 - axis]) + RELATION_MARGIN * extents


def _rough_relation(a: Sequence[float], b: Sequence[float], wanted: str) -> str | None:
    """Where ``a`` is relative to ``b`` along the larger offset; None when that is ``wanted`` (only not clearly)."""
    dx, dy = ((a[i] + a[i + 2] - b[i] - b[i + 2]) / 2 for i in (0, 1))
    if dx == dy == 0:
        return None
    rough = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
    return None if rough == wanted else rough


def _stray_share(image: Image.Image, detections: Sequence[Detection]) -> float:
    """The share of pixels that are neither background nor near a detected shape: noise, smears, blobs."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    stray = ((rgb - np.array(BACKGROUND)) ** 2).sum(-1) > COLOR_TOLERANCE**2
    pad = max(2, round(0.01 * max(rgb.shape[:2])))  # a blurred edge belongs to its shape
    for d in detections:
        x0, y0, x1, y1 = d.box
        stray[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = False
    return float(stray.mean())


def corrected_placements(correction: Correction, size: int, rng: random.Random) -> list[Placed] | None:
    """The target's shapes: drawn ones where the model drew them (their side clamped to :data:`SIDE_RANGE`),
    a wrong relation swapped or ``objects[0]`` moved, missing ones in free grid cells (drawn like
    :func:`~irg.data.synth.layout`). None when that leaves no room or shapes too close together."""
    placed: list[Placed | None] = [None if o.drawn is None else _placed_at(o.shape, o.color, o.drawn, size)
                                   for o in correction.objects]
    if correction.relation_fix == "swap":
        a, b = placed
        placed = [_moved(a, b.center, size), _moved(b, a.center, size)]
    elif correction.relation_fix == "move":
        placed[0] = None
    relation = correction.scene.relation
    margin, cell = MARGIN * size, (1 - 2 * MARGIN) * size / GRID
    cells = rng.sample(range(GRID * GRID), GRID * GRID)
    for i, o in enumerate(correction.objects):
        if placed[i] is not None:
            continue
        for index in cells:
            row, col = divmod(index, GRID)
            center = (margin + (col + 0.5) * cell, margin + (row + 0.5) * cell)
            candidate = Placed(o.shape, o.color, center, rng.uniform(0.5, 0.7) * cell, REGIONS[row][col])
            other = placed[1 - i] if relation else None
            if relation and (other is None or not clearly_related(*(
                    (_box(candidate), _box(other)) if i == 0 else (_box(other), _box(candidate))), relation)):
                continue
            if all(p is None or _apart(candidate, p, size) for p in placed):
                placed[i] = candidate
                cells.remove(index)
                break
        else:
            return None
    pairs_apart = all(_apart(p, q, size) for k, p in enumerate(placed) for q in placed[k + 1:])
    return placed if pairs_apart else None


def _placed_at(shape: str, color: str, drawn: Detection, size: int) -> Placed:
    """``shape`` in ``color`` where ``drawn`` is, as large as it (draw's boxes are one pixel wider than the side)."""
    x0, y0, x1, y1 = drawn.box
    side = (x1 - x0 + y1 - y0) / 2 - 1
    return _moved(Placed(shape, color, ((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2), side, ""), None, size)


def _moved(p: Placed, center: tuple[float, float] | None, size: int) -> Placed:
    """``p`` at ``center`` (None: where it is), its side clamped and the whole shape inside the margins."""
    side = min(max(p.size, SIDE_RANGE[0] * size), SIDE_RANGE[1] * size)
    low, high = MARGIN * size + side / 2, size - MARGIN * size - side / 2
    cx, cy = (min(max(v, low), high) for v in (center or p.center))
    cell = (1 - 2 * MARGIN) * size / GRID
    row, col = (min(max(int((v - MARGIN * size) // cell), 0), GRID - 1) for v in (cy, cx))
    return Placed(p.shape, p.color, (cx, cy), side, REGIONS[row][col])


def _box(p: Placed) -> tuple[float, float, float, float]:
    (cx, cy), half = p.center, p.size / 2
    return cx - half, cy - half, cx + half, cy + half


def _apart(p: Placed, q: Placed, size: int) -> bool:
    a, b, gap = _box(p), _box(q), GAP * size
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def reads_as(image: Image.Image, scene: Scene) -> bool:
    """The detector reads exactly ``scene`` in ``image``: its shapes and colours, nothing else, and its
    relation clearly (so GenEval's rules pass it)."""
    found = measure(image)
    if Counter((d.shape, d.color) for d in found) != Counter({(o.shape, o.color): o.count for o in scene.objects}):
        return False
    if scene.relation:
        a, b = (next(d for d in found if (d.shape, d.color) == (o.shape, o.color)).box for o in scene.objects)
        return clearly_related(a, b, scene.relation)
    return True


@dataclass(frozen=True)
class ModelExample:
    """One prompt's rows: ``example.flawed`` is the model's round-1 image, ``example.correct`` the target,
    ``example.think`` the planning think (initial modes), ``own_think`` the model's (improving modes)."""
    example: Example
    own_think: str
    flaws: tuple[Flaw, ...]

    @property
    def matched(self) -> bool:
        return not self.flaws

    def conversation(self, mode: str, system_prompt: str = SYSTEM_PROMPT) -> str:
        """The IRGL row of ``mode``; ``system_prompt`` is the first user turn (the model's own)."""
        ex = replace(self.example, think=self.own_think) if mode.startswith("improving") else self.example
        return example_conversation(mode, ex, system_prompt)


def synthesize(record: dict, image: Image.Image, think: str, judgement, rng: random.Random) -> ModelExample:
    """The example for a prompt's GenEval ``record`` from the model's round-1 ``image`` and ``think`` and a
    judge's ``judgement`` of it. ``rng`` places added shapes (and lays out a target whose drawn places
    cannot be kept). The reflection names the judge's flaws; the target mends what the detector reads, so
    with a judge that reads no boxes (a VLM) the two can differ where the VLM and the detector do.
    Raises RuntimeError if a target does not read as the prompt's scene."""
    scene = scene_from_metadata(record)
    image = image.convert("RGB")
    if image.width != image.height:
        raise ValueError(f"image: the shapes world draws square images, got {image.width}x{image.height}")
    size = image.width
    detections = measure(image) if judgement.detections is None else list(judgement.detections)
    correction = correct(scene, image, detections)
    flaws = tuple(judgement.flaws)
    if not flaws:
        shown = [_placed_at(d.shape, d.color, d, size) for d in detections] or layout(correction.scene, size, rng)
        target, reflection = image, kept_reflection_text(scene, shown)
    else:
        shown = corrected_placements(correction, size, rng)
        if shown is None or not reads_as(draw(shown, size), correction.scene):
            shown = layout(correction.scene, size, rng)
        target = draw(shown, size)
        if not reads_as(target, correction.scene):
            raise RuntimeError(f"the target for {record['prompt']!r} does not read as {correction.scene}")
        reflection = reflection_text(scene, shown, list(flaws))
    planning = think_text(scene, shown)
    example = Example(record["prompt"], planning, target, image, reflection)
    return ModelExample(example, think if think.strip() else planning, flaws)


@dataclass
class SynthesisSummary:
    """What a synthesis made: prompts, how many round-1 images the judge passed, flaws per kind, rows per mode."""
    prompts: int = 0
    matched: int = 0
    flaws: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: SynthesisSummary) -> SynthesisSummary:
        return SynthesisSummary(self.prompts + other.prompts, self.matched + other.matched,
                                dict(Counter(self.flaws) + Counter(other.flaws)),
                                dict(Counter(self.rows) + Counter(other.rows)))


def write_model_rows(out_uri: str, part: int, examples: Sequence[ModelExample], system_prompt: str = SYSTEM_PROMPT,
                     prefix: str = "model", modes: Sequence[str] = MODES) -> SynthesisSummary:
    """Write part ``part`` of the rows to ``<out_uri>/<mode>/<prefix>-part-NNNNN.parquet`` (next to the
    synthetic ``part-NNNNN.parquet`` rows), then its summary to ``<out_uri>/<prefix>-summary/part-NNNNN.json``,
    last, so that file marks a finished part."""
    _check_names(prefix, modes)
    for mode in modes:
        rows = [ex.conversation(mode, system_prompt) for ex in examples]
        write_rows(storage.join(out_uri, mode, f"{prefix}-part-{part:05d}.parquet"), rows)
    summary = SynthesisSummary(len(examples), sum(ex.matched for ex in examples),
                               dict(Counter(f.kind for ex in examples for f in ex.flaws)),
                               {mode: len(examples) for mode in modes})
    with storage.open_file(_summary_uri(out_uri, prefix, part), "w") as f:
        json.dump(asdict(summary), f)
    return summary


def synthesis_prompts(count: int, seed: int = 0) -> list[dict]:
    """``count`` GenEval records cycling through the six categories, drawn from :data:`SEED_NAMESPACE`
    (independent of the shapes benchmark's draws; the world has few distinct prompts in some categories,
    e.g. three single-object ones, so prompt texts do recur)."""
    rng = random.Random(f"{SEED_NAMESPACE}:{seed}")
    return [geneval_metadata(sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])) for i in range(count)]


def prompt_seed(seed: int, index: int) -> int:
    """Prompt ``index``'s generation seed: independent of batches, workers and what is already written."""
    return zlib.crc32(f"{SEED_NAMESPACE}:{seed}:{index}".encode())


Draw = Callable[[list[dict]], Iterable[dict]]
"""Round 1 for items ``{"index", "prompt", "seed"}``: rows ``{"index", "png", "think"}`` in any order."""


def synthesize_from_model(out_uri: str, judge, draw_round_one: Draw, *, prompts: int, seed: int = 0,
                          system_prompt: str = SYSTEM_PROMPT, prefix: str = "model", rows_per_file: int = 256,
                          modes: Sequence[str] = MODES, progress: bool = True) -> SynthesisSummary:
    """Draw round 1 for ``prompts`` prompts (:func:`synthesis_prompts`), judge each image and write the
    rows part by part as the images arrive. Resumable: a part whose summary exists is not drawn again.
    Returns the summary of all parts, also written to ``<out_uri>/<prefix>-summary.json``."""
    for name, value in (("prompts", prompts), ("rows_per_file", rows_per_file)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    _check_names(prefix, modes)
    records = synthesis_prompts(prompts, seed)
    parts = {k: range(start, min(prompts, start + rows_per_file))
             for k, start in enumerate(range(0, prompts, rows_per_file))}
    done = {k for k in parts if storage.exists(_summary_uri(out_uri, prefix, k))}
    todo = [{"index": i, "prompt": records[i]["prompt"], "seed": prompt_seed(seed, i)}
            for k in sorted(set(parts) - done) for i in parts[k]]
    pending: dict[int, dict[int, dict]] = {k: {} for k in parts if k not in done}
    with tqdm(total=prompts, initial=prompts - len(todo), unit="prompt", desc="synthesize", file=sys.stderr,
              disable=not progress) as bar:
        for row in draw_round_one(todo) if todo else ():
            k = int(row["index"]) // rows_per_file
            pending[k][int(row["index"])] = row
            bar.update()
            if len(pending[k]) == len(parts[k]):
                arrived = pending.pop(k)
                rows = [arrived[i] for i in parts[k]]
                examples = _judged(rows, records, judge, seed)
                write_model_rows(out_uri, k, examples, system_prompt, prefix, modes)
    if pending:
        raise RuntimeError(f"round 1 came back incomplete for parts {sorted(pending)}; run again to resume")
    total = SynthesisSummary()
    for k in parts:
        with storage.open_file(_summary_uri(out_uri, prefix, k), "r") as f:
            total += SynthesisSummary(**json.load(f))
    with storage.open_file(storage.join(out_uri, f"{prefix}-summary.json"), "w") as f:
        json.dump(asdict(total), f, indent=2)
    return total


def _judged(rows: list[dict], records: list[dict], judge, seed: int) -> list[ModelExample]:
    """The rows' examples; judged ``judge.max_concurrency`` at a time (a remote judge), else one by one."""

    def one(row: dict) -> ModelExample:
        i = int(row["index"])
        image = Image.open(io.BytesIO(row["png"])).convert("RGB")
        judgement = judge.judge(image, records[i]["prompt"], records[i])
        rng = random.Random(f"{SEED_NAMESPACE}:{seed}:{i}")
        return synthesize(records[i], image, str(row["think"]), judgement, rng)

    with ThreadPoolExecutor(max_workers=getattr(judge, "max_concurrency", 1)) as pool:
        return list(pool.map(one, rows))


def _summary_uri(out_uri: str, prefix: str, part: int) -> str:
    return storage.join(out_uri, f"{prefix}-summary", f"part-{part:05d}.json")


def _check_names(prefix: str, modes: Sequence[str]) -> None:
    if not isinstance(prefix, str) or not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(f"prefix: must be letters, digits or _ (it starts file names), got {prefix!r}")
    if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(MODES):
        raise ValueError(f"modes must be distinct names from {MODES}, got {list(modes)!r}")


class RoundOneDrawer:
    """One model replica (a Ray Data actor, or called directly): a batch of items in, each prompt's round-1
    image (PNG bytes) and think out. Generation settings left None are the model's defaults."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", system_prompt: str = SYSTEM_PROMPT,
                 generation: dict | None = None):
        from irg.pipeline import IRGPipeline

        self.pipe = IRGPipeline.from_pretrained(model, device=device, dtype=dtype)
        self.system_prompt = system_prompt
        self.generation = {k: v for k, v in (generation or {}).items() if v is not None}

    def __call__(self, batch: dict) -> dict[str, list]:
        outputs = self.pipe([str(p) for p in batch["prompt"]], rounds=1, seed=[int(s) for s in batch["seed"]],
                            system_prompt=self.system_prompt, **self.generation)
        pngs = []
        for out in outputs:
            buffer = io.BytesIO()
            out.images[0].save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return {"index": [int(i) for i in batch["index"]], "png": pngs, "think": [out.texts[0] for out in outputs]}


def ray_drawer(model: str, *, workers: int | None = None, batch_size: int = 4, device: str = "auto",
               dtype: str = "auto", system_prompt: str = SYSTEM_PROMPT, generation: dict | None = None) -> Draw:
    """Round 1 on a Ray Data actor pool of :class:`RoundOneDrawer` (default: one per GPU, else one). The
    settings are checked against the checkpoint's configuration here, before any actor starts."""
    from irg.device import device_name, dtype_name
    from irg.model.checkpoint import read_config
    from irg.pipeline.request import model_defaults, validate_request

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    device, dtype = device_name(device), dtype_name(dtype)
    settings = {k: v for k, v in (generation or {}).items() if v is not None}
    config = read_config(model)
    validate_request(config, "a prompt", rounds=1, system_prompt=system_prompt,
                     defaults=model_defaults(model, config), **settings)

    def draw_round_one(items: list[dict]) -> Iterator[dict]:
        import ray

        if not ray.is_initialized():
            ray.init()
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        if device.startswith("cuda") and not gpus:
            raise ValueError(f"device {device}: the Ray cluster has no GPUs (use auto or cpu)")
        blocks = math.ceil(len(items) / batch_size)
        pool = ray.data.ActorPoolStrategy(size=min(workers or max(gpus, 1), blocks))
        drawn = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            RoundOneDrawer, batch_size=batch_size, compute=pool,
            fn_constructor_kwargs={"model": model, "device": "cuda" if gpus else "cpu", "dtype": dtype,
                                   "system_prompt": system_prompt, "generation": settings},
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
        return drawn.iter_rows()

    return draw_round_one
