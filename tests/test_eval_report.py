"""The evaluation's pieces without Ray: sample layout and resume markers, the settings claim, scorer
checks, and the report (numbers worked out by hand)."""

import json

import pytest
from conftest import FIXTURE_DIR

from irg.eval import EvalPrompt
from irg.eval.generate import GenerationSettings, ImageGenerator, finished_samples, read_record, sample_seed
from irg.eval.report import Report, build_report, compare_table, format_table
from irg.eval.run import EvalConfig, _claim_output
from irg.eval.scorer_settings import ScorerSettings

PROMPTS = [EvalPrompt("00000", "a photo of a circle", "single_object", {}),
           EvalPrompt("00001", "a photo of two squares", "counting", {}),
           EvalPrompt("00002", "a photo of three squares", "counting", {})]


def rows(scores):
    """{(prompt id, round): score} -> scorer rows for sample 0."""
    return [{"prompt_id": p, "sample": 0, "round": r, "score": s, "details": {}} for (p, r), s in scores.items()]


def test_report_per_round_categories_overall_and_delta():
    scored = rows({("00000", 1): 0.0, ("00001", 1): 1.0, ("00002", 1): 0.0,
                   ("00000", 2): 1.0, ("00001", 2): 1.0, ("00002", 2): 1.0})
    scored[0]["details"] = {"parse_error": "no marks"}
    report = build_report("r", ScorerSettings("shapes"), PROMPTS, scored, rounds=2)
    # round 1: single_object 0, counting 1/2 -> overall (0 + 0.5) / 2 = 0.25; round 2: all 1.
    assert report.rounds["round1"] == {"single_object": 0.0, "counting": 0.5, "overall": 0.25}
    assert report.rounds["round2"] == {"single_object": 1.0, "counting": 1.0, "overall": 1.0}
    assert report.counts == {"single_object": 1, "counting": 2} and report.failures == 1
    metrics = report.metrics()
    assert metrics["delta/overall"] == 0.75 and metrics["delta/counting"] == 0.5 and metrics["round1/counting"] == 0.5
    # WISE-style overall: the mean over prompts, round 1 = 1/3.
    wise = build_report("r", ScorerSettings("wise"), PROMPTS, scored, 2)
    assert wise.rounds["round1"]["overall"] == pytest.approx(1 / 3)

    table = format_table(report).splitlines()
    assert table[-2].split() == ["overall", "0.250", "1.000", "+0.750"]
    assert table[-1] == "1 images had no readable verdict and scored 0"
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report

    other = Report("s", "shapes", {"round1": {"counting": 0.0, "overall": 0.0},
                                   "round2": {"counting": 0.25, "overall": 0.25}}, {"counting": 4})
    lines = compare_table(report, other).splitlines()
    assert lines[1].split()[1:] == ["A", "round1", "B", "round1", "A", "round2", "B", "round2", "B-A"]
    by_category = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert by_category["counting"] == ["0.500", "0.000", "1.000", "0.250", "-0.750"]
    assert by_category["single_object"] == ["0.000", "-", "1.000", "-"]  # B has no such category


def test_a_generator_writes_rounds_then_the_record_and_resume_sees_only_finished_samples(tmp_path):
    settings = GenerationSettings(height=32, width=32, steps=3, rounds=2, max_think_tokens=4)
    generator = ImageGenerator(str(FIXTURE_DIR), str(tmp_path), settings, device="cpu")
    seed = sample_seed(0, "00000", 0)
    assert seed == sample_seed(0, "00000", 0) != sample_seed(0, "00000", 1) != sample_seed(1, "00000", 0)
    out = generator({"prompt_id": ["00000"], "sample": [0], "prompt": ["a photo of a circle"], "seed": [seed]})
    assert out["prompt_id"] == ["00000"] and out["sample"] == [0]
    record = read_record(str(tmp_path), "00000", 0)
    assert record["seed"] == seed and len(record["texts"]) == 2 and record["settings"]["steps"] == 3
    assert {p.name for p in (tmp_path / "samples" / "00000" / "0").iterdir()} == {"round1.png", "round2.png",
                                                                                   "record.json"}
    # A sample cut off after its images but before its record is not finished: it is generated again.
    (tmp_path / "samples" / "00001" / "0").mkdir(parents=True)
    (tmp_path / "samples" / "00001" / "0" / "round1.png").write_bytes(b"partial")
    assert finished_samples(str(tmp_path)) == {("00000", 0)}


def test_an_output_folder_refuses_other_settings(tmp_path):
    cfg = EvalConfig("m", "shapes", name="one", output=str(tmp_path), generation=GenerationSettings(steps=10))
    _claim_output(cfg, PROMPTS, "models:/m/1")
    _claim_output(cfg, PROMPTS, "models:/m/1")  # the same evaluation again: fine (a resume)
    other = EvalConfig("m", "shapes", name="one", output=str(tmp_path), generation=GenerationSettings(steps=20))
    with pytest.raises(ValueError, match="generation.steps 10 there, 20 now"):
        _claim_output(other, PROMPTS, "models:/m/1")
    with pytest.raises(ValueError, match="name"):
        EvalConfig("m", name="has space")


def test_scorer_checks_happen_before_any_generation(tmp_path):
    with pytest.raises(ValueError, match="--detector"):
        ScorerSettings("geneval").check()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ScorerSettings("geneval", detector=str(tmp_path), color_classifier=str(tmp_path)).check()
    with pytest.raises(ValueError, match="--judge-url"):
        ScorerSettings("wise").check()
    with pytest.raises(ValueError, match="unknown 'clip'"):
        ScorerSettings("clip").check()
    ScorerSettings("shapes").check()
    assert ScorerSettings("wise").overall == "prompts" and ScorerSettings("geneval").overall == "categories"
