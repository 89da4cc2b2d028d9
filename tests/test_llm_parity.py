"""The language model against the reference: embeddings, RoPE, per-layer prefill, KV cache, decoding."""

import pytest
import torch
from conftest import FIXTURE_DIR, load_golden

from irg.model import KVCache, load_pretrained
from irg.model.embeddings import timestep_sinusoid

ATOL = 1e-4


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained(FIXTURE_DIR)


@pytest.fixture(scope="module")
def components():
    return load_golden("components")[0]


def test_timestep_embedding(pretrained, components):
    t = components["time_t"]
    torch.testing.assert_close(timestep_sinusoid(t), components["time_sinusoid"], atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(pretrained.model.time_embedder(t), components["time_embed"], atol=ATOL, rtol=0)


def test_rope_tables(pretrained, components):
    cos, sin = pretrained.model.language_model.model.rotary(components["rope_positions"], torch.float32)
    torch.testing.assert_close(cos, components["rope_cos"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, components["rope_sin"], atol=1e-6, rtol=0)


def test_system_prompt_prefill_layer_by_layer(pretrained, components):
    model = pretrained.model
    golden, meta = load_golden("text_greedy")
    system_ids = golden["context_ids"][:260]
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out[0]))
        for i, layer in enumerate(model.language_model.model.layers)
    ]
    norm_hook = model.language_model.model.norm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("norm", out)
    )
    try:
        (cache,) = model.prefill_text([KVCache()], [system_ids])
    finally:
        for h in hooks + [norm_hook]:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_text(system_ids), components["prefill_system_input_embeds"])
    torch.testing.assert_close(captured[0], components["prefill_system_layer0_out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured[1], components["prefill_system_layer1_out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured["norm"], components["prefill_system_final_norm"], atol=ATOL, rtol=0)
    assert (cache.length, cache.position) == (260, 260)


def test_greedy_decoding_matches_reference(pretrained):
    model, tokenizer = pretrained.model, pretrained.tokenizer
    golden, meta = load_golden("text_greedy")

    def wrap(text):
        return torch.tensor([1298, *tokenizer.encode(text, add_special_tokens=False), 1299])

    system_ids, prompt_ids = wrap(meta["system_prompt"]), wrap(meta["user_prompt"])
    torch.testing.assert_close(torch.cat([system_ids, prompt_ids]), golden["context_ids"], atol=0, rtol=0)

    (cache,) = model.prefill_text([KVCache()], [system_ids])
    (cache,) = model.prefill_text([cache], [prompt_ids])
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys, golden[f"prefill_key_cache_l{layer}"], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache.layers[layer].values, golden[f"prefill_value_cache_l{layer}"],
                                   atol=ATOL, rtol=0)

    token = torch.tensor([1298])
    caches = [cache]
    for step in range(meta["max_new_tokens"]):
        assert caches[0].position == golden["step_position_ids"][step]
        assert token.item() == golden["step_input_ids"][step]
        logits, caches = model.decode_step(caches, token)
        torch.testing.assert_close(logits[0], golden["step_logits"][step], atol=1e-3, rtol=0)
        token = logits.argmax(-1)
        assert token.item() == golden["output_ids"][step]
    assert tokenizer.decode(golden["output_ids"].tolist()) == meta["output_text"]
