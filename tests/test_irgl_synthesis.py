"""IRGL rows from a model's own round-1 images: the judges, the corrected targets, the rows and the job.

Hand-made "model" images are shapes-world renders of flawed scenes (``synth.flaw``), so what is wrong
with them is known; messier ones add stray shapes, jitter, blur and noise; the tiny fixture model's
images are noise, where everything is missing.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURE_DIR, REPO
from PIL import Image, ImageFilter
from test_judge import FakeJudge, ok

from irg.data.format import EDITING_MODE, MODES, ImagePart, TextPart, parse_conversation
from irg.data.irgl_synthesis import (
    RoundOneDrawer,
    clearly_related,
    correct,
    corrected_placements,
    ray_drawer,
    synthesis_prompts,
    synthesize,
    synthesize_from_model,
    write_model_rows,
)
from irg.data.synth import (
    CATEGORIES,
    COLOR_NAMED,
    PALETTE,
    RELATIONS,
    SHAPES,
    Flaw,
    ObjectSpec,
    Placed,
    Scene,
    draw,
    flaw,
    geneval_metadata,
    layout,
    measure,
    render,
    sample_scene,
    scene_from_metadata,
)
from irg.eval.benchmarks import EvalPrompt, shapes_prompts
from irg.eval.geneval import shapes_scorer
from irg.eval.judge import JudgeClient
from irg.eval.shapes_judge import ChatJudge, FlawsParseError, ShapesJudge, parse_flaws, reflection_names_flaw

HEADERS = ("### Detailed Explanation of Required Improvements:", "### Step-by-Step Modification Guidance:",
           "### Final Comprehensive Prompt for the Improved Image:")
SCORER = shapes_scorer()
JUDGE = ShapesJudge()


def passes(record: dict, image: Image.Image) -> bool:
    [verdict] = SCORER.score([(EvalPrompt("t", record["prompt"], record["tag"], record), image)])
    return verdict.score == 1.0


def flawed_case(i: int, category: str, size: int = 64):
    """A scene, its GenEval record, a flawed render of it and the flaws it was made with."""
    rng = random.Random(i)
    scene = sample_scene(rng, category)
    bad, flaws = flaw(scene, rng)
    return scene, geneval_metadata(scene), render(bad, size, random.Random(i)), flaws


def messy_image(rng: random.Random, scene: Scene, size: int) -> Image.Image:
    """A model-like image: the scene or a flawed version, stray shapes, jittered and resized, maybe blurred or noisy."""
    base = scene if rng.random() < 0.4 else flaw(scene, rng)[0]
    placed = layout(base, size, rng) + [
        Placed(rng.choice(SHAPES), rng.choice(sorted(PALETTE)), (rng.uniform(0, size), rng.uniform(0, size)),
               rng.uniform(0.08, 0.35) * size, "") for _ in range(rng.choice([0, 0, 1, 2]))]
    jitter = 0.04 * size
    placed = [Placed(p.shape, p.color, (p.center[0] + rng.gauss(0, jitter), p.center[1] + rng.gauss(0, jitter)),
                     p.size * rng.uniform(0.7, 1.6), p.region) for p in placed]
    image, r = draw(placed, size), rng.random()
    if r < 0.2:
        return image.filter(ImageFilter.GaussianBlur(size / 128))
    if r < 0.3:
        grain = np.random.default_rng(rng.getrandbits(32)).normal(0, 25, (size, size, 3))
        noisy = np.asarray(image).astype(int) + grain.astype(int)
        return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    return image


def noise(size: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def nearest_center(detections, shape, color, center):
    return min((d.center for d in detections if (d.shape, d.color) == (shape, color)),
               key=lambda c: abs(c[0] - center[0]) + abs(c[1] - center[1]))


# --- the scene of a record ------------------------------------------------------------------------


def test_scene_from_metadata_inverts_geneval_metadata():
    for i in range(120):
        scene = sample_scene(random.Random(i), CATEGORIES[i % len(CATEGORIES)])
        back = scene_from_metadata(geneval_metadata(scene))
        assert geneval_metadata(back) == geneval_metadata(scene)
        if scene.category in COLOR_NAMED:
            assert back == scene
        else:  # colours the prompt does not name get distinct placeholders
            assert [o.shape for o in back.objects] == [o.shape for o in scene.objects]
            assert len({o.color for o in back.objects}) == len(back.objects)


@pytest.mark.parametrize("change, message", [
    (lambda r: {**r, "prompt": "a photo of a dog"}, "not as the shapes world writes"),
    (lambda r: {**r, "include": [{"class": "bench", "count": 1}]}, "objects"),
    (lambda r: {**r, "include": r["include"] * 2}, "names a shape twice"),
    (lambda r: {"tag": r["tag"]}, "not a GenEval record"),
])
def test_scene_from_metadata_rejects_records_the_world_cannot_have_made(change, message):
    record = geneval_metadata(Scene("single_object", (ObjectSpec("circle", "red"),)))
    with pytest.raises(ValueError, match=message):
        scene_from_metadata(change(record))


# --- the shapes judge -----------------------------------------------------------------------------


@pytest.mark.parametrize("category", CATEGORIES)
def test_shapes_judge_finds_the_flaws_that_were_made(category):
    for i in range(25):
        scene, record, image, made = flawed_case(i, category)
        judgement = JUDGE.judge(image, record["prompt"], record)
        assert not passes(record, image) and not judgement.matches
        if category in COLOR_NAMED:
            assert judgement.flaws == made  # the very texts the world wrote
        else:  # the record does not name colours: a missing object gets a placeholder colour
            assert [(f.kind, f.requirement) for f in judgement.flaws] == [(f.kind, f.requirement) for f in made]
        correct_image = render(scene, 64, random.Random(i))
        assert JUDGE.judge(correct_image, record["prompt"], record).matches


@pytest.mark.parametrize("size", [32, 64, 256])
def test_shapes_judge_agrees_with_the_scorer_and_every_target_passes_it(size):
    """Messy images (stray shapes, jitter, blur, noise): no flaws exactly when the scorer passes."""
    verdicts = Counter()
    for i in range(150 if size < 256 else 40):
        rng = random.Random(1000 + i)
        scene = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        record, image = geneval_metadata(scene), messy_image(rng, scene, size)
        judgement = JUDGE.judge(image, record["prompt"], record)
        assert judgement.matches == passes(record, image)
        verdicts[judgement.matches] += 1
        example = synthesize(record, image, "", judgement, random.Random(i)).example
        assert passes(record, example.correct)
        if not judgement.matches:
            assert reflection_names_flaw(example.reflection, judgement.flaws)
    assert verdicts[True] and verdicts[False]


def test_a_noise_image_misses_everything_and_is_not_clean():
    record = geneval_metadata(Scene("position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")),
                                    "left of"))
    judgement = JUDGE.judge(noise(), record["prompt"], record)
    assert [f.kind for f in judgement.flaws] == ["missing", "missing", "style"]
    reflection = synthesize(record, noise(), "", judgement, random.Random(0)).example.reflection
    assert "fine and should be kept" not in reflection and "flat, crisp style of the previous" not in reflection
    assert "smeared or noisy" in reflection


def test_the_judge_checks_the_prompt_against_the_record():
    record = geneval_metadata(Scene("colors", (ObjectSpec("circle", "red"),)))
    with pytest.raises(ValueError, match="^prompt"):
        JUDGE.judge(noise(), "a photo of a blue circle", record)


# --- the corrected target -------------------------------------------------------------------------


@pytest.mark.parametrize("category", CATEGORIES)
def test_targets_keep_what_was_drawn_where_it_was_drawn(category):
    for i in range(25):
        scene, record, image, made = flawed_case(i, category)
        judgement = JUDGE.judge(image, record["prompt"], record)
        correction = correct(scene_from_metadata(record), image, judgement.detections)
        target = synthesize(record, image, "", judgement, random.Random(i)).example.correct
        assert passes(record, target)
        if corrected_placements(correction, 64, random.Random(i)) is None:  # a fresh layout instead
            assert made[0].kind == "missing" and scene.relation  # no room on the asked side of the drawn one
            continue
        found = measure(target)
        swapped = made[0].kind == "relation"
        drawn = {o.drawn: o for o in correction.objects if o.drawn is not None}
        assert len(drawn) == min(len(judgement.detections), len(correction.objects))  # only a surplus is dropped
        for d, o in drawn.items():
            if swapped:
                continue
            cx, cy = nearest_center(found, o.shape, o.color, d.center)  # recoloured and reshaped ones too
            assert abs(cx - d.center[0]) <= 1.5 and abs(cy - d.center[1]) <= 1.5, (o, d)
        if swapped:  # the two shapes trade places
            a, b = correction.objects
            assert nearest_center(found, a.shape, a.color, b.drawn.center) == pytest.approx(b.drawn.center, abs=1.5)
            assert nearest_center(found, b.shape, b.color, a.drawn.center) == pytest.approx(a.drawn.center, abs=1.5)


def test_extras_are_removed_and_a_wrong_count_mended():
    scene = Scene("counting", (ObjectSpec("circle", "red", 3),))
    record = geneval_metadata(scene)
    drawn = [Placed("circle", "red", (12, 12), 10, ""), Placed("circle", "blue", (52, 12), 10, ""),
             Placed("square", "green", (12, 52), 10, "")]
    image = draw(drawn, 64)
    judgement = JUDGE.judge(image, record["prompt"], record)
    assert [f.kind for f in judgement.flaws] == ["color", "count", "extra"]
    assert judgement.flaws[0].description == "one of the circles is blue instead of red"
    assert judgement.flaws[2].description == "there is also a green square that the prompt does not ask for"
    target = synthesize(record, image, "", judgement, random.Random(0)).example.correct
    found = measure(target)
    assert Counter((d.shape, d.color) for d in found) == {("circle", "red"): 3}
    assert {nearest_center(found, "circle", "red", c) for c in [(12.5, 12.5), (52.5, 12.5)]} == {(12.5, 12.5),
                                                                                             (52.5, 12.5)}


def test_a_relation_on_the_wrong_axis_is_mended_by_moving_the_first_object():
    scene = Scene("position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")
    record = geneval_metadata(scene)
    image = draw([Placed("circle", "red", (44, 12), 10, ""), Placed("square", "blue", (44, 44), 10, "")], 64)
    judgement = JUDGE.judge(image, record["prompt"], record)
    assert [(f.description, f.fix) for f in judgement.flaws] == [(
        "the red circle is above the blue square instead of to the left of it",
        "move the red circle so that it sits to the left of the blue square")]
    target = synthesize(record, image, "", judgement, random.Random(0)).example.correct
    assert passes(record, target)
    assert nearest_center(measure(target), "square", "blue", (44.5, 44.5)) == (44.5, 44.5)  # the square stays


def test_clearly_related_implies_the_geneval_position_rule():
    from irg.eval.detection import Detection
    from irg.eval.geneval import relative_position

    rng = random.Random(0)
    for _ in range(3000):
        a, b = ([x := rng.uniform(0, 60), y := rng.uniform(0, 60), x + rng.uniform(2, 30), y + rng.uniform(2, 30)]
                for _ in range(2))
        for relation in RELATIONS:
            if clearly_related(a, b, relation):
                assert relation in relative_position(Detection("x", tuple(a)), Detection("y", tuple(b)))


# --- reflections ----------------------------------------------------------------------------------


COLOUR_FLAW = Flaw("color", "the circle is blue instead of red", "a red circle",
                   "recolour the circle solid red, keeping its size and place")


@pytest.mark.parametrize("reflection, named", [
    ("<think> The circle is blue, but it should be red.", True),
    ("<think> Recolour the circle solid red.", True),
    ("<think> Keep the red circle as it is. ### Final Comprehensive Prompt: a red circle", False),
    ("<think> The square is too small. ### Final Comprehensive Prompt for the Improved Image: a blue circle", False),
    ("<think> A red circle on the left.", False),  # mentions the object, not what is wrong with it
])
def test_reflection_names_flaw_needs_the_object_and_the_kind(reflection, named):
    assert reflection_names_flaw(reflection, [COLOUR_FLAW]) is named


def test_written_reflections_name_their_flaws_and_not_others():
    for i in range(30):
        scene, record, image, made = flawed_case(i, CATEGORIES[i % len(CATEGORIES)])
        judgement = JUDGE.judge(image, record["prompt"], record)
        example = synthesize(record, image, "", judgement, random.Random(i)).example
        assert reflection_names_flaw(example.reflection, judgement.flaws)
        kept = synthesize(record, example.correct, "", JUDGE.judge(example.correct, record["prompt"], record),
                          random.Random(i)).example.reflection
        assert not reflection_names_flaw(kept, judgement.flaws)


def test_a_matching_image_is_kept_with_a_reflection_that_says_so():
    scene = sample_scene(random.Random(3), "position")
    record, image = geneval_metadata(scene), render(scene, 64, random.Random(3))
    ex = synthesize(record, image, "<think> my plan </think>", JUDGE.judge(image, record["prompt"], record),
                    random.Random(0))
    assert ex.matched and ex.example.correct.tobytes() == image.tobytes()
    text = ex.example.reflection
    assert text.startswith("<think> The previous image already matches the prompt") and text.endswith(" </think>")
    assert [text.index(h) for h in HEADERS] == sorted(text.index(h) for h in HEADERS)


# --- rows -----------------------------------------------------------------------------------------


def test_rows_parse_with_the_models_image_as_the_flawed_one(tmp_path):
    scene, record, image, _ = flawed_case(5, "color_attr")
    judgement = JUDGE.judge(image, record["prompt"], record)
    ex = synthesize(record, image, "<think> my own plan </think>", judgement, random.Random(0))
    summary = write_model_rows(str(tmp_path), 3, [ex, ex], system_prompt="You draw shapes.", modes=MODES)
    assert summary.prompts == 2 and summary.matched == 0 and summary.rows == {m: 2 for m in MODES}
    assert summary.flaws == dict(Counter(f.kind for f in judgement.flaws * 2))
    for mode in MODES:
        [path] = (tmp_path / mode).iterdir()
        assert path.name == "model-part-00003.parquet"
        for raw in pq.read_table(path).column("conversation").to_pylist():
            system, prompt, *parts = parse_conversation(raw)
            assert system == TextPart("You draw shapes.", False) and prompt == TextPart(record["prompt"], False)
            texts = [p.text for p in parts if isinstance(p, TextPart)]
            images = [p.image.tobytes() for p in parts if isinstance(p, ImagePart)]
            if mode.startswith("improving"):
                assert texts[0] == "<think> my own plan </think>" and texts[-1] == ex.example.reflection
                assert images[0] == image.tobytes()  # the model's round-1 image is the flawed one
            elif mode == EDITING_MODE:  # the model's image is the source, the reflection the instruction
                assert texts == [ex.example.reflection]
                assert images == [image.tobytes(), ex.example.correct.tobytes()]
            else:
                assert texts == [ex.example.think] and "my own plan" not in ex.example.think
            if mode.endswith("full_learning"):
                assert images[-1] == ex.example.correct.tobytes()
    assert json.loads((tmp_path / "model-summary" / "part-00003.json").read_text())["prompts"] == 2


def test_synthesis_prompts_are_drawn_apart_from_the_shapes_benchmark():
    prompts = synthesis_prompts(60, seed=0)
    assert prompts == synthesis_prompts(60, seed=0) and prompts != synthesis_prompts(60, seed=1)
    assert [r["tag"] for r in prompts[:6]] == list(CATEGORIES)
    assert [r["prompt"] for r in prompts] != [p.prompt for p in shapes_prompts(60, seed=0)]


@pytest.fixture(scope="module")
def drawer():
    return RoundOneDrawer(str(FIXTURE_DIR), device="cpu", dtype="float32",
                          generation={"height": 64, "width": 64, "num_steps": 3, "max_think_tokens": 8})


def local_draw(drawer, calls: list):
    """Round 1 without Ray: the drawer called on batches of two, what it was asked recorded."""
    def draw_round_one(items):
        calls.append([item["index"] for item in items])
        for start in range(0, len(items), 2):
            batch = {key: [item[key] for item in items[start:start + 2]] for key in items[0]}
            out = drawer(batch)
            yield from ({key: out[key][k] for key in out} for k in range(len(out["index"])))
    return draw_round_one


def test_the_tiny_models_noise_becomes_rows_and_a_rerun_resumes(tmp_path, drawer):
    out, calls = str(tmp_path / "data"), []
    summary = synthesize_from_model(out, JUDGE, local_draw(drawer, calls), prompts=5, rows_per_file=2,
                                    progress=False)
    assert calls == [[0, 1, 2, 3, 4]]
    assert summary.prompts == 5 and summary.matched == 0 and summary.rows == {m: 5 for m in MODES}
    assert summary.flaws["missing"] >= 5  # noise shows no shapes at all
    records = synthesis_prompts(5)
    for mode in MODES:
        files = sorted(p.name for p in (tmp_path / "data" / mode).iterdir())
        assert files == [f"model-part-0000{k}.parquet" for k in range(3)]
        tables = [pq.read_table(tmp_path / "data" / mode / f) for f in files]
        rows = [parse_conversation(raw) for t in tables for raw in t.column("conversation").to_pylist()]
        assert [parts[1].text for parts in rows] == [r["prompt"] for r in records]
        for record, parts in zip(records, rows):
            assert all(passes(record, p.image) for p in parts if isinstance(p, ImagePart) and p.loss)
    assert json.loads((tmp_path / "data" / "model-summary.json").read_text())["prompts"] == 5

    (tmp_path / "data" / "model-summary" / "part-00001.json").unlink()  # as if stopped while writing part 1
    again = synthesize_from_model(out, JUDGE, local_draw(drawer, calls), prompts=5, rows_per_file=2, progress=False)
    assert calls[1:] == [[2, 3]] and again == summary


@pytest.mark.parametrize("kwargs, name", [
    ({"prompts": 0}, "prompts"), ({"rows_per_file": 0}, "rows_per_file"), ({"prefix": "a/b"}, "prefix"),
    ({"modes": ["no_such_mode"]}, "modes"),
])
def test_bad_synthesis_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        synthesize_from_model(str(tmp_path), JUDGE, lambda items: [], **{"prompts": 1, **kwargs})


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"), ({"workers": 0}, "workers"), ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"), ({"generation": {"height": 40}}, "height"),
])
def test_bad_drawer_arguments_fail_before_ray_starts(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        ray_drawer(str(FIXTURE_DIR), **kwargs)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


# --- the chat judge -------------------------------------------------------------------------------


def chat_judge(fake: FakeJudge, **kwargs) -> ChatJudge:
    return ChatJudge(JudgeClient(fake.base_url, "judge-vl", backoff_s=0.01), **kwargs)


def test_chat_judge_asks_with_the_image_and_reads_the_flaws(fake):
    answer = [{"kind": "count", "description": "there are only two red circles instead of three",
               "fix": "add one more red circle"}]
    fake.say(ok("```json\n" + json.dumps(answer) + "\n```"))
    record = geneval_metadata(Scene("counting", (ObjectSpec("circle", "red", 3),)))
    judgement = chat_judge(fake).judge(noise(), record["prompt"], record)
    assert judgement.flaws == [Flaw("count", answer[0]["description"], record["prompt"], answer[0]["fix"])]
    assert judgement.detections is None and not judgement.matches
    [request] = fake.requests
    text, image = request["body"]["messages"][1]["content"]
    assert f'PROMPT: "{record["prompt"]}"' in text["text"] and image["image_url"]["url"].startswith("data:image/png")
    ex = synthesize(record, noise(), "", judgement, random.Random(0))  # the detector places the target
    assert passes(record, ex.example.correct) and answer[0]["description"] in ex.example.reflection


def test_chat_judge_asks_again_then_fails_clearly_on_malformed_answers(fake):
    fake.say(ok("The image looks fine to me."), ok("[]"))
    assert chat_judge(fake).judge(noise(), "a photo of a circle", {}).matches
    assert "could not be read" in fake.requests[1]["body"]["messages"][-1]["content"]
    fake.say(ok("[{\"kind\": \"vibes\", \"description\": \"bad\", \"fix\": \"better\"}]"), ok("nope"))
    with pytest.raises(FlawsParseError, match="not JSON"):
        chat_judge(fake).judge(noise(), "a photo of a square", {})


@pytest.mark.parametrize("reply, message", [
    ("{\"kind\": \"count\"}", "not a JSON list"),
    ("[{\"kind\": \"count\", \"description\": \"x\"}]", "exactly the keys"),
    ("[{\"kind\": \"hue\", \"description\": \"x\", \"fix\": \"y\"}]", "kind 'hue' is not one of"),
    ("[{\"kind\": \"color\", \"description\": \" \", \"fix\": \"y\"}]", "non-empty strings"),
])
def test_parse_flaws_is_strict(reply, message):
    with pytest.raises(FlawsParseError, match=message):
        parse_flaws(reply, "a photo of a circle")


# --- the job --------------------------------------------------------------------------------------


def load_job():
    spec = importlib.util.spec_from_file_location("synthesize_job", REPO / "jobs" / "synthesize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--judge", "chat"], "--judge chat needs --judge-url and --judge-model"),
    (["--size", "40"], "height: must be a positive multiple of 16"),
    (["--prompts", "0"], "prompts: must be an integer >= 1"),
])
def test_the_job_names_bad_arguments(tmp_path, monkeypatch, capsys, argv, message):
    job = load_job()
    monkeypatch.setattr(sys, "argv", ["synthesize.py", "--model", str(FIXTURE_DIR), "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as exit_info:
        job.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_job_defaults_to_the_irg_system_prompt_and_the_models_generation_settings():
    args = load_job().build_parser().parse_args(["--model", "m", "--out", "o"])
    assert args.system_prompt_file is None
    assert (args.size, args.steps, args.max_think_tokens) == (None, None, None)
    assert isinstance(load_job().make_judge(args), ShapesJudge)
