"""TIIF-Bench, GenAI-Bench and OneIG-EN: the shipped prompt sets hold the official counts, and each
scorer's arithmetic follows its official evaluation code, worked by hand on small cases here."""

from __future__ import annotations

import math

import pytest
from PIL import Image
from test_judge import MODEL, Reply, ok

from irg.eval.benchmarks import EvalPrompt, load_benchmark
from irg.eval.genai_bench import JudgeVQAScore, summarize_genai_bench, yes_probability
from irg.eval.judge import JudgeClient, JudgeError
from irg.eval.oneig import OneIGScorer, alignment_score, clean_text, is_yes, summarize_oneig, text_metrics, text_score
from irg.eval.report import Report, paper_table
from irg.eval.scorer_settings import ScorerSettings
from irg.eval.scoring import Verdict
from irg.eval.tiif import TiifParseError, TiifScorer, parse_answers, summarize_tiif

# --- the prompt sets ------------------------------------------------------------------------------


def test_tiif_testmini_and_full_hold_the_official_rows_and_questions():
    mini = load_benchmark("tiif")
    assert mini == load_benchmark("tiif", split="testmini")
    rows = {(p.metadata["type"], p.metadata["line"]): p for p in mini}
    assert len(rows) == 277 and len(mini) == 2 * 277  # each row: a short and a long prompt
    assert sum(len(p.metadata["questions"]) for p in rows.values()) == 1446
    assert len({p.metadata["type"] for p in mini}) == 39
    short, long = mini[0], mini[1]
    assert (short.category, long.category) == ("short/shape+color", "long/shape+color")
    assert short.metadata["questions"] == long.metadata["questions"] and short.prompt != long.prompt
    assert set(a for p in mini for a in p.metadata["answers"]) == {"yes", "no"}  # "Yes" read as "yes"

    full = load_benchmark("tiif", split="full")
    assert len(full) == 2 * 2538
    assert sum(len(p.metadata["questions"]) for p in full) == 2 * 12160


def test_genai_bench_1600_and_527_hold_their_prompts_and_skill_tags():
    prompts = load_benchmark("genai_bench")
    assert len(prompts) == 1600 and prompts[0].id == "00000"
    tags = [p.metadata["skills"] for p in prompts]
    assert sum("basic" in t for t in tags) == 722 and sum("advanced" in t for t in tags) == 871
    assert [p.id for p in prompts if p.category == "untagged"] == ["00719", "00721", "00730", "00733", "00739",
                                                                   "00743", "00951"]
    assert set(prompts[1231].metadata["skills"]) >= {"advanced", "attribute"} and prompts[1231].category == "advanced"

    small = load_benchmark("genai_bench", split="527")
    assert len(small) == 527 and small[0].id == "00001"  # 1-based keys, as its skill indices
    assert sum(p.category == "basic" for p in small) == 214 and sum(p.category == "advanced" for p in small) == 313
    assert sum("counting" in p.metadata["skills"] for p in small) == 97


def test_oneig_en_holds_1120_prompts_in_five_categories_with_their_records():
    prompts = load_benchmark("oneig")
    counts = {c: sum(p.category == c for p in prompts) for c in {p.category for p in prompts}}
    assert counts == {"Anime_Stylization": 245, "Portrait": 244, "General_Object": 206, "Text_Rendering": 200,
                      "Knowledge_Reasoning": 225}
    questions = {c: sum(len(p.metadata.get("questions", {})) for p in prompts if p.category == c) for c in counts}
    assert (questions["Anime_Stylization"], questions["Portrait"], questions["General_Object"]) == (4176, 4059, 2996)
    assert sum("style" in p.metadata for p in prompts) == 114
    assert all(p.metadata["text"] for p in prompts if p.category == "Text_Rendering")
    assert all(p.metadata["answer"] for p in prompts if p.category == "Knowledge_Reasoning")
    assert len({p.id for p in prompts}) == 1120  # ids restart in each category: the key is category + id


def test_a_limit_takes_rows_from_each_category_in_turn():
    assert [p.id for p in load_benchmark("tiif", 5)] == ["shape-color-000-short", "shape-color-000-long",
                                                          "color-texture-000-short", "color-texture-000-long",
                                                          "texture-color-000-short"]  # a row's variants together
    oneig = load_benchmark("oneig", 7)
    assert [p.category for p in oneig] == ["Anime_Stylization", "Portrait", "General_Object", "Text_Rendering",
                                           "Knowledge_Reasoning", "Anime_Stylization", "Portrait"]
    assert [p.id for p in oneig[5:]] == ["Anime_Stylization-001", "Portrait-001"]
    assert {p.category for p in load_benchmark("tiif", 2 * 39)} == {p.category for p in load_benchmark("tiif")
                                                                    if p.category.startswith(("short", "long"))}
    assert len(load_benchmark("oneig", 5000)) == 1120


def test_a_split_the_benchmark_does_not_have_is_refused():
    with pytest.raises(ValueError, match="split: genai_bench has no split 'full'; it takes one of 1600, 527"):
        load_benchmark("genai_bench", split="full")
    with pytest.raises(ValueError, match="split: oneig has no split 'full'; it takes none"):
        load_benchmark("oneig", split="full")


# --- TIIF -----------------------------------------------------------------------------------------


def tiif_row(kind: str, correct: int, questions: int, variant: str = "short") -> tuple[EvalPrompt, Verdict]:
    prompt = EvalPrompt(f"{kind}-{variant}", "p", f"{variant}/{kind}", {"type": kind, "variant": variant})
    return prompt, Verdict(correct / questions, {"correct": correct, "questions": questions})


def test_tiif_pools_questions_per_type_and_averages_nine_groups():
    rows = [tiif_row("shape+color", 3, 4), tiif_row("shape+color", 1, 1),  # pooled 4/5, not (0.75 + 1) / 2
            tiif_row("color+texture", 1, 2), tiif_row("numeracy", 1, 1),
            tiif_row("action+color", 0, 2), tiif_row("color+2d", 1, 1), tiif_row("text", 2, 2),
            tiif_row("real_world", 1, 4), tiif_row("real_world", 4, 4, variant="long")]
    scores = summarize_tiif(rows)
    assert scores["short/type/shape+color"] == pytest.approx(0.8)
    assert scores["short/basic/attribute"] == pytest.approx(0.65)  # (0.8 + 0.5) / 2
    assert scores["short/basic/reasoning"] == 1.0 and scores["short/basic/relation"] is None  # no such images
    assert scores["short/advanced/attribute+relation"] == pytest.approx(0.5)
    # The averages are over types, not groups: basic (0.8 + 0.5 + 1) / 3, advanced (0 + 1 + 1) / 3.
    assert scores["short/basic"] == pytest.approx(2.3 / 3)
    assert scores["short/advanced"] == pytest.approx(2 / 3)
    # Overall: the mean of the groups that have images, (0.65 + 1 + 0.5 + 1 + 0.25) / 5.
    assert scores["short/overall"] == pytest.approx(0.68)
    assert scores["long/overall"] == 1.0 and scores["long/real_world"] == 1.0 and scores["long/basic"] is None


@pytest.mark.parametrize("reply, answers", [
    ("yes\nNo, the cat is on top\nYES.", ["yes", "no", "yes"]),
    ("1. Yes - red\n2) no\n3. **yes**", ["yes", "no", "yes"]),
    ("Here are my answers:\n\n- yes\n- no\n- no\nThat is all.", ["yes", "no", "no"]),
])
def test_tiif_reads_one_answer_per_line(reply, answers):
    assert parse_answers(reply, 3) == answers


def test_a_tiif_template_must_hold_the_questions(fake):
    with pytest.raises(ValueError, match=r"template: lacks \{questions\}"):
        TiifScorer(JudgeClient(fake.base_url, MODEL), template="Judge this image.")


def test_report_lines_that_collide_as_metric_names_are_refused():
    clash = Report("r", "geneval", {"round1": {"a+b": 1.0, "a-b": 0.0}}, {})
    with pytest.raises(ValueError, match="differ only in characters MLflow metric names cannot hold"):
        clash.metrics()


def test_tiif_refuses_a_reply_with_the_wrong_number_of_answers():
    with pytest.raises(TiifParseError, match="2 yes/no lines for 3 questions"):
        parse_answers("yes\nnoted: no\nyesterday\nno", 3)  # "noted", "yesterday" are not answers


def tiif_prompt() -> EvalPrompt:
    return load_benchmark("tiif")[0]


def test_tiif_asks_every_question_in_one_request_and_compares_case_insensitively(fake):
    prompt = tiif_prompt()
    expected = prompt.metadata["answers"]
    fake.answer = lambda body: ok("\n".join(["No"] + ["Yes"] * (len(expected) - 1)))
    [verdict] = TiifScorer(JudgeClient(fake.base_url, MODEL)).score([(prompt, Image.new("RGB", (32, 32)))])
    assert len(fake.requests) == 1
    text = fake.requests[0]["body"]["messages"][1]["content"][0]["text"]
    assert all(q.strip() in text for q in prompt.metadata["questions"])
    agree = sum(a == e for a, e in zip(["no"] + ["yes"] * (len(expected) - 1), expected))
    assert verdict.details["correct"] == agree and verdict.score == agree / len(expected)


def test_tiif_asks_again_then_counts_an_unreadable_verdict_as_missed(fake):
    prompt = tiif_prompt()
    count = len(prompt.metadata["answers"])
    fake.say(ok("yes"), ok("\n".join(["yes"] * count)))
    [verdict] = TiifScorer(JudgeClient(fake.base_url, MODEL)).score([(prompt, Image.new("RGB", (32, 32)))])
    assert len(fake.requests) == 2 and verdict.details["questions"] == count and "parse_error" not in verdict.details
    assert f"exactly {count} lines" in fake.requests[1]["body"]["messages"][-1]["content"]

    fake.answer = lambda body: ok("I cannot tell.")
    [verdict] = TiifScorer(JudgeClient(fake.base_url, MODEL, cache_dir=None), parse_retries=1).score(
        [(prompt, Image.new("RGB", (32, 32), "red"))])
    assert verdict.score == 0.0 and verdict.details["correct"] == 0 and "0 yes/no lines" in verdict.details[
        "parse_error"]


# --- OneIG ----------------------------------------------------------------------------------------


def test_oneig_dependency_rule_reads_parents_raw_answers_one_level():
    raw = {"1": False, "2": True, "3": True, "4": True, "5": True, "6": False, "7": True}
    dependency = {"1": [0], "2": [1],  # parent said no: no
                  "3": [2],  # parent 2 was forced to no, but its raw answer is yes: stays yes (not transitive)
                  "4": [6],  # a later question as parent, answered no: no
                  "5": [3, 1],  # one of two parents said no: no
                  "6": [0], "7": [0]}
    assert alignment_score(raw, dependency) == pytest.approx(2 / 7)  # questions 3 and 7


@pytest.mark.parametrize("reply, yes", [("Yes", True), ("yes.", True), (" Yes\n", True), ("No", False),
                                        ("Yes, there is a cat", False), ("", False)])
def test_oneig_yes_is_the_answer_yes_alone(reply, yes):
    assert is_yes(reply) is yes


def test_oneig_text_cleans_both_sides_and_pools_word_accuracy():
    assert clean_text("COVID-19,  “2025”!\n Café") == "COVID19 2025 Café"  # kept case, accents; single spaces
    images = [text_metrics("ab ce", ["ab cd"]),  # ED 1, 1 of 2 words
              text_metrics("Go", ["Go!"]),  # ED 0 after cleaning: CR 1, 1 of 1 word
              text_metrics("No text recognized.", ["x y", "z"])]  # nothing read: ED 5, 0 of 3 words
    assert images == [{"ed": 1, "cr": 0, "matched": 1, "words": 2}, {"ed": 0, "cr": 1, "matched": 1, "words": 1},
                      {"ed": 5, "cr": 0, "matched": 0, "words": 3}]
    scores = text_score(images)
    # ED = 2, CR = 1/3, WAC = 2/6 pooled (the mean of the ratios would be 1/2).
    assert (scores["text/ed"], scores["text/cr"], scores["text/wac"]) == pytest.approx((2, 1 / 3, 1 / 3))
    assert scores["text"] == pytest.approx(1 - 2 * (2 / 3) * (2 / 3) / 100)
    assert text_metrics("hello", ["Hello"])["ed"] == 1  # no case folding
    assert text_metrics("a b a", ["a a b c"])["matched"] == 3  # words as multisets, order ignored
    assert text_score([{"ed": 150, "cr": 0, "matched": 0, "words": 4}])["text"] == 0.0  # ED capped at 100


def oneig_rows(category: str, **details) -> tuple[EvalPrompt, Verdict]:
    return EvalPrompt(category, "p", category, {}), Verdict(None, details)


def test_oneig_reports_alignment_pooled_and_per_category_and_leaves_the_rest_absent():
    rows = [oneig_rows("General_Object", alignment=1.0), oneig_rows("Portrait", alignment=0.5),
            oneig_rows("Portrait", alignment=0.0), oneig_rows("Knowledge_Reasoning"),
            oneig_rows("Text_Rendering", ed=0, cr=1, matched=2, words=2)]
    scores = summarize_oneig(rows)
    assert scores["alignment"] == pytest.approx(0.5)  # over images pooled, not (1 + 0.25) / 2
    assert scores["alignment/General_Object"] == 1.0 and scores["alignment/Portrait"] == 0.25
    assert "alignment/Anime_Stylization" not in scores and scores["text"] == 1.0
    assert scores["reasoning"] is scores["style"] is scores["diversity"] is scores["overall"] is None


def test_oneig_scorer_asks_each_question_and_reads_the_text(fake):
    prompts = load_benchmark("oneig")
    portrait = next(p for p in prompts if p.category == "Portrait")
    poster = next(p for p in prompts if p.category == "Text_Rendering")
    reasoning = next(p for p in prompts if p.category == "Knowledge_Reasoning")
    first = portrait.metadata["questions"]["1"]

    def answer(body):
        text = body["messages"][0]["content"][1]["text"]
        if text.startswith("Recognize the text"):
            return ok(" ".join(poster.metadata["text"]))
        return ok("No" if text.startswith(first) else "Yes")

    fake.answer = answer
    image = Image.new("RGB", (32, 32))
    aligned, text, absent = OneIGScorer(JudgeClient(fake.base_url, MODEL)).score(
        [(portrait, image), (poster, image), (reasoning, image)])
    questions = portrait.metadata["questions"]
    assert len(fake.requests) == len(questions) + 1  # one per question, one OCR, none for reasoning
    assert f"{first}. Please answer 'Yes' or 'No' only." in [r["body"]["messages"][0]["content"][1]["text"]
                                                            for r in fake.requests]
    children = {q for q, parents in portrait.metadata["dependency"].items() if 1 in parents}
    assert aligned.score == pytest.approx(1 - (1 + len(children)) / len(questions))
    assert text.details["cr"] == 1 and text.score == 1.0
    assert absent.score is None


# --- GenAI-Bench ----------------------------------------------------------------------------------


def genai_row(skills: list[str], *scores: float) -> list[tuple[EvalPrompt, Verdict]]:
    prompt = EvalPrompt(str(len(skills)) + "".join(skills), "p", "x", {"skills": skills})
    return [(prompt, Verdict(s, {})) for s in scores]


def test_genai_bench_averages_each_skill_over_its_prompts_and_overall_over_tagged_ones():
    rows = (genai_row(["basic", "attribute", "scene"], 0.9, 0.7)  # two images: the prompt scores 0.8
            + genai_row(["basic", "attribute"], 0.4)
            + genai_row(["advanced", "counting", "attribute"], 0.1)  # an advanced prompt with a basic skill
            + genai_row([], 1.0))  # untagged: in no skill and not in the overall
    scores = summarize_genai_bench(rows)
    assert scores["basic"] == pytest.approx(0.6)  # the tag's own mean, not its skills' mean
    assert scores["basic/attribute"] == pytest.approx(1.3 / 3) and scores["basic/scene"] == pytest.approx(0.8)
    assert scores["basic/spatial relation"] is None
    assert scores["advanced"] == scores["advanced/counting"] == pytest.approx(0.1)
    assert scores["overall"] == pytest.approx(1.3 / 3)


def test_genai_bench_yes_probability_from_the_first_tokens_top_logprobs():
    assert yes_probability([(" No", -0.1), ("Yes", -2.0)]) == pytest.approx(math.exp(-2.0))
    assert yes_probability([("no", -0.01), ("No", -5.0)]) == 0.0  # "Yes" not among them


def logprob_reply(*top: tuple[str, float]) -> Reply:
    content = [{"token": top[0][0], "logprob": top[0][1],
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]
    return Reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                                    "logprobs": {"content": content}, "finish_reason": "length"}]})


def test_genai_bench_judge_stand_in_asks_for_logprobs_and_is_labelled(fake):
    fake.answer = lambda body: logprob_reply(("Yes", math.log(0.75)), ("No", math.log(0.2)))
    scorer = JudgeVQAScore(JudgeClient(fake.base_url, MODEL))
    prompt = load_benchmark("genai_bench")[5]
    [verdict] = scorer.score([(prompt, Image.new("RGB", (32, 32)))])
    assert verdict.score == pytest.approx(0.75)
    body = fake.requests[0]["body"]
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 20, 1)
    assert body["messages"][0]["content"][0]["text"] == (f'Does this figure show "{prompt.prompt}"? '
                                                         "Please answer yes or no.")
    settings = ScorerSettings("genai_bench", judge_url=fake.base_url, judge_model=MODEL)
    assert settings.notes == [f"VQAScore from the judge's log-probabilities ({MODEL}), not from the benchmark's "
                              "scoring model (CLIP-FlanT5-XXL): not comparable with published GenAI-Bench numbers"]


def test_genai_bench_refuses_a_judge_without_logprobs_before_generating(fake):
    fake.answer = lambda body: ok("Yes")  # a chat reply without logprobs, as many servers give
    settings = ScorerSettings("genai_bench", judge_url=fake.base_url, judge_model=MODEL)
    with pytest.raises(ValueError, match="scorer genai_bench without --vqa-model needs a judge that returns "
                                         "log-probabilities: .*returned no top log-probabilities"):
        settings.check()
    assert len(fake.requests) == 1
    with pytest.raises(JudgeError, match="no top log-probabilities"):
        JudgeClient(fake.base_url, MODEL).top_logprobs([{"role": "user", "content": "hi"}], 5)


# --- the paper's table ----------------------------------------------------------------------------


def report(scorer: str, model: str, rounds: dict, notes: list[str] | None = None, **meta) -> Report:
    meta = {"model": f"models:/{model}@champion", "checkpoint": f"models:/{model}/3", "benchmark": scorer, **meta}
    return Report(f"{scorer}-{model}", scorer, rounds, {}, meta=meta, notes=notes or [])


def test_paper_table_lays_out_a_model_per_round_and_a_benchmark_per_column():
    reports = [report("geneval", "irg", {"round1": {"overall": 0.8}, "round2": {"overall": 0.85}}),
               report("tiif", "irg", {"round1": {"short/overall": 0.7, "long/overall": 0.71},
                                      "round2": {"short/overall": 0.76, "long/overall": 0.7377}}),
               report("genai_bench", "irg", {"round1": {"overall": 0.5}, "round2": {"overall": 0.6}}, ["stand-in"]),
               report("oneig", "irg", {"round1": {"overall": None}, "round2": {"overall": None}}),
               report("wise", "bagel", {"round1": {"overall": 0.52}, "round2": {"overall": 0.7}}),
               report("tiif", "bagel", {"round1": {"short/overall": 0.5, "long/overall": 0.5}}, split="full")]
    lines = paper_table(reports).splitlines()
    assert lines[0].split() == ["model", "GenEval", "WISE", "TIIF", "short/long", "GenAI-Bench", "OneIG-EN"]
    assert lines[2].split() == ["models:/irg/3", "·", "round", "1", "0.800", "-", "70.00/71.00", "0.500*", "-"]
    assert lines[3].split() == ["models:/irg/3", "·", "round", "2", "0.850", "-", "76.00/73.77", "0.600*", "-"]
    assert lines[4].split() == ["models:/bagel/3", "·", "round", "1", "-", "0.520", "50.00/50.00*", "-", "-"]
    assert lines[-2:] == ["* models:/irg/3, genai_bench: stand-in",
                          "* models:/bagel/3, tiif: the full prompt set, not testmini"]
    with pytest.raises(ValueError, match="both evaluate models:/irg/3 on geneval: give one"):
        paper_table(reports + [report("geneval", "irg", {"round1": {"overall": 0.1}})])
    # The same name, another version: a line of its own.
    promoted = report("geneval", "irg", {"round1": {"overall": 0.9}}, checkpoint="models:/irg/4")
    assert paper_table(reports + [promoted]).splitlines()[6].split()[:5] == ["models:/irg/4", "·", "round", "1",
                                                                             "0.900"]
    with pytest.raises(ValueError, match="scored by shapes, which is not a column"):
        paper_table([report("shapes", "irg", {"round1": {"overall": 0.1}})])


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """A random LLaVA with a character tokenizer ("Yes" is three tokens) and a chat template, saved to disk."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "<image>": 4}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    characters.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=characters, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512),
        image_token_index=vocab["<image>"], vision_feature_layer=-2)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=template, num_additional_image_tokens=1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vqa")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_vqascore_from_a_local_model_is_the_probability_of_every_answer_token(vqa_dir):
    import torch

    from irg.eval.genai_bench import HFVQAScore, vqa_question

    settings = ScorerSettings("genai_bench", vqa_model=str(vqa_dir), device="cpu")
    settings.check(load_benchmark("genai_bench", limit=2))
    assert not settings.uses_judge and settings.notes == [
        f"VQAScore from the local model {vqa_dir}, not from the benchmark's scoring model (CLIP-FlanT5-XXL): "
        "not comparable with published GenAI-Bench numbers"]
    scorer = settings.build()
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    [verdict] = scorer.score([(EvalPrompt("0", "a red square", "basic", {"skills": ["basic"]}), image)])

    # The same probability from the model's own loss on the answer's three tokens (Y, e, s).
    question = vqa_question(scorer.processor, "a red square")
    inputs = scorer.processor(images=image, text=question + "Yes", return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = inputs["input_ids"][0, -3:]
    with torch.inference_mode():
        loss = scorer.model(**inputs, labels=labels).loss
    assert verdict.score == pytest.approx(math.exp(-3 * float(loss)), rel=1e-4)

    # With a silent output layer every token is equally likely: P = (1 / vocabulary) ** 3.
    uniform = HFVQAScore(str(vqa_dir))
    torch.nn.init.zeros_(uniform.model.get_output_embeddings().weight)
    vocabulary = uniform.model.config.text_config.vocab_size
    assert uniform.probability("anything", image) == pytest.approx(vocabulary ** -3, rel=1e-5)


def test_a_vqa_folder_that_cannot_score_fails_the_check_before_generating(vqa_dir, tmp_path):
    import json
    import shutil

    untemplated = shutil.copytree(vqa_dir, tmp_path / "no-template")
    (untemplated / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="its processor has no chat template"):
        ScorerSettings("genai_bench", vqa_model=str(untemplated)).check()

    seq2seq = shutil.copytree(vqa_dir, tmp_path / "seq2seq")
    config = json.loads((seq2seq / "config.json").read_text())
    (seq2seq / "config.json").write_text(json.dumps({**config, "is_encoder_decoder": True}))
    with pytest.raises(ValueError, match="an encoder-decoder model; VQAScore here takes a decoder-only one"):
        ScorerSettings("genai_bench", vqa_model=str(seq2seq)).check()
