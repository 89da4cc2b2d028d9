"""IRGPipeline behaviour beyond the goldens: validation, batching, thinking, rounds, events."""

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR
from PIL import Image

from irg.pipeline import IRGPipeline, RoundSettings

SMALL = dict(height=32, width=32, num_steps=3, vae_transform=(32, 16, 16), vit_transform=(28, 14, 14),
             max_think_tokens=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="   "), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["ok", ""]), "prompt"),
        (dict(prompt=42), "prompt"),
        (dict(height=40), "height: must be a positive multiple of 16"),
        (dict(width=0), "width"),
        (dict(width=1040), "exceeds the model's latent grid"),
        (dict(height=32.0), "height"),
        (dict(num_steps=1), "num_steps"),
        (dict(rounds=0), "rounds"),
        (dict(think_temperature=-1.0), "think_temperature"),
        (dict(max_think_tokens=0), "max_think_tokens"),
        (dict(vae_transform=(32, 64, 16)), "vae_transform"),
        (dict(vae_transform=(56, 56, 8)), "vae_transform: stride 8 must be a multiple of 16"),
        (dict(vit_transform=(2000, 224, 14)), "vit_transform"),
        (dict(vit_transform=(32, 16, 16)), "vit_transform: stride 16 must be a multiple of 14"),
        (dict(think_temperature="hot"), "think_temperature"),
        (dict(seed=[1, 2]), "seed: must be an integer or one integer per prompt"),
        (dict(round_settings=[{"cfg_scale": 2.0}]), "unknown round setting"),
        (dict(round_settings=[{"cfg_interval": (0.8, 0.2)}]), "cfg_interval"),
        (dict(round_settings=[{"cfg_renorm_type": "none"}]), "cfg_renorm_type"),
        (dict(round_settings=[{}, {}, {}]), "round_settings"),
        (dict(round_settings=[{}, {"start_noise": 1.5}]), "start_noise must be a number in"),
        (dict(think_texts=["a", "b", "c"]), "think_texts"),
        (dict(images=["not an image"]), "images"),
        (dict(images=[Image.new("RGB", (48, 32))]), "images: a given image is 48x32, the request 32x32"),
        (dict(init_noise=[torch.zeros(3, 64)]), r"init_noise\[0\]: expected shape"),
        (dict(vae_encode_noise=[torch.zeros(1, 16, 8, 8)]), r"vae_encode_noise\[0\]: expected shape \(1, 16, 4, 4\)"),
    ],
)
def test_bad_input_is_rejected_before_any_model_work(pipe, monkeypatch, overrides, message):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the input was validated")

    monkeypatch.setattr(pipe.model, "prefill_text", no_model_work)
    kwargs = {"prompt": "a red cube", **SMALL, "rounds": 2, **overrides}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_unknown_device_or_dtype_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="^device: unknown device 'gpu0'"):
        IRGPipeline.from_pretrained(FIXTURE_DIR, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            IRGPipeline.from_pretrained(FIXTURE_DIR, device="cuda")
    with pytest.raises(ValueError, match="^dtype: unknown dtype 'fp64'"):
        IRGPipeline.from_pretrained(FIXTURE_DIR, dtype="fp64")


def test_generation_is_reproducible_for_a_seed_and_differs_across_seeds(pipe):
    a = pipe("a red cube", seed=3, **SMALL)
    b = pipe("a red cube", seed=3, **SMALL)
    c = pipe("a red cube", seed=4, **SMALL)
    assert a.texts == b.texts
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    assert not torch.equal(a.latents[0], c.latents[0])
    assert len(a.texts) == len(a.images) == len(a.latents) == 2
    assert a.latents[0].shape == (4, 64) and a.images[0].size == (32, 32)


def test_a_prompt_gives_the_same_result_alone_or_in_a_batch(pipe):
    """Each prompt draws from its own seeded generator: thinks are sampled (temperature 0.3) here."""
    prompts = ["a red cube", "two green birds above a white house"]
    batch = pipe(prompts, seed=[5, 9], **SMALL)
    assert len(batch) == len(prompts)
    for prompt, seed, out in zip(prompts, (5, 9), batch):
        alone = pipe(prompt, seed=seed, **SMALL)
        assert alone.texts == out.texts and alone.seed == out.seed == seed
        for x, y in zip(alone.latents, out.latents):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_moving_the_pipeline_to_another_dtype_keeps_it_working():
    pipe = IRGPipeline.from_pretrained(FIXTURE_DIR)
    pipe("a red cube", seed=0, **SMALL)  # fills the float32 system-prompt cache
    pipe.to(dtype=torch.bfloat16)
    out = pipe("a red cube", seed=0, **SMALL)
    assert pipe.dtype == torch.bfloat16 and out.images[1].size == (32, 32)


def test_batch_of_prompts_equals_each_prompt_alone(pipe):
    """Packing prompts (of different lengths) and CFG branches together must not mix them."""
    prompts = ["a red cube", "two green birds above a white house under a blue sky"]
    noise = [torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    settings = dict(SMALL, think_temperature=0.0, vae_encode_noise=[torch.randn(2, 16, 4, 4)])
    batch = pipe(prompts, init_noise=noise, **settings)
    for i, prompt in enumerate(prompts):
        single_settings = dict(settings, vae_encode_noise=[settings["vae_encode_noise"][0][i : i + 1]])
        alone = pipe(prompt, init_noise=[n[i] for n in noise], **single_settings)
        assert batch[i].texts == alone.texts
        for x, y in zip(batch[i].latents, alone.latents):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)  # only matmul blocking differs


def test_thinking_stops_at_im_end(pipe, monkeypatch):
    """Force '<|im_end|>' on the 4th decode step: the think is the 3 tokens before it."""
    lm_head = pipe.model.language_model.lm_head
    calls = {"n": 0}
    letter = pipe.tokenizer.encode("a", add_special_tokens=False)[0]

    def forced(_module, _inputs, logits):
        calls["n"] += 1
        forced_logits = torch.full_like(logits, -1e4)
        forced_logits[:, pipe.im_end if calls["n"] % 4 == 0 else letter] = 0
        return forced_logits

    handle = lm_head.register_forward_hook(forced)
    try:
        out = pipe("a red cube", rounds=1, **dict(SMALL, max_think_tokens=50))
    finally:
        handle.remove()
    assert out.texts == ["aaa"]
    assert calls["n"] == 4


def test_think_is_capped_at_max_think_tokens(pipe):
    """Greedy, the tiny random model does not close its think within 12 tokens (checked first), so only the
    cap ends it: exactly ``max_think_tokens`` tokens, the first ones of the longer think, never one more."""
    greedy = dict(SMALL, think_temperature=0.0)
    events = []
    pipe("a red cube", rounds=1, callback=events.append, **dict(greedy, max_think_tokens=12))
    uncapped = [e.text for e in events if e.kind == "think_token"]
    assert len(uncapped) == 12  # one event per token: the model did not stop on its own
    decode_steps = {"n": 0}
    handle = pipe.model.language_model.lm_head.register_forward_hook(
        lambda *_: decode_steps.__setitem__("n", decode_steps["n"] + 1))
    try:
        for cap in (1, 5):
            events.clear()
            decode_steps["n"] = 0
            out = pipe("a red cube", rounds=1, callback=events.append, **dict(greedy, max_think_tokens=cap))
            tokens = [e.text for e in events if e.kind == "think_token"]
            assert len(tokens) == cap and decode_steps["n"] == cap
            assert tokens == uncapped[:cap] and out.texts == [uncapped[cap - 1]]
    finally:
        handle.remove()


def test_events_arrive_in_order_for_three_rounds(pipe):
    events = []
    out = pipe("a red cube", rounds=3, seed=1, callback=events.append, **SMALL)
    assert len(out.images) == 3
    kinds = [(e.kind, e.round) for e in events if e.kind != "think_token"]
    expected = []
    for r in range(3):
        expected += [("think_done", r)] + [("step", r)] * (SMALL["num_steps"] - 1) + [("image", r)]
    assert kinds == expected + [("done", 2)]
    steps = [e for e in events if e.kind == "step" and e.round == 0]
    assert [(e.step, e.num_steps) for e in steps] == [(1, 2), (2, 2)]


def test_non_square_images(pipe):
    out = pipe("a wide landscape", rounds=2, seed=0, **dict(SMALL, height=32, width=80))
    assert out.images[0].size == (80, 32) and out.images[1].size == (80, 32)
    assert out.latents[0].shape == (2 * 5, 64)


def test_round_settings_turn_guidance_off(pipe):
    events = []
    pipe("a red cube", rounds=2, seed=0, callback=events.append,
         round_settings=[{"cfg_text_scale": 1.0}, RoundSettings(cfg_img_scale=1.0, cfg_interval=(0.0, 1.0))],
         **SMALL)
    steps = [e.detail for e in events if e.kind == "step"]
    assert len(steps) == 2 * (SMALL["num_steps"] - 1)  # else the all()s below would hold vacuously
    round1, round2 = steps[:2], steps[2:]
    assert all(s.v_text is None and s.v_img is None for s in round1)  # text CFG 1.0: one branch only
    assert all(s.v_text is not None and s.v_img is None for s in round2)  # image CFG off
    assert all(torch.equal(s.v, s.v_cond) for s in round1)


def test_given_images_skip_sampling(pipe):
    draft = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    events = []
    out = pipe("a red cube", rounds=2, seed=0, images=[draft], callback=events.append, **SMALL)
    assert out.images[0] is draft and out.latents[0] is None
    assert {e.round for e in events if e.kind == "step"} == {1}


def test_start_noise_starts_a_round_from_the_last_ones_latent(pipe):
    settings = dict(SMALL, num_steps=6)
    from_noise = pipe("a red cube", rounds=2, seed=0, **settings)
    kept = pipe("a red cube", rounds=2, seed=0, round_settings=[{}, {"start_noise": 0.0}], **settings)
    assert torch.equal(kept.latents[1], kept.latents[0]) and torch.equal(kept.latents[0], from_noise.latents[0])
    events = []
    restarted = pipe("a red cube", rounds=2, seed=0, round_settings=[{}, {"start_noise": 0.5}],
                     callback=events.append, **settings)
    steps = [e.detail for e in events if e.kind == "step" and e.round == 1]
    assert [s.t for s in steps][0] == 0.5 and all(s.t < 0.5 for s in steps[1:])  # only the schedule below s
    assert len(steps) < settings["num_steps"] - 1
    assert not torch.equal(restarted.latents[1], from_noise.latents[1])
    # from a given image: its clean VAE tokens are the start
    given = pipe("a red cube", rounds=2, seed=0, images=[kept.images[0]], round_settings=[{}, {"start_noise": 0.0}],
                 **settings)
    assert given.latents[0] is None and given.latents[1].shape == kept.latents[0].shape
