"""The Serve batching policy and options (irg.serve.batching, irg.serve.options): no Ray, no weights."""

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from irg.model.config import tiny_config
from irg.pipeline import PipelineEvent, validate_request
from irg.serve.api import GenerationBody, body_limits
from irg.serve.batching import EventRouter, batch_key, group_by_batch_key, merge_requests, split_outputs
from irg.serve.options import AppArgs, BatchOptions

CONFIG = tiny_config()
SMALL = {"height": 64, "width": 64, "num_steps": 4, "rounds": 2, "max_think_tokens": 8}


def request(prompts, seed=0, **overrides):
    return validate_request(CONFIG, prompts, seed=seed, **{**SMALL, **overrides})


def test_requests_of_one_shape_share_a_key_whatever_their_prompts_and_seeds():
    assert batch_key(request(["a red cube"], seed=1)) == batch_key(request(["two balls", "a cone"], seed=9))


@pytest.mark.parametrize("change", [
    {"height": 128}, {"width": 32}, {"num_steps": 5}, {"rounds": 1}, {"max_think_tokens": 9},
    {"think_temperature": 0.7}, {"round_settings": [{"cfg_text_scale": 2.0}]},
    {"vae_transform": (32, 16, 16)}, {"system_prompt": "Draw it."},
], ids=lambda change: next(iter(change)))
def test_requests_that_differ_in_a_batch_wide_setting_do_not_share(change):
    assert batch_key(request(["a red cube"])) != batch_key(request(["a red cube"], **change))


def test_a_request_with_given_noise_never_shares():
    tokens = (64 // CONFIG.pixels_per_latent_token) ** 2
    noisy = [request(["a"], init_noise=[torch.zeros(tokens, CONFIG.latent_channels)]) for _ in range(2)]
    assert batch_key(noisy[0]) != batch_key(noisy[1])
    assert batch_key(noisy[0]) != batch_key(request(["a"]))
    assert group_by_batch_key([request(["a"]), noisy[0], request(["b"]), noisy[1]]) == [[0, 2], [1], [3]]


def test_merge_then_split_gives_each_request_its_own_prompts_and_seeds_in_order():
    requests = [request(["a red cube"], seed=5), request(["two balls", "a cone", "a star"], seed=100),
                request(["a hill"], seed=7)]
    merged = merge_requests(requests)
    assert merged.prompts == ["a red cube", "two balls", "a cone", "a star", "a hill"]
    assert merged.seeds == [5, 100, 101, 102, 7] and not merged.single
    assert len(merged.think_texts) == len(merged.images) == merged.batch_size == 5
    outputs = list(zip(merged.prompts, merged.seeds))  # what the pipeline makes, one per merged prompt
    assert split_outputs(requests, outputs) == [list(zip(r.prompts, r.seeds)) for r in requests]
    assert merge_requests(requests[:1]) is requests[0]
    with pytest.raises(ValueError, match="4 outputs for 5"):
        split_outputs(requests, outputs[:4])


def test_events_go_to_the_stream_that_owns_the_prompt_with_its_own_index():
    router = EventRouter(["s1", "s2"], [request(["a", "b"]), request(["c"])])
    image = Image.new("RGB", (16, 16), "red")
    assert router.route(PipelineEvent("think_done", round=0, prompt_index=1, text="b's")) == \
        [("s1", ("think", {"index": 1, "round": 1, "text": "b's"}))]
    assert router.route(PipelineEvent("think_done", round=1, prompt_index=2, text="c's")) == \
        [("s2", ("think", {"index": 0, "round": 2, "text": "c's"}))]
    [(stream, (name, data))] = router.route(PipelineEvent("image", round=0, prompt_index=2, image=image))
    assert (stream, name, data["index"], data["round"]) == ("s2", "image", 0, 1) and data["b64_png"]


def test_think_tokens_stream_as_deltas_that_rebuild_the_text_per_prompt_and_round():
    router = EventRouter(["s1", "s2"], [request(["a", "b"]), request(["c"])])
    texts: dict = {}

    def send(prompt, round, text):
        routed = router.route(PipelineEvent("think_token", round=round, prompt_index=prompt, text=text))
        for stream, (name, data) in routed:
            assert name == "think_delta"
            key = (stream, data["index"], data["round"])
            texts[key] = texts.get(key, "")[: data["offset"]] + data["delta"]
        return routed

    [(_, (_, first))] = send(2, 0, "a red")
    assert first == {"index": 0, "round": 1, "offset": 0, "delta": "a red"}
    [(_, (_, second))] = send(2, 0, "a red cube")
    assert (second["offset"], second["delta"]) == (5, " cube")  # only what is new
    send(2, 0, "a red cube \ufffd")  # half a character, then the whole one replaces it
    [(_, (_, fixed))] = send(2, 0, "a red cube é")
    assert (fixed["offset"], fixed["delta"]) == (11, "é")
    assert send(2, 0, "a red cube é") == []  # nothing new: nothing sent
    send(0, 0, "left")
    send(0, 1, "a reflection")
    assert texts == {("s2", 0, 1): "a red cube é", ("s1", 0, 1): "left", ("s1", 0, 2): "a reflection"}


def test_batch_wide_events_reach_every_stream():
    router = EventRouter(["s1", "s2", "s3"], [request(["a"]), request(["b", "c"]), request(["d"])])
    step = ("step", {"index": -1, "round": 1, "step": 3, "num_steps": 4})
    assert router.route(PipelineEvent("step", round=0, step=3, num_steps=4)) == [(s, step) for s in ("s1", "s2", "s3")]
    assert router.route(PipelineEvent("done", round=1)) == [(s, ("done", {})) for s in ("s1", "s2", "s3")]


def test_a_body_leaves_out_what_the_client_did_not_send_and_gets_the_pipeline_defaults():
    from irg.pipeline import DEFAULTS, LIMITS

    body = GenerationBody(prompt="a red cube")
    assert (body.size, body.steps, body.rounds, body.max_think_tokens) == (None, None, None, None)
    got = body.to_request(CONFIG, default_seed=3)
    assert (got.height, got.width, got.num_steps, got.rounds, got.max_think_tokens) == (
        DEFAULTS.height, DEFAULTS.width, DEFAULTS.num_steps, DEFAULTS.rounds, DEFAULTS.max_think_tokens)
    limits = body_limits()
    assert limits["steps"] == {"minimum": 2, "maximum": LIMITS.max_num_steps, "default": DEFAULTS.num_steps}
    assert limits["rounds"]["maximum"] == LIMITS.max_rounds
    assert limits["max_think_tokens"] == {"minimum": 1, "maximum": LIMITS.max_think_tokens,
                                          "default": DEFAULTS.max_think_tokens}
    assert limits["size"] == {"default": f"{DEFAULTS.width}x{DEFAULTS.height}"}
    with pytest.raises(ValidationError, match="steps"):
        GenerationBody(prompt="a", steps=LIMITS.max_num_steps + 1)


def test_app_args_refuse_unknown_fields_and_names_by_field():
    assert AppArgs(model="m", dtype="bf16", device="cuda:1").dtype == "bf16"
    for bad, field in (({"model": "m", "colour": "red"}, "colour"), ({"model": "m", "dtype": "bf17"}, "dtype"),
                       ({"model": "m", "device": "gpu"}, "device"), ({}, "model"),
                       ({"model": "m", "request_timeout_s": 0}, "request_timeout_s")):
        with pytest.raises(ValidationError, match=rf"(?m)^{field}$"):
            AppArgs.model_validate(bad)


def test_batch_options_refuse_unknown_keys_by_name():
    options = BatchOptions.model_validate({"max_batch_size": 1})
    assert options.batch_wait_timeout_s == BatchOptions().batch_wait_timeout_s
    for bad, field in (({"max_batch": 2}, "max_batch"), ({"max_batch_size": 0}, "max_batch_size"),
                       ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s")):
        with pytest.raises(ValidationError, match=rf"(?m)^{field}$"):
            BatchOptions.model_validate(bad)
