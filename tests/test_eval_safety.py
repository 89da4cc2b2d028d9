"""An evaluation refuses what would give a wrong report, before it generates anything: images of
another checkpoint (a promoted alias, a retrained folder), a scorer that cannot work or cannot read
the benchmark's prompts, and names that would escape their folder or break an MLflow filter."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
from conftest import FIXTURE_DIR, REPO

from irg.eval import run
from irg.eval.benchmarks import load_benchmark
from irg.eval.generate import GenerationSettings
from irg.eval.run import EvalConfig, _claim_output, _slug, checkpoint_digest, default_name, evaluate
from irg.eval.scorer_settings import ScorerSettings
from irg.names import InvalidName, check_name


class Stop(Exception):
    """Raised in place of opening the MLflow run, i.e. just after the output was claimed."""


def stop(cfg):
    raise Stop


def evaluate_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint(folder, config: str, weights: bytes):
    folder.mkdir()
    (folder / "llm_config.json").write_text(config)
    (folder / "ema.safetensors").write_bytes(weights)
    return str(folder)


# --- item 6: a resume never reuses another checkpoint's images -------------------------------------


def test_a_claim_refuses_another_checkpoint_folder_and_resumes_the_same(tmp_path):
    a = checkpoint(tmp_path / "a", '{"layers": 2}', b"x" * 10)
    b = checkpoint(tmp_path / "b", '{"layers": 3}', b"x" * 10)
    prompts = load_benchmark("shapes", 4)
    cfg = EvalConfig(a, name="mine", output=str(tmp_path / "out"), generation=GenerationSettings(steps=4))
    _claim_output(cfg, prompts, checkpoint_digest(a))
    _claim_output(cfg, prompts, checkpoint_digest(a))  # the same checkpoint and prompts: a resume
    assert checkpoint_digest(a) != checkpoint_digest(b)
    with pytest.raises(ValueError, match=r"holds evaluation 'mine' .*checkpoint 'sha256:\w+' there, 'sha256:\w+' "
                                         r"now.*choose another --name or --output"):
        _claim_output(cfg, prompts, checkpoint_digest(b))
    with pytest.raises(ValueError, match="prompts.count 4 there, 6 now"):
        _claim_output(cfg, load_benchmark("shapes", 6), checkpoint_digest(a))
    # Retrained in place: new weights of another size are another checkpoint, read without reading them.
    before = checkpoint_digest(a)
    (tmp_path / "a" / "ema.safetensors").write_bytes(b"y" * 11)
    assert checkpoint_digest(a) != before


def test_a_promoted_version_gets_its_own_evaluation_and_never_the_old_images(tmp_path, monkeypatch):
    """The documented command (`--model models:/NAME@champion`, no --name) run before and after a
    promotion: each version gets its own default name and output; the old name refuses the new version."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("IRG_HOME", str(tmp_path / "home"))
    client = MlflowClient(uri)  # not the process-wide URI an earlier test set
    client.create_registered_model("tiny")
    for _ in range(2):
        client.create_model_version("tiny", source=str(FIXTURE_DIR))
    client.set_registered_model_alias("tiny", "champion", "1")
    # The checkpoint itself: the fixture (both versions hold it; what matters is which version is claimed).
    monkeypatch.setattr("irg.registry.checkpoint_uri", lambda model: str(FIXTURE_DIR))
    monkeypatch.setattr(run, "_Tracker", stop)

    def claimed(**kwargs) -> dict:
        with pytest.raises(Stop):
            evaluate(EvalConfig("models:/tiny@champion", "shapes", limit=2, **kwargs))
        name = kwargs.get("name") or default_name("shapes", run.pinned_model("models:/tiny@champion"))
        with open(tmp_path / "home" / "eval" / name / "eval.json") as f:
            return json.load(f)

    first = claimed()
    assert first["name"] == "shapes-tiny-v1" and first["checkpoint"] == "models:/tiny/1"
    client.set_registered_model_alias("tiny", "champion", "2")
    second = claimed()
    assert second["name"] == "shapes-tiny-v2" and second["checkpoint"] == "models:/tiny/2"
    assert claimed() == second  # the same version again resumes
    with pytest.raises(ValueError, match="checkpoint 'models:/tiny/1' there, 'models:/tiny/2' now"):
        evaluate(EvalConfig("models:/tiny@champion", "shapes", name="shapes-tiny-v1", limit=2))


# --- item 11: scorer mistakes fail before any generation -------------------------------------------


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if an evaluation gets past its checks (to the MLflow run or the generators)."""
    def reached(*args, **kwargs):
        pytest.fail("the evaluation got past its checks")

    monkeypatch.setattr(run, "_Tracker", reached)
    monkeypatch.setattr(run, "generate_samples", reached)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


WISE = ["--benchmark", "wise", "--judge-model", "vl"]
MISTAKES = {
    "url without scheme": (WISE + ["--judge-url", "vllm:8000/v1"],
                           "scorer wise: base_url: must start with http:// or https://, got 'vllm:8000/v1'"),
    "concurrency 0": (WISE + ["--judge-url", "http://vllm:8000/v1", "--judge-concurrency", "0"],
                      "max_concurrency: must be >= 1, got 0"),
    "rate 0": (WISE + ["--judge-url", "http://vllm:8000/v1", "--judge-rpm", "0"],
               "requests_per_minute: must be > 0, got 0.0"),
    "negative rate": (WISE + ["--judge-url", "http://vllm:8000/v1", "--judge-rpm", "-5"],
                      "requests_per_minute: must be > 0, got -5.0"),
    "wise on geneval prompts": (
        ["--benchmark", "geneval", "--scorer", "wise", "--judge-url", "http://vllm:8000/v1", "--judge-model", "vl"],
        r"scorer wise cannot score prompt 00000 \('a photo of a bench'\): it is not a WISE prompt \(no Explanation\)"),
    "shapes on geneval prompts": (["--benchmark", "geneval", "--scorer", "shapes"],
                                  "scorer shapes cannot score prompt 00000 .*does not know class 'bench'"),
    "shapes on wise prompts": (["--benchmark", "wise", "--scorer", "shapes"], "not a GenEval record"),
    "tiif without a judge": (["--benchmark", "tiif"], "scorer tiif needs --judge-url .* and --judge-model$"),
    "oneig without a judge": (["--benchmark", "oneig", "--judge-url", "http://vllm:8000/v1"],
                              "scorer oneig needs --judge-url .* and --judge-model$"),
    "genai_bench with no scorer": (["--benchmark", "genai_bench"],
                                   r"scorer genai_bench needs --judge-url .*--judge-model \(or --vqa-model"),
    "genai_bench without its VQA folder": (
        ["--benchmark", "genai_bench", "--vqa-model", "/nonexistent/vqa"],
        "'/nonexistent/vqa' does not exist: expected a Hugging Face image-text-to-text model to compute VQAScore"),
    "a template oneig does not take": (
        ["--benchmark", "oneig", "--judge-url", "http://vllm:8000/v1", "--judge-model", "vl",
         "--judge-template", "mine.txt"], "scorer oneig does not use --judge-template$"),
    "a VQA model and a judge": (["--benchmark", "genai_bench", "--vqa-model", "/models/vqa", "--judge-url",
                                 "http://vllm:8000/v1"], "scorer genai_bench does not use --judge-url; genai_bench "
                                                         "takes --vqa-model or a judge, not both"),
    "a detector for tiif": (["--benchmark", "tiif", "--detector", "/models/m2f", "--judge-url", "http://vllm:8000/v1",
                             "--judge-model", "vl"], "scorer tiif does not use --detector$"),
    "tiif on wise prompts": (WISE + ["--scorer", "tiif", "--judge-url", "http://vllm:8000/v1"],
                             r"it is not a TIIF-Bench row \(no answers\)"),
    "an unknown split": (["--benchmark", "tiif", "--split", "mini"],
                         "split: tiif has no split 'mini'; it takes one of testmini, full"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_scorer_mistake_exits_2_before_generating(mistake, no_generation, tmp_path, monkeypatch, capsys):
    extra, message = MISTAKES[mistake]
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--model", str(FIXTURE_DIR), "--output", str(tmp_path),
                                     "--limit", "2", *extra])
    with pytest.raises(SystemExit) as exited:
        evaluate_job().main()
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert re.search(message, error), error


def test_a_template_with_unknown_fields_and_a_prompt_file_with_an_unknown_tag(no_generation, tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("Judge {prompt} against {explanation}, with {hint}")
    scorer = ScorerSettings("wise", judge_url="http://vllm:8000/v1", judge_model="vl", judge_template=str(template))
    with pytest.raises(ValueError, match=rf"--judge-template {template}: template: unknown fields \['hint'\]"):
        evaluate(EvalConfig(str(FIXTURE_DIR), "wise", output=str(tmp_path / "out"), limit=2, scorer=scorer))

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"tag": "colour", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="mine.jsonl line 1: unknown tag 'colour', expected one of single_object"):
        evaluate(EvalConfig(str(FIXTURE_DIR), str(prompts), output=str(tmp_path / "out")))


# --- item 5: evaluation names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["it's", "a/b", "../x", ".."])
def test_a_name_that_is_no_folder_or_filter_value_is_refused(name, tmp_path, monkeypatch, capsys):
    with pytest.raises(InvalidName, match="--name"):
        EvalConfig(str(FIXTURE_DIR), name=name, output=str(tmp_path))
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--model", str(FIXTURE_DIR), "--name", name])
    with pytest.raises(SystemExit) as exited:
        evaluate_job().main()
    assert exited.value.code == 2 and "error: --name" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["models:/it's/3", "/data/../ck'pt/", "s3://bucket/../../x", "irg:shapes", "..", "'"])
def test_default_names_are_allowed_names(model):
    name = default_name("/tmp/my prompts/it's.jsonl", model)
    assert check_name(name) == name and "/" not in name and not name.startswith(".")
    assert _slug("../..") == "eval"


def test_the_digest_reads_no_weights(tmp_path, monkeypatch):
    """Only the small files are read; weights count by name, size and ETag or modification time."""
    folder = tmp_path / "ck"
    shutil.copytree(FIXTURE_DIR, folder, ignore=shutil.ignore_patterns("golden", "*.tsv", "README.md", "case.json"))
    import fsspec.implementations.local as local

    read = []
    original = local.LocalFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):
        read.append(path.rsplit("/", 1)[-1])
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", cat_file)
    checkpoint_digest(str(folder))
    assert read and not [name for name in read if name.endswith(".safetensors")]
