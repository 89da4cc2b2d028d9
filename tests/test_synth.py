"""The synthetic shapes world: IRGL rows for all six modes, determinism, and images that show what they say."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from irg.data.format import MODES, ImagePart, TextPart, parse_conversation
from irg.data.synth import (
    CATEGORIES,
    EDIT_KINDS,
    NUMBERS,
    RELATIONS,
    ObjectSpec,
    Scene,
    draw,
    edit_kinds,
    edit_source,
    flaw,
    geneval_metadata,
    layout,
    make_edit_example,
    make_example,
    measure,
    reflection_text,
    render,
    sample_scene,
    scene_prompt,
    think_text,
    write_synthetic,
)
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.storage import open_file

HEADERS = ("### Detailed Explanation of Required Improvements:", "### Step-by-Step Modification Guidance:",
           "### Final Comprehensive Prompt for the Improved Image:")
# Per mode, the assistant parts as ("text", loss) or ("image", loss, vae, vit); "think"/"reflect" say which text.
STRUCTURE = {
    "initial_thinking_understanding_learning": [("image", False, False, True), ("think", True)],
    "initial_thinking_generation_learning": [("think", True)],
    "initial_full_learning": [("think", True), ("image", True, False, False)],
    "improving_thinking_understanding_learning": [("think", False), ("image", False, True, True),
                                                  ("image", False, False, True), ("reflect", True)],
    "improving_thinking_generation_learning": [("think", False), ("image", False, True, True), ("reflect", True)],
    "improving_full_learning": [("think", False), ("image", False, True, True), ("reflect", True),
                                ("image", True, False, False)],
    "image_editing_learning": [("image", False, True, True), ("reflect", False), ("image", True, False, False)],
}


def read_rows(root: Path, mode: str) -> list[str]:
    files = sorted((root / mode).glob("part-*.parquet"))
    return [v for f in files for v in pq.read_table(f).column("conversation").to_pylist()]


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def shown(detections) -> Counter:
    return Counter((d.shape, d.color) for d in detections)


def wanted(scene: Scene) -> Counter:
    return Counter({(o.shape, o.color): o.count for o in scene.objects})


def measured_relation(scene: Scene, detections) -> str:
    """Where the detection of objects[0] is relative to that of objects[1], by the dominant axis."""
    (ax, ay), (bx, by) = [next(d.center for d in detections if (d.shape, d.color) == (o.shape, o.color))
                          for o in scene.objects]
    if abs(ax - bx) > abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, write_synthetic(str(root), rows=12, seed=3, rows_per_file=5, progress=False)


def test_every_row_of_every_mode_parses_with_its_mode_structure(written):
    root, counts = written
    assert counts == {mode: 12 for mode in MODES}
    for mode in MODES:
        assert [p.name for p in sorted((root / mode).iterdir())] == [f"part-0000{i}.parquet" for i in range(3)]
        rows = read_rows(root, mode)
        assert len(rows) == 12
        for raw in rows:
            turns = json.loads(raw)
            assert [t["role"] for t in turns] == ["user", "user", "assistant"]
            system, prompt, *parts = parse_conversation(raw)
            assert system == TextPart(SYSTEM_PROMPT, False)
            assert prompt.text.startswith("a photo of ") and not prompt.loss
            assert len(parts) == len(STRUCTURE[mode])
            for part, (kind, *flags) in zip(parts, STRUCTURE[mode]):
                if kind == "image":
                    assert isinstance(part, ImagePart) and [part.loss, part.vae, part.vit] == flags
                    assert part.image.size == (64, 64)
                    continue
                assert isinstance(part, TextPart) and [part.loss] == flags
                assert part.text.startswith("<think> ") and part.text.endswith(" </think>")
                assert all((h in part.text) == (kind == "reflect") for h in HEADERS)


def test_same_seed_same_bytes_and_rows_independent_of_file_split(tmp_path, written):
    root, _ = written
    again = tmp_path / "again"
    write_synthetic(str(again), rows=12, seed=3, rows_per_file=5, progress=False)
    assert folder_bytes(again) == folder_bytes(root)
    one_file = tmp_path / "one_file"
    write_synthetic(str(one_file), rows=12, seed=3, rows_per_file=256, progress=False)
    other_seed = tmp_path / "other_seed"
    write_synthetic(str(other_seed), rows=12, seed=4, rows_per_file=5, progress=False)
    for mode in MODES:
        assert read_rows(one_file, mode) == read_rows(root, mode)
        assert all(a != b for a, b in zip(read_rows(other_seed, mode), read_rows(root, mode)))


def test_writes_through_object_storage_uris():
    written = write_synthetic("memory://synth-test/out", rows=3, modes=["improving_full_learning"], progress=False)
    assert written == {"improving_full_learning": 3}
    with open_file("memory://synth-test/out/improving_full_learning/part-00000.parquet", "rb") as f:
        rows = pq.read_table(io.BytesIO(f.read())).column("conversation").to_pylist()
    assert len(rows) == 3 and all(parse_conversation(r) for r in rows)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_rendered_scenes_show_the_right_shapes_colours_counts_and_relation(size):
    for i in range(120 if size < 256 else 30):
        scene = sample_scene(random.Random(i), CATEGORIES[i % len(CATEGORIES)])
        detections = measure(render(scene, size, random.Random(i)))
        assert shown(detections) == wanted(scene), scene
        if scene.relation:
            assert measured_relation(scene, detections) == scene.relation, scene


@pytest.mark.parametrize("category", CATEGORIES)
def test_flawed_image_is_wrong_in_the_way_its_flaws_say(category):
    for i in range(40):
        rng = random.Random(i)
        scene = sample_scene(rng, category)
        bad, flaws = flaw(scene, rng)
        assert flaws and bad.category == category
        detections = measure(render(bad, 64, random.Random(i)))
        assert shown(detections) == wanted(bad)
        for f in flaws:
            assert str(f) == f.description
            if f.kind == "relation":
                assert bad.objects == scene.objects and bad.relation == RELATIONS[scene.relation]
                assert measured_relation(bad, detections) == RELATIONS[scene.relation]
                continue
            assert shown(detections) != wanted(scene)  # every other flaw changes what is drawn
            if f.kind == "missing":
                (gone,) = set(scene.objects) - set(bad.objects)
                assert len(bad.objects) == 1 and f.description == f"the {gone.color} {gone.shape} is missing"
            elif f.kind == "count":
                (was,), (now,) = scene.objects, bad.objects
                assert (now.shape, now.color) == (was.shape, was.color) and now.count != was.count
                assert f"{NUMBERS[now.count]} {now.color}" in f.description
                assert f.description.endswith(f"instead of {NUMBERS[was.count]}")
            else:  # shape or colour: the same groups, one attribute changed in each flawed group
                changed = [(was, now) for was, now in zip(scene.objects, bad.objects) if was != now]
                attr = "shape" if f.kind == "shape" else "color"
                assert all(getattr(was, attr) != getattr(now, attr) for was, now in changed)
                assert any(f"{getattr(now, attr)} instead of" in f.description for _, now in changed)


def test_think_and_reflection_texts_plan_and_name_the_flaws():
    for i in range(30):
        rng = random.Random(i)
        scene = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        _, flaws = flaw(scene, rng)
        placed = layout(scene, 64, random.Random(i))
        think = think_text(scene, placed)
        assert all(p.region in think for p in placed)
        assert all(o.phrase() in think for o in scene.objects)  # colours and counts are planned
        text = reflection_text(scene, placed, flaws)
        assert text.startswith("<think> The previous image") and text.endswith(" </think>")
        positions = [text.index(h) for h in HEADERS]
        assert positions == sorted(positions) and all(f"\n\n{h}\n" in text for h in HEADERS)
        analysis, explanation, steps, final = re.split("|".join(map(re.escape, HEADERS)), text)
        assert f'"{scene_prompt(scene)}"' in analysis
        for f in flaws:
            assert f.description in analysis and f.description in explanation
            assert f.fix[0].upper() + f.fix[1:] in steps
        assert all(p.region in final for p in placed)


def test_example_images_are_the_scene_and_its_flawed_version():
    for i in range(12):
        scene = sample_scene(random.Random(i))  # make_example draws its scene first from the same rng
        ex = make_example(random.Random(i), 64)
        assert ex.prompt == scene_prompt(scene)
        assert shown(measure(ex.correct)) == wanted(scene)
        assert ex.flawed.tobytes() != ex.correct.tobytes()


def test_prompts_and_geneval_metadata():
    three = Scene("counting", (ObjectSpec("circle", "red", 3),))
    assert scene_prompt(three) == "a photo of three red circles"
    assert geneval_metadata(three) == {"tag": "counting", "include": [{"class": "circle", "count": 3, "color": "red"}],
                                       "exclude": [{"class": "circle", "count": 4}],
                                       "prompt": "a photo of three red circles"}
    left = Scene("position", (ObjectSpec("square", "blue"), ObjectSpec("triangle", "yellow")), "left of")
    assert scene_prompt(left) == "a photo of a blue square to the left of a yellow triangle"
    assert geneval_metadata(left)["include"] == [  # GenEval states include[1] relative to include[0]
        {"class": "triangle", "count": 1, "color": "yellow"},
        {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}]
    two = Scene("two_object", (ObjectSpec("circle", "orange"), ObjectSpec("square", "green")))
    assert scene_prompt(two) == "a photo of a circle and a square"
    assert scene_prompt(Scene("colors", (ObjectSpec("triangle", "orange"),))) == "a photo of an orange triangle"


@pytest.mark.parametrize("kwargs, name", [
    ({"rows": 0}, "rows"), ({"rows": 2.5}, "rows"), ({"image_size": 40}, "image_size"),
    ({"image_size": 16}, "image_size"), ({"rows_per_file": 0}, "rows_per_file"),
    ({"modes": ["initial_full_learning", "no_such_mode"]}, "modes"), ({"modes": []}, "modes"),
    ({"modes": ["initial_full_learning", "initial_full_learning"]}, "modes"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        write_synthetic(str(tmp_path / "out"), **{"rows": 1, **kwargs})
    assert not (tmp_path / "out").exists()


def test_bad_scenes_are_named():
    with pytest.raises(ValueError, match="^category"):
        sample_scene(random.Random(0), "no_such_category")
    with pytest.raises(ValueError, match="^relation"):
        Scene("position", (ObjectSpec("circle", "red"),), "left of")
    with pytest.raises(ValueError, match="^objects"):
        Scene("colors", (ObjectSpec("hexagon", "red"),))


HAND_MADE = [Scene("two_object", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))),
             Scene("counting", (ObjectSpec("triangle", "green", 3),)),
             Scene("position", (ObjectSpec("circle", "yellow"), ObjectSpec("triangle", "purple")), "left of"),
             Scene("colors", (ObjectSpec("square", "orange"),))]


def _box_mask(shapes, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for p in shapes:
        (cx, cy), half = p.center, p.size / 2 + 1
        mask[max(0, round(cy - half)):round(cy + half) + 1, max(0, round(cx - half)):round(cx + half) + 1] = True
    return mask


def test_an_edit_changes_the_target_exactly_where_its_instruction_says():
    covered = set()
    for scene in HAND_MADE:
        for kind in edit_kinds(scene):
            rng = random.Random(f"{scene}:{kind}")
            placed = layout(scene, 64, rng)
            source, flaws = edit_source(scene, placed, kind, 64, rng)
            changed = [p for p in source if p not in placed] + [p for p in placed if p not in source]
            diff = np.any(np.asarray(draw(source, 64)) != np.asarray(draw(placed, 64)), axis=-1)
            assert (kind == "keep") == (not flaws) == (not changed) == (not diff.any()), kind
            assert not (diff & ~_box_mask(changed, 64)).any(), f"{kind}: pixels outside the edited shapes changed"
            assert all(diff[_box_mask([p], 64)].any() for p in changed)
            assert {f.kind for f in flaws} <= {kind}
            named = " ".join(f"{f.description} {f.fix}" for f in flaws)
            assert all(p.color in named and p.shape in named for p in changed), (kind, named)
            assert shown(measure(draw(placed, 64))) == wanted(scene)  # the target is the prompt's scene
            covered.add(kind)
    assert covered == set(EDIT_KINDS)


def test_edit_examples_cover_every_flaw_kind_and_keep_with_reflections_that_name_them():
    kinds = Counter()
    for i in range(300):
        ex = make_edit_example(random.Random(i), 64)
        kept = "already matches" in ex.reflection
        kinds["keep" if kept else "edit"] += 1
        assert kept == (ex.flawed.tobytes() == ex.correct.tobytes())
        assert ex.reflection.startswith("<think> ") and all(h in ex.reflection for h in HEADERS)
    assert 0.05 < kinds["keep"] / 300 < 0.3
    unrelated = next(i for i in range(100) if sample_scene(random.Random(i)).relation is None)
    with pytest.raises(ValueError, match="cannot have a 'relation' flaw"):
        make_edit_example(random.Random(unrelated), 64, "relation")
