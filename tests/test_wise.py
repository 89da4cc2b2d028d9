"""WISE scoring without a judge: the WiScore formula, reading the judge's marks, the summary, the messages."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from irg.eval.benchmarks import EvalPrompt, load_benchmark
from irg.eval.scorer_settings import ScorerSettings
from irg.eval.scoring import summarize
from irg.eval.wise import WISE_TEMPLATE, WiseParseError, WiseScorer, parse_wise_scores, wiscore, wise_messages


def test_wiscore_weights_consistency_realism_aesthetics_70_20_10():
    assert wiscore(2, 1, 0) == 0.8  # (0.7*2 + 0.2*1 + 0.1*0) / 2 = 1.6 / 2
    assert wiscore(2, 2, 2) == 1.0
    assert wiscore(0, 0, 0) == 0.0
    assert wiscore(0, 0, 2) == 0.1  # (0.1*2) / 2
    assert wiscore(1, 2, 1) == pytest.approx(0.6)  # (0.7 + 0.4 + 0.1) / 2


@pytest.mark.parametrize("text", [
    "Consistency: 2\nRealism: 1\nAesthetic Quality: 0",
    "**Consistency**: 2\n**Realism**: 1\n**Aesthetic Quality**: 0",
    "**Consistency:** 2\n**Realism:** 1\n**Aesthetic Quality:** 0",
    "consistency: 2\nREALISM: 1\naesthetic quality: 0",
    "Consistency：2\nRealism：1\nAesthetic Quality：0",
    "Here is my assessment.\nConsistency: 2\nRealism: 1\nAesthetic Quality: 0\nThe lighting is flat.",
    "Consistency: 0\nRealism: 0\nAesthetic Quality: 0\nOn reflection:\n"
    "Consistency: 2\nRealism: 1\nAesthetic Quality: 0",
])
def test_parse_reads_marks_in_the_usual_variants(text):
    assert parse_wise_scores(text) == {"consistency": 2, "realism": 1, "aesthetic_quality": 0}


def test_parse_names_a_missing_mark():
    with pytest.raises(WiseParseError, match="no Realism mark"):
        parse_wise_scores("Consistency: 2\nAesthetic Quality: 1")


def test_parse_rejects_a_mark_out_of_range():
    with pytest.raises(WiseParseError, match="Consistency 3 not 0, 1 or 2"):
        parse_wise_scores("Consistency: 3\nRealism: 1\nAesthetic Quality: 1")


def test_parse_rejects_the_template_placeholders():
    with pytest.raises(WiseParseError, match="no Consistency, Realism, Aesthetic Quality mark"):
        parse_wise_scores("Consistency: N\nRealism: N\nAesthetic Quality: N")


def test_overall_is_the_mean_over_prompts_not_over_categories():
    rows = [("Biology", 1.0), ("Biology", 1.0), ("Biology", 0.4), ("Chemistry", 0.0)]
    summary = summarize(rows, overall=ScorerSettings("wise").overall)
    assert summary["Biology"] == pytest.approx(0.8)  # (1 + 1 + 0.4) / 3
    assert summary["Chemistry"] == 0.0
    # Prompts: 2.4 / 4 = 0.6; the mean of the category means would be (0.8 + 0) / 2 = 0.4.
    assert summary["overall"] == pytest.approx(0.6)


def test_messages_hold_the_prompt_the_explanation_and_a_png():
    prompt = load_benchmark("wise", limit=1)[0]
    messages = wise_messages(prompt, Image.new("RGB", (32, 32), (200, 10, 10)))
    assert [m["role"] for m in messages] == ["system", "user"]
    text, image = messages[1]["content"]
    assert 'PROMPT: "Traditional food of the Mid-Autumn Festival"' in text["text"]
    assert 'EXPLANATION: "This refers to mooncakes, the round pastries' in text["text"]
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_custom_template_is_used_and_checked():
    prompt = EvalPrompt("00001", "a cat", "Biology", {"Prompt": "a cat", "Explanation": "a domestic cat"})
    messages = wise_messages(prompt, Image.new("RGB", (8, 8)), "Judge {prompt} / {explanation} {{json}}")
    assert messages[1]["content"][0]["text"] == "Judge a cat / a domestic cat {json}"
    with pytest.raises(ValueError, match="unknown fields \\['hint'\\]"):
        WiseScorer(judge=None, template=WISE_TEMPLATE + "{hint}")
