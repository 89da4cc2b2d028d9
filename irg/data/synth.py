"""A procedural "shapes world" that writes synthetic IRGL data for all six learning modes.

A :class:`Scene` (coloured shapes with counts and an optional spatial relation, in the six GenEval
categories) drives everything: the prompt, the planning think, the rendered image, a deliberately
flawed first image with a reflection that names its flaws, and the corrected image. :func:`measure`
reads the shapes back from an image, so a model trained on this world can be scored with no external
detector (:func:`geneval_metadata` gives the same scene as a GenEval ``include``/``exclude`` record).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from tqdm import tqdm

from irg.data.format import EDITING_MODE, MODES, ImagePart, Part, TextPart, conversation_json
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.storage import join, open_file

SHAPES = ("circle", "square", "triangle")
PALETTE = {  # far apart in RGB and from the background, so nearest-colour reading is unambiguous
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 230), "yellow": (250, 215, 0),
    "purple": (140, 50, 180), "orange": (255, 128, 0), "black": (25, 25, 25),
}
BACKGROUND = (238, 238, 232)
BACKGROUND_NAME = "plain light grey background"
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_NAMED = ("counting", "colors", "position", "color_attr")  # categories whose prompts name colours
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PROSE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GRID = 3  # each object gets its own cell of a GRID x GRID grid: no overlaps, at most 9 objects
MARGIN = 0.05  # of the canvas on each side, so no shape touches the border
MAX_COUNT = 4  # counting prompts ask for 2..MAX_COUNT objects, as GenEval does
FLAW_KINDS = {  # per category, the flaws that make an image fail it (GenEval counts are minimums, except counting)
    "single_object": ("shape",), "two_object": ("missing", "shape"), "counting": ("count",),
    "colors": ("color",), "position": ("relation", "missing"), "color_attr": ("color", "missing"),
}
FLAW_TITLES = {"count": "Count", "color": "Colour", "shape": "Shape", "missing": "Missing object",
               "relation": "Position", "extra": "Extra object", "style": "Style"}  # extra, style: model images only
REGIONS = (("at the top left", "at the top", "at the top right"),
           ("on the left", "in the centre", "on the right"),
           ("at the bottom left", "at the bottom", "at the bottom right"))


@dataclass(frozen=True)
class ObjectSpec:
    """A group of ``count`` identical shapes."""
    shape: str
    color: str
    count: int = 1

    def phrase(self, with_color: bool = True) -> str:
        """"a red circle", "three circles"."""
        words = ([self.color] if with_color else []) + [self.shape + ("s" if self.count > 1 else "")]
        if self.count > 1:
            return " ".join([number_word(self.count), *words])
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    @property
    def name(self) -> str:
        """How texts refer back to the group: "the red circle(s)"."""
        return f"the {self.color} {self.shape}" + ("s" if self.count > 1 else "")


@dataclass(frozen=True)
class Scene:
    """What an image should show; ``relation`` says where ``objects[0]`` is relative to ``objects[1]``."""
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category: unknown {self.category!r}, expected one of {CATEGORIES}")
        for obj in self.objects:
            if obj.shape not in SHAPES or obj.color not in PALETTE or obj.count < 1:
                raise ValueError(f"objects: invalid {obj}")
        if sum(obj.count for obj in self.objects) > GRID * GRID:
            raise ValueError(f"objects: more than {GRID * GRID} shapes do not fit the grid")
        if self.relation is not None and (self.relation not in RELATIONS or len(self.objects) != 2
                                          or any(obj.count != 1 for obj in self.objects)):
            raise ValueError(f"relation: {self.relation!r} needs a known relation between two single objects")


@dataclass(frozen=True)
class Flaw:
    """One way a first image misses its prompt; the reflection quotes these texts."""
    kind: str  # a key of FLAW_TITLES: count | color | shape | missing | relation | extra | style
    description: str  # what is wrong: "there are two red circles instead of three"
    requirement: str  # what the prompt asks for
    fix: str  # an imperative edit that repairs it

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True)
class Placed:
    """One drawn shape: centre and extent in pixels, ``region`` in words for the texts."""
    shape: str
    color: str
    center: tuple[float, float]
    size: float
    region: str


@dataclass(frozen=True)
class Detection:
    """A shape read back from an image by :func:`measure`; ``box`` is (x0, y0, x1, y1), exclusive."""
    shape: str
    color: str
    box: tuple[int, int, int, int]
    area: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def number_word(n: int) -> str:
    """"three"; digits past nine (a model may draw more shapes than any prompt asks for)."""
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def sample_scene(rng: random.Random, category: str | None = None) -> Scene:
    """A random scene of ``category`` (uniform over :data:`CATEGORIES` when None)."""
    category = rng.choice(CATEGORIES) if category is None else category
    if category not in CATEGORIES:
        raise ValueError(f"category: unknown {category!r}, expected one of {CATEGORIES}")
    shapes, colors = rng.sample(SHAPES, 2), rng.sample(sorted(PALETTE), 2)
    if category in ("single_object", "colors", "counting"):
        count = rng.randint(2, MAX_COUNT) if category == "counting" else 1
        return Scene(category, (ObjectSpec(shapes[0], colors[0], count),))
    relation = rng.choice(sorted(RELATIONS)) if category == "position" else None
    return Scene(category, tuple(ObjectSpec(s, c) for s, c in zip(shapes, colors)), relation)


def scene_prompt(scene: Scene) -> str:
    """GenEval-style prompt: "a photo of three red circles", "a photo of a blue square to the left of ..."."""
    a, *rest = [_as_prompted(scene, obj) for obj in scene.objects]
    if scene.relation:
        return f"a photo of {a} {RELATION_PROSE[scene.relation]} {rest[0]}"
    return "a photo of " + " and ".join([a, *rest])


def geneval_metadata(scene: Scene) -> dict:
    """The scene as a GenEval record (``tag``, ``include``, ``exclude``, ``prompt``), shapes as classes."""
    named = scene.category in COLOR_NAMED
    include = [{"class": o.shape, "count": o.count, **({"color": o.color} if named else {})} for o in scene.objects]
    if scene.relation:  # GenEval states the relation of include[1] to include[0]
        include = [include[1], {**include[0], "position": [scene.relation, 0]}]
    record = {"tag": scene.category, "include": include, "prompt": scene_prompt(scene)}
    if scene.category == "counting":
        record["exclude"] = [{"class": o.shape, "count": o.count + 1} for o in scene.objects]
    return record


def scene_from_metadata(record: dict) -> Scene:
    """The scene of a shapes-world GenEval record: the inverse of :func:`geneval_metadata`. Records do not
    name the colours of single_object and two_object prompts; those objects get distinct placeholder
    colours (any colour satisfies such a prompt). Raises ValueError for a record the world cannot have made."""
    try:
        tag, include = record["tag"], record["include"]
        objects = [ObjectSpec(req["class"], req.get("color", sorted(PALETTE)[i]), req["count"])
                   for i, req in enumerate(include)]
        relation = include[-1]["position"][0] if "position" in include[-1] else None
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"record: not a GenEval record ({type(e).__name__}: {e})") from None
    if relation is not None:  # GenEval states include[1] relative to include[0]; the scene states objects[0]
        objects = objects[::-1]
    if len({o.shape for o in objects}) != len(objects):
        raise ValueError(f"record: names a shape twice, which GenEval's rules can never pass: {record}")
    scene = Scene(tag, tuple(objects), relation)
    expected = geneval_metadata(scene)
    if any(record.get(key) != value for key, value in expected.items()):
        raise ValueError(f"record: not as the shapes world writes this scene (expected {expected}): {record}")
    return scene


def layout(scene: Scene, size: int, rng: random.Random) -> list[Placed]:
    """Place every shape in its own grid cell. The random draws do not depend on the scene's content,
    so a flawed scene laid out with an equally seeded ``rng`` keeps the untouched shapes in place."""
    margin = MARGIN * size
    cell = (size - 2 * margin) / GRID
    order = rng.sample(range(GRID * GRID), GRID * GRID)
    shape_params = [(rng.uniform(0.5, 0.7), rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in order]
    pair = rng.choice(_relation_pairs(scene.relation)) if scene.relation else None
    cells = order
    if pair:  # the relation's "first" cell goes to objects[0] for left of/above, so a swap mirrors it
        cells = list(pair) if scene.relation in ("left of", "above") else [pair[1], pair[0]]
    kinds = [(obj.shape, obj.color) for obj in scene.objects for _ in range(obj.count)]
    placed = []
    for (shape, color), index in zip(kinds, cells):
        frac, jx, jy = shape_params[index]
        row, col = divmod(index, GRID)
        slack = (1 - frac) * cell / 4  # at most half the free margin: shapes stay well inside their cell
        center = (margin + (col + 0.5) * cell + jx * slack, margin + (row + 0.5) * cell + jy * slack)
        placed.append(Placed(shape, color, center, frac * cell, REGIONS[row][col]))
    return placed


def _relation_pairs(relation: str) -> list[tuple[int, int]]:
    """Cell pairs (a, b) with b further along the relation's axis than off it, so GenEval's
    position rule reads the intended relation unambiguously."""
    axis = 1 if relation in ("left of", "right of") else 0  # index into (row, col)
    pairs = []
    for a in range(GRID * GRID):
        for b in range(GRID * GRID):
            ra, rb = divmod(a, GRID), divmod(b, GRID)
            if rb[axis] - ra[axis] > abs(rb[1 - axis] - ra[1 - axis]):
                pairs.append((a, b))
    return pairs


def draw(placed: list[Placed], size: int) -> Image.Image:
    """Flat, aliased shapes (exact palette colours) on the plain background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    for p in placed:
        (cx, cy), half = p.center, p.size / 2
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        fill = PALETTE[p.color]
        if p.shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif p.shape == "square":
            canvas.rectangle(box, fill=fill)
        else:
            canvas.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    return draw(layout(scene, size, rng), size)


def measure(image: Image.Image, min_area: float = 0.004) -> list[Detection]:
    """Read the shapes back. Pixels within :data:`COLOR_TOLERANCE` of a palette colour take it; per
    colour, connected components (holes filled) of at least ``min_area`` of the image that are convex
    (:data:`MIN_SOLIDITY`) and close to a shape prototype (how a blob fills its bounding box and its
    top and bottom corners) are shapes. Anything else (noise, smears) is not an object."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    references = np.array([BACKGROUND, *PALETTE.values()], dtype=np.int32)
    distances = ((rgb[:, :, None, :] - references) ** 2).sum(-1)
    nearest = distances.argmin(-1)
    nearest[distances.min(-1) > COLOR_TOLERANCE**2] = -1
    smallest = min_area * rgb.shape[0] * rgb.shape[1]
    found = []
    for k, color in enumerate(PALETTE, start=1):
        labels, _ = ndimage.label(ndimage.binary_fill_holes(nearest == k))
        for label, region in enumerate(ndimage.find_objects(labels), start=1):
            blob = labels[region] == label
            area = int(blob.sum())
            if area < smallest:
                continue
            shape, distance = _nearest_shape(blob)
            if distance > MAX_SHAPE_DISTANCE or _solidity(blob) < MIN_SOLIDITY:
                continue
            ys, xs = region
            if _background_around(nearest, labels == label) < MIN_BACKGROUND_AROUND:
                continue
            found.append(Detection(shape, color, (xs.start, ys.start, xs.stop, ys.stop), area))
    return sorted(found, key=lambda d: (d.box[1], d.box[0]))


# (fill of the bounding box, fill of its top corners, of its bottom corners), measured on clean renders;
# the fill weighs most, the corners tell a blurred square (corners kept) from a circle.
SHAPE_PROTOTYPES = {"square": np.array([1.0, 1.0, 1.0]), "circle": np.array([0.783, 0.126, 0.126]),
                    "triangle": np.array([0.506, 0.0, 0.767])}
SHAPE_FEATURE_WEIGHTS = np.array([4.0, 1.0, 1.0])
MAX_SHAPE_DISTANCE = 1.2  # weighted distance to the nearest prototype
MIN_SOLIDITY = 0.75  # blob area over its convex hull's: the shapes are convex, noise blobs are not
COLOR_TOLERANCE = 60  # RGB distance within which a pixel counts as a palette colour
MIN_BACKGROUND_AROUND = 0.4  # shapes stand on the plain background; a blob in a colourful mess is noise


def _nearest_shape(blob: np.ndarray) -> tuple[str, float]:
    features = _shape_features(blob)
    distances = {s: float(np.linalg.norm((features - p) * SHAPE_FEATURE_WEIGHTS)) for s, p in SHAPE_PROTOTYPES.items()}
    shape = min(distances, key=distances.get)
    return shape, distances[shape]


def _background_around(nearest: np.ndarray, blob: np.ndarray) -> float:
    """The share of background pixels in a ring 2-3 pixels out from ``blob`` (past any blurred edge)."""
    inner = ndimage.binary_dilation(blob, iterations=2)
    ring = ndimage.binary_dilation(inner) & ~inner
    return float((nearest[ring] == 0).mean()) if ring.any() else 1.0


def _solidity(blob: np.ndarray) -> float:
    ys, xs = np.nonzero(blob)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    try:
        return float(blob.sum() / ConvexHull(corners).volume)
    except QhullError:  # a line of pixels
        return 0.0


def _shape_features(blob: np.ndarray) -> np.ndarray:
    h, w = blob.shape
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    top = (blob[:ch, :cw].mean() + blob[:ch, -cw:].mean()) / 2
    bottom = (blob[-ch:, :cw].mean() + blob[-ch:, -cw:].mean()) / 2
    return np.array([blob.mean(), top, bottom])


def flaw(scene: Scene, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    """A deliberately wrong version of ``scene`` that fails its category, and what is wrong with it."""
    kind = rng.choice(FLAW_KINDS[scene.category])
    return _FLAW_MAKERS[kind](scene, rng.randrange(len(scene.objects)), rng)


def _missing(scene: Scene, g: int, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    return replace(scene, objects=(scene.objects[1 - g],), relation=None), [missing_flaw(scene, g)]


def _swapped_relation(scene: Scene, g: int, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    return replace(scene, relation=RELATIONS[scene.relation]), [relation_flaw(scene, RELATIONS[scene.relation])]


def _wrong_count(scene: Scene, g: int, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    c = scene.objects[g]
    n = rng.choice([k for k in range(1, MAX_COUNT + 2) if k != c.count])
    return _replaced(scene, g, replace(c, count=n)), [count_flaw(c, n)]


def _wrong_shape(scene: Scene, g: int, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    c = scene.objects[g]
    drawn = replace(c, shape=rng.choice([s for s in SHAPES if s not in {obj.shape for obj in scene.objects}]))
    return _replaced(scene, g, drawn), [shape_flaw(scene, c, drawn)]


def _wrong_color(scene: Scene, g: int, rng: random.Random) -> tuple[Scene, list[Flaw]]:
    """Two groups get their colours swapped (the binding error color_attr tests), a single one a new colour."""
    objs = scene.objects
    if len(objs) == 2:
        drawn = (replace(objs[0], color=objs[1].color), replace(objs[1], color=objs[0].color))
    else:
        drawn = (replace(objs[0], color=rng.choice([k for k in sorted(PALETTE) if k != objs[0].color])),)
    return replace(scene, objects=drawn), [color_flaw(o, d.color) for o, d in zip(objs, drawn)]


# The flaw texts, from what is drawn: the flaw makers above use them, and so does the correction of a
# model's own images (irg.data.irgl_synthesis), which finds the drawn values in the image.

def missing_flaw(scene: Scene, g: int) -> Flaw:
    """``scene.objects[g]`` is not drawn at all."""
    gone, others = scene.objects[g], scene.objects[:g] + scene.objects[g + 1:]
    if scene.relation:
        where = f" {RELATION_PROSE[scene.relation if g == 0 else RELATIONS[scene.relation]]} {others[0].name}"
    else:
        where = " in an empty area, clearly apart from the other shape" if others else ""
    return Flaw("missing", f"{gone.name} {'are' if gone.count > 1 else 'is'} missing", _as_prompted(scene, gone),
                f"add {gone.phrase()}{where}")


def count_flaw(c: ObjectSpec, n: int) -> Flaw:
    """``n`` (>= 1) shapes of group ``c`` are drawn instead of ``c.count``."""
    diff, shapes = c.count - n, f"{c.color} {c.shape}"
    shown = f"{'only ' * (diff > 0)}{number_word(n)} {shapes}{'s' * (n > 1)}"
    fix = (f"add {NUMBERS[diff]} more {shapes}{'s' * (diff > 1)} in the empty space" if diff > 0 else
           f"remove {number_word(-diff)} of the {shapes}s")
    return Flaw("count", f"there {'is' if n == 1 else 'are'} {shown} instead of {NUMBERS[c.count]}",
                f"exactly {c.phrase()}", f"{fix}, so that there are exactly {NUMBERS[c.count]}")


def shape_flaw(scene: Scene, wanted: ObjectSpec, drawn: ObjectSpec) -> Flaw:
    """``drawn`` stands where ``wanted`` (a group of the scene, in the colour it is to have) should be."""
    prompted = _as_prompted(scene, wanted)
    return Flaw("shape", f"it shows {drawn.phrase()} instead of {prompted}", prompted,
                f"replace {drawn.name} with {wanted.phrase()} of the same size in the same place")


def color_flaw(wanted: ObjectSpec, drawn_color: str, n: int = 1) -> Flaw:
    """``n`` shapes of group ``wanted`` are drawn in ``drawn_color``."""
    if wanted.count == 1:
        what, which = f"the {wanted.shape} is", f"the {wanted.shape}"
    elif n == wanted.count:
        what, which = f"the {wanted.shape}s are", f"the {wanted.shape}s"
    else:
        what = f"{number_word(n)} of the {wanted.shape}s {'is' if n == 1 else 'are'}"
        which = f"that {wanted.shape}" if n == 1 else f"those {number_word(n)} {wanted.shape}s"
    keeping = "its size and place" if n == 1 else "their sizes and places"
    return Flaw("color", f"{what} {drawn_color} instead of {wanted.color}", wanted.phrase(),
                f"recolour {which} solid {wanted.color}, keeping {keeping}")


def relation_flaw(scene: Scene, actual: str | None) -> Flaw:
    """The scene's two objects are drawn with ``objects[0]`` ``actual`` ``objects[1]`` (None: in no clear
    relation). The opposite relation is mended by a swap, any other by moving ``objects[0]``."""
    a, b = (obj.name for obj in scene.objects)
    wanted = RELATION_PROSE[scene.relation]
    shown = f"is {RELATION_PROSE[actual]} {b} instead of {wanted} it" if actual else f"is not clearly {wanted} {b}"
    fix = (f"swap the two shapes so that {a} sits {wanted} {b}" if actual == RELATIONS[scene.relation] else
           f"move {a} so that it sits {wanted} {b}")
    return Flaw("relation", f"{a} {shown}", f"{a} {wanted} {b}", fix)


def extra_flaw(scene: Scene, extra: ObjectSpec) -> Flaw:
    """``extra`` is drawn besides what the prompt asks for."""
    return Flaw("extra", f"there {'is' if extra.count == 1 else 'are'} also {extra.phrase()} that the prompt does "
                         "not ask for", f"only {scene_prompt(scene).removeprefix('a photo of ')}",
                f"remove the extra {extra.color} {extra.shape}{'s' * (extra.count > 1)}")


def style_flaw() -> Flaw:
    """Parts of the image are neither the background nor a readable shape (noise, smears, blobs)."""
    return Flaw("style", "parts of the image are smeared or noisy and cannot be read as clean, solid shapes",
                f"flat, solid shapes on a {BACKGROUND_NAME}",
                f"redraw everything flat and solid with crisp edges on a clean {BACKGROUND_NAME}")


def _as_prompted(scene: Scene, obj: ObjectSpec) -> str:
    return obj.phrase(scene.category in COLOR_NAMED)


def _replaced(scene: Scene, g: int, obj: ObjectSpec) -> Scene:
    return replace(scene, objects=scene.objects[:g] + (obj,) + scene.objects[g + 1:])


_FLAW_MAKERS = {"missing": _missing, "relation": _swapped_relation, "count": _wrong_count, "shape": _wrong_shape,
                "color": _wrong_color}


def think_text(scene: Scene, placed: list[Placed]) -> str:
    """Think 1: plan the objects, colours, counts and placement of the correct image. Only what the image
    depends on: every token of boilerplate is a token not spent on images (the style is always the world's)."""
    text = (f"<think> The prompt asks for {scene_prompt(scene).removeprefix('a photo of ')}. "
            f"I will draw {placement_text(placed)}.")
    if scene.relation:
        a, b = scene.objects
        text += f" That way {a.name} is clearly {RELATION_PROSE[scene.relation]} {b.name}."
    return text + " </think>"


def placement_text(placed: list[Placed]) -> str:
    """"two red circles, one at the top and one in the centre and a blue square on the left"."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in placed:
        groups.setdefault((p.shape, p.color), []).append(p.region)
    spots = [f"{ObjectSpec(shape, color, len(regions)).phrase()} {regions[0]}" if len(regions) == 1 else
             f"{ObjectSpec(shape, color, len(regions)).phrase()}, " + _and_join([f"one {r}" for r in regions])
             for (shape, color), regions in groups.items()]
    return _and_join(spots)


def _and_join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def reflection_text(scene: Scene, placed: list[Placed], flaws: list[Flaw]) -> str:
    """Think 2 in the four-part structure the IRG system prompt asks for: what is wrong, why, the edits
    (each flaw's fix, then keep the rest) and the improved image's full description (``placed``)."""
    problems = "; ".join(f.description for f in flaws)
    steps = [*(f.fix[0].upper() + f.fix[1:] + "." for f in flaws), KEEP_THE_REST]
    return _four_parts(f"The previous image does not yet match the prompt \"{scene_prompt(scene)}\": {problems}.",
                       [f"{FLAW_TITLES[f.kind]}: the prompt requires {f.requirement}, but {f.description}."
                        for f in flaws], steps, placed)


KEEP_THE_REST = "Keep everything else as it is."


def kept_reflection_text(scene: Scene, placed: list[Placed]) -> str:
    """Think 2 for a previous image that already matches its prompt (``placed``: what it shows): keep it."""
    return _four_parts(f"The previous image already matches the prompt \"{scene_prompt(scene)}\". "
                       "It should be kept as it is.",
                       ["None needed: every object, count, colour and position the prompt asks for is right."],
                       ["Keep the previous image as it is: the same shapes, colours, sizes and places."], placed)


def _four_parts(analysis: str, improvements: list[str], steps: list[str], placed: list[Placed]) -> str:
    """The reflection's structure: an analysis, then the three sections the IRG system prompt names."""
    return ("<think> " + analysis + "\n\n### Detailed Explanation of Required Improvements:\n"
            + "".join(f"- {s}\n" for s in improvements) + "\n"
            "### Step-by-Step Modification Guidance:\n"
            + "".join(f"{i}. {s}\n" for i, s in enumerate(steps, start=1)) + "\n"
            "### Final Comprehensive Prompt for the Improved Image:\n"
            f"{placement_text(placed)[0].upper()}{placement_text(placed)[1:]} on a {BACKGROUND_NAME}. </think>")


@dataclass(frozen=True)
class Example:
    """Everything the six modes draw from for one prompt."""
    prompt: str
    think: str
    correct: Image.Image
    flawed: Image.Image
    reflection: str


def make_example(rng: random.Random, image_size: int) -> Example:
    scene = sample_scene(rng)
    flawed_scene, flaws = flaw(scene, rng)
    layout_seed = rng.getrandbits(64)  # shared, so the flawed image differs from the correct one only by its flaws
    placed = layout(scene, image_size, random.Random(layout_seed))
    return Example(scene_prompt(scene), think_text(scene, placed), draw(placed, image_size),
                   render(flawed_scene, image_size, random.Random(layout_seed)), reflection_text(scene, placed, flaws))


EDIT_KINDS = ("color", "shape", "missing", "count", "relation", "extra", "keep")
KEEP_SHARE = 0.15  # of editing examples whose source already matches: the edit is "keep it as it is"


def make_edit_example(rng: random.Random, image_size: int, kind: str | None = None) -> Example:
    """An editing example: a source image with one kind of flaw the judge can name (``kind``, default
    random among those the scene can have; "keep": none), the reflection that names it and the target.
    Edits are made on the drawn shapes, so the target differs from the source exactly where the
    instruction says and every other pixel is the same."""
    scene = sample_scene(rng)
    placed = layout(scene, image_size, rng)
    kinds = edit_kinds(scene)
    if kind is None:
        kind = "keep" if rng.random() < KEEP_SHARE else rng.choice([k for k in kinds if k != "keep"])
    elif kind not in kinds:
        raise ValueError(f"kind: a {scene.category} scene cannot have a {kind!r} flaw (it can have {kinds})")
    source, flaws = edit_source(scene, placed, kind, image_size, rng)
    reflection = reflection_text(scene, placed, flaws) if flaws else kept_reflection_text(scene, placed)
    return Example(scene_prompt(scene), think_text(scene, placed), draw(placed, image_size),
                   draw(source, image_size), reflection)


def edit_kinds(scene: Scene) -> tuple[str, ...]:
    """The flaws a source of ``scene`` can be given: a missing object needs a second one to keep, a relation
    two related objects, a wrong count an unrelated scene, and an extra object a free cell."""
    allowed = {"color", "shape", "extra", "keep"}
    if len(scene.objects) == 2:
        allowed.add("missing")
    allowed.add("relation" if scene.relation else "count")
    return tuple(k for k in EDIT_KINDS if k in allowed)


def edit_source(scene: Scene, placed: list[Placed], kind: str, size: int,
                rng: random.Random) -> tuple[list[Placed], list[Flaw]]:
    """The source's shapes for a ``kind`` edit of the target ``placed`` (laid out from ``scene``), and its flaws."""
    groups = [g for g, obj in enumerate(scene.objects) for _ in range(obj.count)]  # placed[i] is of groups[i]
    g = rng.randrange(len(scene.objects))
    mine = [i for i, k in enumerate(groups) if k == g]
    if kind == "keep":
        return list(placed), []
    if kind == "color":
        objs = scene.objects
        if len(objs) == 2:  # the binding error: the two colours swapped
            swapped = {objs[0].color: objs[1].color, objs[1].color: objs[0].color}
            return [replace(p, color=swapped[p.color]) for p in placed], [color_flaw(objs[0], objs[1].color),
                                                                           color_flaw(objs[1], objs[0].color)]
        wrong = rng.choice([c for c in sorted(PALETTE) if c != objs[0].color])
        n = rng.randint(1, objs[0].count)
        recoloured = set(rng.sample(mine, n))
        return ([replace(p, color=wrong) if i in recoloured else p for i, p in enumerate(placed)],
                [color_flaw(objs[0], wrong, n)])
    if kind == "shape":
        wanted = scene.objects[g]
        drawn = replace(wanted, shape=rng.choice([s for s in SHAPES if s not in {o.shape for o in scene.objects}]))
        return ([replace(p, shape=drawn.shape) if i in mine else p for i, p in enumerate(placed)],
                [shape_flaw(scene, wanted, drawn)])
    if kind == "missing":
        return [p for i, p in enumerate(placed) if i not in mine], [missing_flaw(scene, g)]
    if kind == "relation":
        a, b = placed
        return ([replace(a, center=b.center, region=b.region), replace(b, center=a.center, region=a.region)],
                [relation_flaw(scene, RELATIONS[scene.relation])])
    free = free_cells(placed, size)
    if kind == "count":
        c = scene.objects[g]
        n = rng.choice([k for k in range(1, min(MAX_COUNT + 1, c.count + len(free)) + 1) if k != c.count])
        if n < c.count:
            kept = set(rng.sample(mine, n))
            return [p for i, p in enumerate(placed) if i not in mine or i in kept], [count_flaw(c, n)]
        added = [placed_in_cell(c.shape, c.color, cell, size, rng) for cell in rng.sample(free, n - c.count)]
        return [*placed, *added], [count_flaw(c, n)]
    if kind == "extra":
        used = {(o.shape, o.color) for o in scene.objects}
        shape, color = rng.choice([(s, c) for s in SHAPES for c in sorted(PALETTE) if (s, c) not in used])
        extra = placed_in_cell(shape, color, rng.choice(free), size, rng)
        return [*placed, extra], [extra_flaw(scene, ObjectSpec(shape, color))]
    raise ValueError(f"kind: unknown {kind!r}, expected one of {EDIT_KINDS}")


def free_cells(placed: list[Placed], size: int) -> list[int]:
    """Grid cells no shape of ``placed`` stands in (by its centre)."""
    cell = (1 - 2 * MARGIN) * size / GRID
    taken = {min(int((p.center[1] - MARGIN * size) // cell), GRID - 1) * GRID
             + min(int((p.center[0] - MARGIN * size) // cell), GRID - 1) for p in placed}
    return [k for k in range(GRID * GRID) if k not in taken]


def placed_in_cell(shape: str, color: str, index: int, size: int, rng: random.Random) -> Placed:
    """A shape in grid cell ``index``, sized and jittered as :func:`layout` draws them."""
    margin = MARGIN * size
    cell = (size - 2 * margin) / GRID
    frac, jx, jy = rng.uniform(0.5, 0.7), rng.uniform(-1, 1), rng.uniform(-1, 1)
    slack = (1 - frac) * cell / 4
    row, col = divmod(index, GRID)
    center = (margin + (col + 0.5) * cell + jx * slack, margin + (row + 0.5) * cell + jy * slack)
    return Placed(shape, color, center, frac * cell, REGIONS[row][col])


def mode_parts(mode: str, ex: Example) -> list[Part]:
    """The assistant parts of one row of ``mode`` (see MISSION.md, "six learning modes")."""
    think, reflect = TextPart(ex.think, False), TextPart(ex.reflection, True)
    flawed = ImagePart(ex.flawed, loss=False, vae=True, vit=True)
    if mode == "initial_thinking_understanding_learning":
        return [ImagePart(ex.correct, loss=False, vae=False, vit=True), TextPart(ex.think, True)]
    if mode == "initial_thinking_generation_learning":
        return [TextPart(ex.think, True)]
    if mode == "initial_full_learning":
        return [TextPart(ex.think, True), ImagePart(ex.correct, loss=True, vae=False, vit=False)]
    if mode == "improving_thinking_understanding_learning":
        return [think, flawed, ImagePart(ex.correct, loss=False, vae=False, vit=True), reflect]
    if mode == "improving_thinking_generation_learning":
        return [think, flawed, reflect]
    if mode == "improving_full_learning":
        return [think, flawed, reflect, ImagePart(ex.correct, loss=True, vae=False, vit=False)]
    if mode == EDITING_MODE:  # the source as BAGEL feeds an image (VAE, then ViT tokens), the edit, the target
        return [flawed, TextPart(ex.reflection, False), ImagePart(ex.correct, loss=True, vae=False, vit=False)]
    raise ValueError(f"mode: unknown {mode!r}, expected one of {MODES}")


def synth_conversation(mode: str, seed: int, row: int, image_size: int = 64, system_prompt: str = SYSTEM_PROMPT) -> str:
    """Row ``row`` of ``mode``: seeded by (seed, mode, row) alone, so rows do not depend on file splits."""
    rng = random.Random(f"{seed}:{mode}:{row}")
    example = make_edit_example(rng, image_size) if mode == EDITING_MODE else make_example(rng, image_size)
    return example_conversation(mode, example, system_prompt)


def example_conversation(mode: str, ex: Example, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The row of ``mode`` for ``ex``: the system prompt and the prompt as user turns, then the mode's parts."""
    parts = [("user", TextPart(system_prompt, False)), ("user", TextPart(ex.prompt, False))]
    return conversation_json(parts + [("assistant", p) for p in mode_parts(mode, ex)])


def write_synthetic(out_uri: str, rows: int, seed: int = 0, image_size: int = 64, rows_per_file: int = 256,
                    modes=MODES, progress: bool = True, system_prompt: str = SYSTEM_PROMPT) -> dict[str, int]:
    """Write ``rows`` rows per mode to ``<out_uri>/<mode>/part-NNNNN.parquet``; returns rows per mode.
    ``system_prompt`` is the first user turn of every row: the one the trained model will be asked with."""
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    _validate(rows, image_size, rows_per_file, modes)
    written = {}
    with tqdm(total=rows * len(modes), unit="row", desc="synth", file=sys.stderr, disable=not progress) as bar:
        for mode in modes:
            for part, start in enumerate(range(0, rows, rows_per_file)):
                batch = []
                for row in range(start, min(rows, start + rows_per_file)):
                    batch.append(synth_conversation(mode, seed, row, image_size, system_prompt))
                    bar.update()
                write_rows(join(out_uri, mode, f"part-{part:05d}.parquet"), batch)
            written[mode] = rows
    return written


def write_rows(uri: str, conversations: list[str]) -> None:
    """One parquet file of IRGL rows: the ``conversation`` column, in row groups of 64 (the unit plans draw)."""
    table = pa.table({"conversation": pa.array(conversations, type=pa.string())})
    with open_file(uri, "wb") as f:
        pq.write_table(table, f, row_group_size=64)


def _validate(rows, image_size, rows_per_file, modes) -> None:
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 and >= 32, got {image_size!r}")
    if not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be an integer >= 1, got {rows_per_file!r}")
    if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(MODES):
        raise ValueError(f"modes must be distinct names from {MODES}, got {list(modes)!r}")
