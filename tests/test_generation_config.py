"""Packaged model names (``irg:NAME``) and a checkpoint's ``generation_config.json`` defaults, through
the pipeline and every front end that takes them."""

import json
import shutil

import pytest
from conftest import FIXTURE_DIR
from PIL import Image

from irg.model import CheckpointError, checkpoint
from irg.model.checkpoint import read_config, resolve_model
from irg.pipeline import DEFAULTS, SYSTEM_PROMPT, GenerationDefaults, IRGPipeline, model_defaults, validate_request

# A model whose defaults differ from the reference ones in every way a test can see quickly.
MODEL_DEFAULTS = {"height": 32, "width": 64, "num_steps": 2, "rounds": 1, "max_think_tokens": 4,
                  "think_temperature": 0.0, "system_prompt": "Draw shapes.",
                  "round_settings": [{"timestep_shift": 1.0}]}
CHECKPOINT_FILES = shutil.ignore_patterns("golden", "*.tsv", "case.json", "README.md")


def make_checkpoint(folder, generation_config: dict | None = MODEL_DEFAULTS):
    shutil.copytree(FIXTURE_DIR, folder, ignore=CHECKPOINT_FILES)
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A fake ``irg/models`` holding ``shapes``, the fixture with :data:`MODEL_DEFAULTS`."""
    root = tmp_path_factory.mktemp("models")
    make_checkpoint(root / "shapes")
    return root


@pytest.fixture
def installed(packaged, monkeypatch):
    monkeypatch.setattr(checkpoint, "PACKAGED_MODELS", packaged)
    return packaged


@pytest.fixture(scope="module")
def pipe(packaged):
    return IRGPipeline.from_pretrained(packaged / "shapes")


def test_irg_names_resolve_to_the_packaged_folder_and_other_paths_are_themselves(installed):
    assert resolve_model("irg:shapes") == str(installed / "shapes")
    assert read_config("irg:shapes") == read_config(installed / "shapes")
    for path in ("s3://bucket/ckpt", "/abs/ckpt", "relative/ckpt"):
        assert resolve_model(path) == path


def test_an_unknown_name_says_which_models_are_packaged(installed, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model irg:foo is not installed.*packaged models: shapes"):
        read_config("irg:foo")
    monkeypatch.setattr(checkpoint, "PACKAGED_MODELS", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"irg:shapes is not installed.*no packaged model is installed"):
        resolve_model("irg:shapes")


def test_training_config_resolves_a_packaged_name(installed, tmp_path):
    from irg.train.config import load_config

    config = tmp_path / "train.yaml"
    config.write_text("model: {checkpoint: 'irg:shapes'}\n")
    assert load_config(config, 1).model.checkpoint == str(installed / "shapes")
    with pytest.raises(FileNotFoundError, match="irg:nope"):
        load_config(config, 1, ["model.checkpoint=irg:nope"])


def test_the_pipeline_takes_the_models_defaults_and_a_request_overrides_them(pipe):
    assert pipe.defaults == GenerationDefaults(**{**MODEL_DEFAULTS, "round_settings": ({"timestep_shift": 1.0},)})
    events = []
    out = pipe("a red cube", seed=0, callback=events.append)
    assert [image.size for image in out.images] == [(64, 32)]
    # The tiny model never closes a think early at temperature 0: each one uses up the budget.
    assert sum(e.kind == "think_token" for e in events) == 4
    events.clear()
    out = pipe("a red cube", seed=0, height=32, width=32, rounds=2, max_think_tokens=6, callback=events.append)
    assert [image.size for image in out.images] == [(32, 32), (32, 32)]
    assert sum(e.kind == "think_token" for e in events) == 2 * 6
    request = validate_request(pipe.config, "x", defaults=pipe.defaults)
    assert request.system_prompt == "Draw shapes." and request.think_temperature == 0.0
    assert validate_request(pipe.config, "x", system_prompt="Other.", defaults=pipe.defaults).system_prompt == "Other."


def test_round_settings_stack_library_then_model_then_request():
    defaults = GenerationDefaults(height=32, width=32, round_settings=({"timestep_shift": 1.0, "cfg_text_scale": 5.0},))
    config = read_config(FIXTURE_DIR)
    first, second, third = validate_request(config, "x", rounds=3, round_settings=[{"cfg_text_scale": 2.0}],
                                            defaults=defaults).round_settings
    assert (first.timestep_shift, first.cfg_text_scale, first.cfg_interval) == (1.0, 2.0, (0.4, 1.0))
    # The model's last entry holds for the later rounds, over the library's round-2 settings.
    assert second == third
    assert (second.timestep_shift, second.cfg_text_scale, second.cfg_img_scale) == (1.0, 5.0, 2.0)
    assert validate_request(config, "x", height=32, width=32).system_prompt == SYSTEM_PROMPT


@pytest.mark.parametrize("values, message", [
    ({"heigth": 64}, "unknown key 'heigth'"),
    ({"height": 50}, "height: must be a positive multiple of 16"),
    ({"num_steps": 1000}, "num_steps: must be an integer from 2 to"),
    ({"rounds": "2"}, "rounds"),
    ({"system_prompt": ""}, "system_prompt"),
    ({"round_settings": {"timestep_shift": 1.0}}, "round_settings: must be a list"),
    ({"round_settings": [{"cfg_scale": 2.0}]}, r"round_settings\[0\]: unknown round setting"),
    # An entry past the model's default rounds is checked too: a longer request would use it.
    ({"rounds": 1, "round_settings": [{}, {"cfg_renorm_type": "none"}]}, r"round_settings\[1\]: cfg_renorm_type"),
])
def test_a_bad_generation_config_names_the_file_and_the_key(tmp_path, values, message):
    folder = make_checkpoint(tmp_path / "ckpt", values)
    with pytest.raises(CheckpointError, match=message) as caught:
        model_defaults(folder)
    assert str(folder / "generation_config.json") in str(caught.value)


def test_hugging_face_keys_are_left_to_hugging_face_and_no_file_means_the_reference_defaults(tmp_path):
    qwen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7,
            "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "transformers_version": "4.37.0"}
    assert model_defaults(make_checkpoint(tmp_path / "qwen", {**qwen, "num_steps": 8})) == GenerationDefaults(
        num_steps=8)
    assert model_defaults(make_checkpoint(tmp_path / "none", None)) == DEFAULTS
    (tmp_path / "none" / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        model_defaults(tmp_path / "none")


def test_saving_writes_back_only_the_settings_that_differ(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text()) == MODEL_DEFAULTS
    assert model_defaults(tmp_path / "saved") == pipe.defaults
    plain = IRGPipeline(pipe.model, pipe.autoencoder, pipe.tokenizer)
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()


def test_export_carries_the_base_checkpoints_generation_config_as_written(tmp_path):
    import pyarrow.fs as pafs
    import torch

    from irg.model import load_pretrained
    from irg.train import export
    from irg.train.checkpointing import ema_shard_file
    from irg.train.ema import ShardedEMA

    written = {**MODEL_DEFAULTS, "bos_token_id": 1}
    base = make_checkpoint(tmp_path / "base", written)
    (tmp_path / "checkpoint" / "ema").mkdir(parents=True)
    torch.save(ShardedEMA(load_pretrained(base).model, 0.9).state_dict(), tmp_path / "checkpoint" / ema_shard_file(0))
    export.export_checkpoint(pafs.LocalFileSystem(), str(tmp_path / "checkpoint"), str(base), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == written


def test_the_cli_takes_the_models_defaults_for_a_packaged_name(installed, tmp_path, capsys):
    from irg.cli import main

    assert main(["generate", "--model", "irg:shapes", "--prompt", "a red cube", "--out", str(tmp_path / "a")]) == 0
    trace = json.loads((tmp_path / "a" / "trace.json").read_text())
    assert {k: trace["settings"][k] for k in ("width", "height", "steps", "rounds", "max_think_tokens")} == {
        "width": 64, "height": 32, "steps": 2, "rounds": 1, "max_think_tokens": 4}
    assert Image.open(tmp_path / "a" / "round1.png").size == (64, 32)
    assert main(["generate", "--model", "irg:nope", "--prompt", "x", "--out", str(tmp_path / "b")]) == 2
    assert "irg:nope is not installed" in capsys.readouterr().err


def test_serve_reports_and_applies_the_served_models_defaults(pipe):
    from irg.serve.api import GenerationBody, body_limits

    limits = body_limits(pipe.defaults)
    assert limits["size"] == {"default": "64x32"} and limits["steps"]["default"] == 2
    assert limits["rounds"]["default"] == 1 and limits["max_think_tokens"]["default"] == 4
    request = GenerationBody(prompt="a red cube", steps=3).to_request(pipe.config, 0, pipe.defaults)
    assert (request.width, request.height, request.num_steps, request.system_prompt) == (64, 32, 3, "Draw shapes.")


def test_evaluation_fills_in_the_models_defaults_before_it_stores_its_settings(packaged):
    from irg.eval.generate import GenerationSettings
    from irg.eval.run import resolve_settings

    settings = resolve_settings(str(packaged / "shapes"), GenerationSettings(steps=3))
    assert (settings.height, settings.width, settings.steps, settings.rounds) == (32, 64, 3, 1)
    assert (settings.max_think_tokens, settings.think_temperature) == (4, 0.0)


def test_the_registry_pyfunc_leaves_unset_params_to_the_model(pipe):
    import pandas as pd

    from irg.registry import IRGModel, generation_params

    assert generation_params(pipe.defaults) == {"height": 32, "width": 64, "num_steps": 2, "rounds": 1, "seed": 0,
                                                "max_think_tokens": 4, "think_temperature": 0.0}
    model = IRGModel()
    model.pipe = pipe
    prediction = model.predict(None, pd.DataFrame({"prompt": ["a red cube"]}))
    assert len(prediction["images"][0]) == 1
