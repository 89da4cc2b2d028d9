"""TIIF-Bench, GenAI-Bench and OneIG-EN evaluations end to end: the tiny model draws every round on a
local Ray cluster, a scripted OpenAI-compatible judge on 127.0.0.1 scores them, each evaluation is one
MLflow run; run again, it generates nothing and asks the judge nothing (all cached) and continues
the same run; `irg eval show` lays the three out like the paper's table."""

from __future__ import annotations

import json
import math

import pytest
import ray
from conftest import FIXTURE_DIR
from mlflow import MlflowClient
from test_judge import MODEL, ok
from test_paper_benchmarks import logprob_reply

from irg import tracking
from irg.cli import main as irg_main
from irg.eval.benchmarks import load_benchmark
from irg.eval.generate import GenerationSettings
from irg.eval.oneig import clean_text
from irg.eval.run import EvalConfig, evaluate
from irg.eval.scorer_settings import ScorerSettings

pytestmark = pytest.mark.integration  # a local Ray cluster and a judge server

SETTINGS = GenerationSettings(height=64, width=64, steps=4, rounds=2, max_think_tokens=8)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def scripted(body: dict):
    """TIIF: "no" to the first question, "yes" to the rest; OneIG: "Yes", no text read; GenAI-Bench:
    P(Yes) = 0.6."""
    if body.get("logprobs"):
        return logprob_reply(("Yes", math.log(0.6)), ("No", math.log(0.4)))
    user = body["messages"][-1]["content"]
    texts = [part["text"] for part in user if part["type"] == "text"]
    if body["messages"][0]["role"] == "system":  # TIIF
        questions = texts[0].split("Questions:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        return ok("\n".join(["no, it is not"] + ["yes"] * (len(questions) - 1)))
    return ok("No text recognized." if texts[0].startswith("Recognize the text") else "Yes")


def test_three_benchmarks_evaluate_resume_from_the_cache_and_make_the_paper_table(fake, local_ray, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow keeps the runs' artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    tracking.configure()
    fake.answer = scripted

    def config(benchmark: str, limit: int) -> EvalConfig:
        judge = ScorerSettings(benchmark, judge_url=fake.base_url, judge_model=MODEL, device="cpu")
        return EvalConfig(str(FIXTURE_DIR), benchmark, name=benchmark, output=str(tmp_path / benchmark), limit=limit,
                          generation=SETTINGS, scorer=judge, batch_size=2, device="cpu")

    tiif = evaluate(config("tiif", 4))  # row 0 of shape+color and of color+texture, each short and long
    asked = len(fake.requests)
    probe = 1  # genai_bench's check that the judge gives log-probabilities
    genai = evaluate(config("genai_bench", 3))
    oneig = evaluate(config("oneig", 5))  # one prompt of each category

    # TIIF: the judge said no to each row's first question and yes to the rest.
    rows = [json.loads(line) for line in (tmp_path / "tiif" / "scores.jsonl").read_text().splitlines()]
    assert asked == len(rows) == 4 * 2  # one request per image, each round of each prompt
    prompts = {p.id: p for p in load_benchmark("tiif", 4)}
    accuracy = {}
    for prompt in prompts.values():
        answers = prompt.metadata["answers"]
        right = (answers[0] == "no") + sum(a == "yes" for a in answers[1:])
        accuracy[prompt.category] = right / len(answers)
    for variant in ("short", "long"):
        for kind in ("shape+color", "color+texture"):
            assert tiif.rounds["round2"][f"{variant}/type/{kind}"] == pytest.approx(accuracy[f"{variant}/{kind}"])
        group = (accuracy[f"{variant}/shape+color"] + accuracy[f"{variant}/color+texture"]) / 2
        for r in ("round1", "round2"):
            assert tiif.rounds[r][f"{variant}/basic/attribute"] == pytest.approx(group)
            assert tiif.rounds[r][f"{variant}/overall"] == pytest.approx(group)  # the one group with images
    report = json.loads((tmp_path / "tiif" / "report.json").read_text())
    assert report["rounds"] == tiif.rounds
    assert report["counts"] == {f"{v}/{k}": 1 for v in ("short", "long") for k in ("shape+color", "color+texture")}
    expected = tiif.rounds["round1"]["short/overall"]

    assert genai.rounds["round1"]["overall"] == pytest.approx(0.6)
    assert len(genai.notes) == 1 and "not comparable" in genai.notes[0]
    # OneIG: every question answered yes; no text read; reasoning not scored.
    second = oneig.rounds["round2"]
    assert second["alignment"] == 1.0 and second["alignment/Portrait"] == 1.0
    poster = next(p for p in load_benchmark("oneig", 5) if p.category == "Text_Rendering")
    missing = len(clean_text(" ".join(poster.metadata["text"])))  # nothing read: ED is the text's length
    assert second["text/ed"] == missing and second["text/cr"] == 0 and second["text/wac"] == 0
    assert second["reasoning"] is None and second["overall"] is None  # absent, not 0
    oneig_rows = [json.loads(line) for line in (tmp_path / "oneig" / "scores.jsonl").read_text().splitlines()]
    assert [r["score"] for r in oneig_rows if r["prompt_id"].startswith("Knowledge")] == [None, None]

    client = MlflowClient()
    experiment = client.get_experiment_by_name("irg-eval").experiment_id
    runs = {r.data.tags["irg.run_key"]: r for r in client.search_runs([experiment])}
    assert set(runs) == {"tiif", "genai_bench", "oneig"}
    assert runs["tiif"].data.metrics["round1/short/overall"] == pytest.approx(expected)
    assert runs["tiif"].data.metrics["round1/short/type/shape-color"] == tiif.rounds["round1"]["short/type/shape+color"]
    assert "round1/reasoning" not in runs["oneig"].data.metrics  # absent values are not logged as metrics
    judged = len(fake.requests)
    cached = len(list((tmp_path / "tiif" / "judge-cache").rglob("*.json")))
    assert cached == 8

    # Again: nothing generated, every verdict from the cache, the same MLflow run, the same report.
    again = evaluate(config("tiif", 4))
    assert again.meta["generated"] == 0 and again.meta["skipped"] == 4
    assert len(fake.requests) == judged and again.rounds == tiif.rounds
    assert again.meta["run_id"] == tiif.meta["run_id"]
    assert len(client.search_runs([experiment])) == 3
    assert probe + 2 * 3 == len([r for r in fake.requests if r["body"].get("logprobs")])

    capsys.readouterr()
    assert irg_main(["eval", "show", "tiif", "genai_bench", "oneig"]) == 0
    table = capsys.readouterr().out.splitlines()
    percent = f"{100 * expected:.2f}"
    assert table[0].split() == ["model", "GenEval", "WISE", "TIIF", "short/long", "GenAI-Bench", "OneIG-EN"]
    assert table[2].split()[-5:] == ["-", "-", f"{percent}/{percent}", "0.600*", "-"]
    model = f"{FIXTURE_DIR} ({tiif.meta['checkpoint'].removeprefix('sha256:')[:8]})"  # a folder: its digest
    assert table[2].startswith(f"{model} · round 1")
    assert f"* {model}, genai_bench: VQAScore from the judge's log-probabilities ({MODEL})" in "\n".join(table)
