"""The round-2-over-round-1 measurement: its statistics on made-up scores, and one run on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from irg.eval.benchmarks import shapes_prompts
from irg.eval.irg_gain import (
    NEUTRAL_THINK,
    Bootstrap,
    gain_grid,
    gain_metrics,
    gain_report,
    log_gain_run,
    measure_irg_gain,
)

CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
TINY = {"height": 64, "width": 64, "num_steps": 2, "max_think_tokens": 4}


def scores(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_interval_covers_the_mean_and_overall_is_the_mean_of_category_means():
    categories = [CATEGORIES[i % 6] for i in range(300)]
    values = scores(0.4, 300, seed=1)
    boot = Bootstrap(categories, resamples=500, seed=0)
    means = []
    for c in CATEGORIES:
        est = boot.ratio(values, np.ones(300), c)
        assert est["low"] <= est["value"] <= est["high"] and est["n"] == 50
        means.append(est["value"])
    overall = boot.mean_of_categories(values)
    assert overall["low"] < overall["value"] < overall["high"]
    assert overall["value"] == pytest.approx(np.mean(means), abs=1e-4)


def test_paired_difference_excludes_zero_for_a_real_gain_and_includes_it_for_none():
    categories = [CATEGORIES[i % 6] for i in range(300)]
    round1 = scores(0.3, 300, seed=2)
    fixes = (round1 == 0) & (scores(0.3, 300, seed=3) == 1)  # about a fifth of the prompts fixed, none broken
    gained = gain_report(categories, round1, np.maximum(round1, fixes), round1, [None] * 300)["overall"]
    assert gained["delta"]["low"] > 0
    assert gained["reflection_vs_control"]["low"] > 0
    assert gained["control_delta"]["value"] == 0
    reshuffled = np.roll(round1, 1)  # as often right, on other prompts: no gain, but many changes
    null = gain_report(categories, round1, reshuffled, round1, [None] * 300)["overall"]
    assert null["delta"]["low"] < 0 < null["delta"]["high"]


def test_fixed_broken_and_flaw_naming_rates_on_a_constructed_example():
    categories = ["counting"] * 5 + ["colors"] * 5
    round1 = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    round2 = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]  # one broken, two fixed
    control = [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # two broken, one fixed
    named = [None] * 4 + [True, False, True, False, False, False]
    report = gain_report(categories, round1, round2, control, named, resamples=200)
    overall = report["overall"]
    assert overall["reflection"]["fixed"] == {**overall["reflection"]["fixed"], "value": 0.2, "n": 10}
    assert (overall["reflection"]["fixed_of_wrong"]["value"], overall["reflection"]["fixed_of_wrong"]["n"]) == \
        (round(2 / 6, 4), 6)
    assert (overall["reflection"]["broken_of_right"]["value"], overall["reflection"]["broken_of_right"]["n"]) == \
        (0.25, 4)
    assert overall["control"]["broken_of_right"]["value"] == 0.5
    assert overall["control"]["fixed_of_wrong"]["value"] == round(1 / 6, 4)
    assert (overall["names_flaw"]["value"], overall["names_flaw"]["n"]) == (round(2 / 6, 4), 6)
    colors = report["categories"]["colors"]  # prompts 5..9: none right in round 1
    assert colors["reflection"]["broken_of_right"] == {"value": None, "low": None, "high": None, "n": 0}
    assert colors["round1"]["value"] == 0 and colors["round2"]["value"] == 0.2
    assert overall["round2"]["value"] == pytest.approx((0.8 + 0.2) / 2)  # the mean of the category means
    metrics = gain_metrics(report)
    assert metrics["reflection.fixed/overall"] == 0.2 and "reflection.broken_of_right/colors" not in metrics


def test_neutral_think_has_the_reflection_structure_and_names_no_flaw():
    from irg.data.synth import Flaw
    from irg.eval.shapes_judge import reflection_names_flaw

    for heading in ("### Detailed Explanation of Required Improvements:", "### Step-by-Step Modification Guidance:",
                    "### Final Comprehensive Prompt for the Improved Image:"):
        assert heading in NEUTRAL_THINK
    flaws = [Flaw("count", "there are two red circles instead of three", "three red circles", "add a red circle"),
             Flaw("style", "parts of the image are smeared or noisy", "clean shapes", "draw clean shapes")]
    assert not reflection_names_flaw(NEUTRAL_THINK, flaws)


class RecordingPipe:
    """The pipeline, with every call's arguments and outputs kept."""

    def __init__(self, pipe):
        self.pipe, self.config, self.calls = pipe, pipe.config, []

    def __call__(self, prompts, **kwargs):
        outputs = self.pipe(prompts, **kwargs)
        self.calls.append((prompts, kwargs, outputs))
        return outputs


@pytest.fixture(scope="module")
def measured(pipe):
    recording = RecordingPipe(pipe)
    result = measure_irg_gain(recording, shapes_prompts(6, seed=0), batch_size=6, seed=0, resamples=200, **TINY)
    return recording.calls, result


def test_the_control_continues_the_same_round_1_with_the_same_seeds_and_noise(measured):
    (calls, result), n = measured, 6
    (_, first_args, first), (prompts, args, second) = calls
    assert first_args["rounds"] == 1 and args["rounds"] == 2 and prompts[:n] == prompts[n:]
    assert args["seed"][:n] == args["seed"][n:] and args["seed"][:n] != first_args["seed"]
    noise = args["init_noise"][1]
    assert args["init_noise"][0] is None and noise.shape == (2 * n, 16, 64) and noise[:n].equal(noise[n:])
    for i, row in enumerate(result.rows):
        reflected, control = second[i], second[n + i]
        assert reflected.images[0].tobytes() == control.images[0].tobytes() == first[i].images[0].tobytes()
        assert reflected.texts[0] == control.texts[0] == first[i].texts[0] == row.think
        assert control.texts[1] == NEUTRAL_THINK and reflected.texts[1] == row.reflection != NEUTRAL_THINK
        assert row.images == (first[i].images[0], reflected.images[1], control.images[1])


def test_the_report_of_a_run_on_the_tiny_model(measured):
    _, result = measured
    report = result.report
    assert report["benchmark"] == "shapes_irg" and report["prompts"] == 6 and report["image_size"] == [64, 64]
    assert report["settings"] == {**TINY, "think_temperature": None, "round_settings": None}
    assert list(report["categories"]) == CATEGORIES
    for block in [*report["categories"].values(), report["overall"]]:
        for key in ("round1", "round2", "control_round2", "delta", "control_delta", "reflection_vs_control"):
            assert set(block[key]) == {"value", "low", "high", "n"}
        assert set(block["reflection"]) == set(block["control"]) == {"fixed", "fixed_of_wrong", "broken_of_right"}
    assert report["overall"]["round1"]["value"] == 0  # the tiny model's images are noise
    assert report["overall"]["names_flaw"]["n"] == 6  # every round-1 image failed and was judged
    assert all(row.flaws and row.names_flaw is not None for row in result.rows)
    assert {"id", "prompt", "think", "reflection", "scores", "flaws", "names_flaw"} <= set(result.rows[0].to_dict())


def test_the_grid_shows_prompts_thinks_and_images(measured, tmp_path):
    _, result = measured
    grid = gain_grid(result.rows, count=4)
    grid.save(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert grid.height > 4 * 192 and grid.width > 2 * 300 + 3 * 192
    cell = np.asarray(grid.crop((2 * 8 + 300, 24 + 8, 2 * 8 + 300 + 192, 24 + 8 + 192)))
    assert cell.std() > 0  # the round-1 image, enlarged, is there


def test_a_run_is_logged_to_mlflow(measured, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # MLflow keeps artifacts under the working directory when nothing else is set
    _, result = measured
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = log_gain_run(result, gain_grid(result.rows), "bagel_tiny", uri, params={"limit": 6})
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["irg.eval.benchmark"] == "shapes_irg"
    assert run.data.metrics["round2/overall"] == 0 and run.data.params["limit"] == "6"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"report.json", "prompts.json", "grid.png"} <= artifacts
