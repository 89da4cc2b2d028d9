"""GenEval's rules on hand-built detections, and the shapes scorer on the synthetic world's own images."""

import random

import pytest

from irg.data.synth import CATEGORIES, flaw, geneval_metadata, render, sample_scene
from irg.eval import EvalPrompt, load_benchmark, summarize
from irg.eval.detection import Detection
from irg.eval.geneval import GenEvalRules, box_iou, evaluate, relative_position, select_objects, shapes_scorer


def det(label, box, score=0.95, color=None):
    return Detection(label, box, score, None, color)


def colors_from_detections(label, found):
    return [d.color for d in found]


DEFAULT_RULES = GenEvalRules()


def check(record, detections, rules=DEFAULT_RULES):
    return evaluate(record, select_objects(detections, record["tag"], rules), colors_from_detections, rules)


def test_single_object_needs_a_detection_strictly_above_the_threshold():
    record = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert check(record, [det("bench", (0, 0, 10, 10), 0.31)])[0]
    assert not check(record, [det("bench", (0, 0, 10, 10), 0.30)])[0]  # "> 0.3", not ">="
    correct, reasons = check(record, [det("dog", (0, 0, 10, 10))])
    assert not correct and reasons == ["expected bench>=1, found 0"]


def test_two_object_needs_both_classes():
    record = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert check(record, [det("cat", (0, 0, 5, 5)), det("dog", (10, 10, 20, 20))])[0]
    correct, reasons = check(record, [det("cat", (0, 0, 5, 5)), det("cat", (10, 10, 20, 20))])
    assert not correct and reasons == ["expected dog>=1, found 0"]


def test_counting_uses_the_0_9_threshold_and_the_exclusion():
    record = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
              "exclude": [{"class": "clock", "count": 3}]}
    two = [det("clock", (0, 0, 5, 5), 0.95), det("clock", (10, 0, 15, 5), 0.92)]
    assert check(record, two)[0]
    # A third clock at 0.85 would count for any other tag (> 0.3), but counting needs > 0.9.
    assert check(record, two + [det("clock", (20, 0, 25, 5), 0.85)])[0]
    assert not check({**record, "tag": "two_object"}, two + [det("clock", (20, 0, 25, 5), 0.85)])[0]
    correct, reasons = check(record, two + [det("clock", (20, 0, 25, 5), 0.91)])
    assert not correct and reasons == ["expected clock<3, found 3"]
    correct, reasons = check(record, two[:1] + [det("clock", (10, 0, 15, 5), 0.5)])
    assert not correct and reasons == ["expected clock>=2, found 1"]


def test_colour_is_checked_on_the_best_count_detections_only():
    record = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert check(record, [det("car", (0, 0, 9, 9), 0.9, "red"), det("car", (20, 0, 29, 9), 0.8, "blue")])[0]
    # The best-scoring car is blue: a red car with a lower score does not rescue the prompt.
    correct, reasons = check(record, [det("car", (0, 0, 9, 9), 0.9, "blue"), det("car", (20, 0, 29, 9), 0.8, "red")])
    assert not correct and reasons[0].startswith("expected red car>=1")


def test_color_attr_binds_each_colour_to_its_object():
    record = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                               {"class": "apple", "count": 1, "color": "black"}]}
    right = [det("wine glass", (0, 0, 9, 9), color="purple"), det("apple", (20, 0, 29, 9), color="black")]
    swapped = [det("wine glass", (0, 0, 9, 9), color="black"), det("apple", (20, 0, 29, 9), color="purple")]
    assert check(record, right)[0]
    correct, reasons = check(record, swapped)
    assert not correct and len(reasons) == 2


def test_relative_position_by_hand():
    a, b = det("a", (0, 0, 10, 10)), det("b", (20, 0, 30, 10))
    # centres 5 and 25: offset -20, shrunk by 0.1 * (10 + 10) = 2 -> -18; dx = -18 / 20 = -0.9 -> left of.
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    # offset (10, 8), sizes 10: shrunk (8, 6); |offset| = sqrt(164) = 12.81; dx = 0.62 > 0.5, dy = 0.47 <= 0.5.
    c, d = det("c", (10, 8, 20, 18)), det("d", (0, 0, 10, 10))
    assert relative_position(c, d) == {"right of"}
    # offset (10, 10): shrunk (8, 8); dx = dy = 8 / 14.14 = 0.57 -> both right of and below.
    assert relative_position(det("e", (10, 10, 20, 20)), d) == {"right of", "below"}
    # offset (1, 1) is within 0.1 of the sizes: no relation at all.
    assert relative_position(det("f", (1, 1, 11, 11)), d) == set()
    # y grows downwards: a higher box is "above".
    assert relative_position(det("g", (0, 0, 10, 10)), det("h", (0, 30, 10, 40))) == {"above"}


def test_position_rule_and_its_target_group():
    record = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                             {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    bear = det("teddy bear", (0, 0, 10, 10))
    assert check(record, [bear, det("dog", (40, 0, 50, 10))])[0]
    correct, reasons = check(record, [bear, det("dog", (0, 40, 10, 50))])
    assert not correct and reasons == ["expected dog right of target, found below target"]
    correct, reasons = check(record, [det("dog", (40, 0, 50, 10))])
    assert not correct and reasons == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]


def test_max_objects_and_optional_nms():
    boxes = [det("bird", (i, 0, i + 10, 10), 0.9 - i / 1000) for i in range(20)]
    assert len(select_objects(boxes, "two_object")["bird"]) == 16  # at most 16 per class
    # Inclusive pixel areas: boxes 1 px apart overlap 10*11 of 2*121 - 110: IoU 110/132 = 0.83, kept by
    # default (max_overlap 1). At 0.5, boxes 3 px apart (88/154 = 0.57) go, 4 px apart (77/165 = 0.47) stay.
    assert box_iou((0, 0, 10, 10), (1, 0, 11, 10)) == pytest.approx(110 / 132)
    kept = select_objects(boxes, "two_object", GenEvalRules(max_overlap=0.5))["bird"]
    assert [d.box[0] for d in kept] == [0, 4, 8, 12]  # of the 16 best (0..15)


def test_overall_is_the_mean_of_the_tag_means():
    rows = [("counting", 1.0), ("counting", 0.0), ("counting", 0.0), ("colors", 1.0)]
    # counting 1/3, colors 1: overall (1/3 + 1) / 2 = 2/3, not the mean over images (2/4).
    assert summarize(rows) == pytest.approx({"counting": 1 / 3, "colors": 1.0, "overall": 2 / 3})


def test_the_packaged_prompt_sets():
    geneval = load_benchmark("geneval")
    assert len(geneval) == 553 and {p.category for p in geneval} == set(CATEGORIES)
    assert geneval[0] == EvalPrompt("00000", "a photo of a bench", "single_object",
                                    {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                                     "prompt": "a photo of a bench"})
    wise = load_benchmark("wise")
    assert len(wise) == 1000 and sum(p.category == "Cultural knowledge" for p in wise) == 400
    shapes = load_benchmark("shapes", limit=12, seed=3)
    assert [p.category for p in shapes] == list(CATEGORIES) * 2 and shapes == load_benchmark("shapes", 12, seed=3)
    with pytest.raises(ValueError, match="unknown 'genval'"):
        load_benchmark("genval")


def test_a_malformed_prompt_file_names_its_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                    '{"tag": "single_object", "prompt": "no include"}\n')
    with pytest.raises(ValueError, match="mine.jsonl line 2: not a GenEval record"):
        load_benchmark(str(path))


@pytest.mark.parametrize("category", CATEGORIES)
def test_shapes_scorer_passes_correct_images_and_fails_the_flawed_ones(category):
    """The synthetic world's correct images score 1 and its deliberately flawed first images 0."""
    scorer = shapes_scorer()
    correct, flawed = [], []
    for i in range(25):
        rng = random.Random(f"scorer:{category}:{i}")
        scene = sample_scene(rng, category)
        flawed_scene, _ = flaw(scene, rng)
        layout_seed = rng.getrandbits(64)
        prompt = EvalPrompt(str(i), "", category, geneval_metadata(scene))
        good, bad = scorer.score([(prompt, render(scene, 64, random.Random(layout_seed))),
                                  (prompt, render(flawed_scene, 64, random.Random(layout_seed)))])
        correct.append(good.score)
        flawed.append(bad.score)
    assert sum(correct) / len(correct) >= 0.96
    assert sum(flawed) / len(flawed) <= 0.04


def test_a_colourful_mess_is_not_read_as_shapes():
    """An untrained generator draws smooth colour noise; the shapes detector must find nothing in it."""
    import numpy as np
    from PIL import Image

    from irg.data.synth import measure

    rng = np.random.default_rng(0)
    for size in (64, 128):
        for _ in range(15):
            coarse = Image.fromarray(rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8))
            assert measure(coarse.resize((size, size), Image.BILINEAR)) == []
