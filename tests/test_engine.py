"""The generation engine: requests join and leave between iterations, share forwards whatever their
shapes, hold KV slots while they generate, and fail alone."""

import pytest
import torch

from irg.model.attention import KVSlots
from irg.pipeline import validate_request
from irg.pipeline.engine import GenerationCancelled, GenerationEngine, Phase, context_tokens, kv_slots

SMALL = dict(height=32, width=32, num_steps=4, vae_transform=(32, 16, 16), vit_transform=(28, 14, 14),
             max_think_tokens=6)


def request(pipe, prompt="a red cube", **kwargs):
    return validate_request(pipe.config, prompt, defaults=pipe.defaults, **{**SMALL, **kwargs})


def engine_for(pipe, num_slots=8, slot_tokens=1024):
    return GenerationEngine(pipe, kv_slots(pipe, num_slots, slot_tokens))


def phases(engine, generation):
    return [t.phase for t in engine._live if t.generation is generation]


def steps_taken(engine, generation):
    return [t.step for t in engine._live if t.generation is generation]


def test_a_request_arriving_while_another_denoises_takes_its_first_step_in_the_next_iteration(pipe):
    engine = engine_for(pipe)
    first = engine.submit(request(pipe, seed=1))
    while phases(engine, first) != [Phase.DENOISE]:
        engine.step()
    engine.step()
    (step_before,) = steps_taken(engine, first)
    second = engine.submit(request(pipe, "two green birds", seed=2))
    assert second.iterations == 0 and phases(engine, second) == []
    engine.step()
    assert second.iterations == 1 and phases(engine, second) == [Phase.THINK]  # its prompt is prefilled
    assert steps_taken(engine, first) == [step_before + 1]  # in the same iteration as the other's step
    engine.run(second)
    engine.run(first)
    assert engine.idle and engine.slots.free == engine.slots.num_slots


def test_a_cancelled_request_frees_its_slots_after_the_next_iteration_and_a_waiting_one_takes_them(pipe):
    engine = engine_for(pipe, num_slots=4)
    running = [engine.submit(request(pipe, seed=s)) for s in (1, 2)]  # two rounds: two slots each
    engine.step()
    waiting = engine.submit(request(pipe, seed=3))
    engine.step()
    assert engine.slots.free == 0 and engine.waiting == 1 and waiting.iterations == 0
    running[0].cancel()
    engine.step()
    assert running[0].done and isinstance(running[0].error, GenerationCancelled)
    assert phases(engine, running[0]) == [] and waiting.iterations == 1  # its slots went to the waiting one
    assert engine.waiting == 0 and engine.slots.free == 0
    with pytest.raises(GenerationCancelled):
        running[0].result()
    engine.run(waiting)
    engine.run(running[1])
    assert engine.slots.free == 4


def test_requests_of_different_shapes_share_forwards_and_each_gets_what_it_gets_alone(pipe):
    kinds = [
        dict(prompt="a red cube", seed=1),
        dict(prompt="a wide blue sky", seed=2, height=32, width=64, num_steps=3, rounds=1,
             round_settings=[{"cfg_text_scale": 1.0}]),
        dict(prompt="three yellow stars", seed=3, num_steps=5, rounds=3, think_temperature=0.0,
             think_texts=["a plan", None, None]),
    ]
    alone, iterations_alone = [], []
    for kind in kinds:
        engine = engine_for(pipe)
        alone.append(engine.run(engine.submit(request(pipe, **kind))))
        iterations_alone.append(engine.iterations)
    engine = engine_for(pipe)
    together = [engine.submit(request(pipe, **kind)) for kind in kinds]
    while not engine.idle:
        engine.step()
    # the forwards were shared: fewer than the three alone took together, no fewer than the longest took
    assert max(iterations_alone) <= engine.iterations < 0.7 * sum(iterations_alone), iterations_alone
    for solo, generation in zip(alone, together):
        (mine,), (theirs,) = solo, generation.result()
        assert mine.texts == theirs.texts
        for x, y in zip(mine.latents, theirs.latents):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_a_request_whose_blocks_break_the_forward_fails_alone(pipe, monkeypatch):
    engine = engine_for(pipe)
    poison = "poison " * 12  # a prompt block longer than any other block of these requests
    poison_length = len(pipe.wrap(poison))
    forward = engine.model.forward_blocks

    def fragile(caches, blocks):
        if any(b.embeds.shape[0] == poison_length for b in blocks):
            raise RuntimeError("a poisoned block")
        return forward(caches, blocks)

    healthy_alone = engine.run(engine.submit(request(pipe, "a red cube", seed=4)))
    monkeypatch.setattr(engine.model, "forward_blocks", fragile)
    healthy = engine.submit(request(pipe, "a red cube", seed=4))
    poisoned = engine.submit(request(pipe, poison, seed=5))
    engine.run(healthy)
    assert poisoned.done and "a poisoned block" in str(poisoned.error)
    assert healthy.result()[0].texts == healthy_alone[0].texts
    torch.testing.assert_close(healthy.result()[0].latents[1], healthy_alone[0].latents[1], atol=1e-4, rtol=0)
    assert engine.slots.free == engine.slots.num_slots


def test_a_failing_callback_ends_only_its_own_request(pipe):
    engine = engine_for(pipe)

    def hang_up(event):
        if event.kind == "step":
            raise ConnectionError("the client went away")

    other = engine.submit(request(pipe, seed=6))
    failing = engine.submit(request(pipe, seed=7), callback=hang_up)
    assert len(engine.run(other)) == 1
    assert isinstance(failing.error, ConnectionError)


def test_a_request_that_could_never_fit_the_slots_is_refused_by_name(pipe):
    engine = engine_for(pipe, num_slots=2, slot_tokens=64)
    with pytest.raises(ValueError, match="KV slots hold 64"):
        engine.submit(request(pipe, rounds=1))
    with pytest.raises(ValueError, match="n: 2 prompts of 2 rounds need 4 KV slots; the engine has 2"):
        engine.submit(request(pipe, ["a", "b"]))


def test_the_context_budget_covers_what_a_request_really_holds(pipe):
    big = request(pipe, rounds=3, seed=8, think_temperature=1.0)
    budget = context_tokens(pipe, big, len(pipe.wrap("a red cube")))
    engine = engine_for(pipe, slot_tokens=budget)
    generation = engine.submit(big)
    longest = 0
    while not generation.done:
        engine.step()
        for t in engine._live:
            longest = max(longest, *(c.length for c in (t.main, t.text_only, t.decoding) if c is not None))
    assert 0 < longest <= budget
    generation.result()


def test_contexts_grow_inside_their_slot_without_allocating():
    slots = KVSlots(num_slots=2, slot_tokens=32, num_layers=1, kv_heads=2, head_dim=4)
    (slot,) = slots.claim()
    from irg.model.attention import KVCache, LayerKV

    prefix = KVCache([LayerKV(torch.ones(5, 2, 4), torch.ones(5, 2, 4))], length=5, position=5)
    context = slots.context(slot, prefix)
    layer = context.layers[0]
    for i in range(20):
        layer = layer.extended(torch.full((1, 2, 4), float(i)), torch.full((1, 2, 4), float(i)))
    assert layer.keys.data_ptr() == slots.keys[0][slot].data_ptr()  # still in the slot: nothing allocated
    assert torch.equal(layer.keys[:5], torch.ones(5, 2, 4)) and float(layer.keys[24, 0, 0]) == 19.0
    outgrown = layer.extended(torch.zeros(10, 2, 4), torch.zeros(10, 2, 4))  # 35 rows: past the slot
    assert outgrown.length == 35 and outgrown.keys.data_ptr() != slots.keys[0][slot].data_ptr()
    assert slots.free == 1
    slots.release([slot])
    with pytest.raises(ValueError, match="KV slot 1 is not claimed"):
        slots.release([1])
    with pytest.raises(ValueError, match="3 KV slots asked for, 2 free"):
        slots.claim(3)


def test_step_caching_runs_the_model_on_fewer_steps_and_extrapolates_the_others(pipe):
    settings = dict(num_steps=9, rounds=1, seed=3, think_texts=["a plan"])
    calls = {"n": 0}
    handle = pipe.model.llm2vae.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        steps, cached_steps = [], []
        plain = pipe("a red cube", callback=lambda e: e.kind == "step" and steps.append(e.detail),
                     **dict(SMALL, **settings))
        plain_calls, calls["n"] = calls["n"], 0
        cached = pipe("a red cube", callback=lambda e: e.kind == "step" and cached_steps.append(e.detail),
                      round_settings=[{"step_cache_interval": 3}], **dict(SMALL, **settings))
    finally:
        handle.remove()
    # 8 steps: the model runs steps 0, 1, 3, 6 and 7 (the first two, every third, the last)
    assert [s.reused for s in cached_steps] == [False, False, True, False, True, True, False, False]
    assert not any(s.reused for s in steps)
    branches = [1 + (s.v_text is not None) for s in steps]  # CFG branches each step ran
    assert calls["n"] == sum(b for b, s in zip(branches, cached_steps) if not s.reused) < plain_calls
    # A reused step is the line through the last two the model ran, branch by branch.
    (t0, v0), (t1, v1), (t2, v2) = [(s.t, s.v_cond) for s in cached_steps[:3]]
    torch.testing.assert_close(v2, v1 + (v1 - v0) * (t2 - t1) / (t1 - t0))
    assert plain.latents[0].shape == cached.latents[0].shape
    assert not torch.equal(plain.latents[0], cached.latents[0])


def test_think_tokens_decoded_with_static_shapes_in_slots_match_the_packed_forward(pipe):
    """The decode CUDA graphs replay (SlotDecoder), run eagerly here: same tokens and texts, and the
    contexts stay in their slots."""
    kinds = [dict(prompt="a red cube", seed=1, think_temperature=0.0, max_think_tokens=12),
             dict(prompt="two green birds above a white house", seed=2, max_think_tokens=9)]
    runs, static_steps, sampled = [], [], []
    for slot_decode in (False, True):
        engine = GenerationEngine(pipe, kv_slots(pipe, 8, 1024), slot_decode=slot_decode)
        if slot_decode:
            step = engine.decoder._step
            engine.decoder._step = lambda *args, step=step: static_steps.append(len(args[0])) or step(*args)
        generations = [engine.submit(request(pipe, **kind), lambda e: e.kind == "think_token" and sampled.append(e))
                       for kind in kinds]
        while not engine.idle:
            engine.step()
        runs.append([g.result()[0] for g in generations])
        assert (engine.decoder is not None) == slot_decode
    # every token the static run sampled came out of the static decoder, two contexts at a time at first
    assert static_steps[0] == 2 and sum(static_steps) >= len(sampled) / 2 > 0
    for packed, static in zip(*runs):
        assert packed.texts == static.texts and len(packed.texts[0]) > 0
        for x, y in zip(packed.latents, static.latents):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


def test_a_failing_static_decoder_leaves_the_think_to_the_packed_forward(pipe, caplog):
    kind = dict(prompt="a red cube", seed=1, think_temperature=0.0, max_think_tokens=8, rounds=1)
    engine = GenerationEngine(pipe, kv_slots(pipe, 4, 1024), slot_decode=True)

    def broken(*args):
        raise RuntimeError("graph capture failed")

    engine.decoder._step = broken
    (out,) = engine.run(engine.submit(request(pipe, **kind)))
    packed = GenerationEngine(pipe, kv_slots(pipe, 4, 1024), slot_decode=False)
    (expected,) = packed.run(packed.submit(request(pipe, **kind)))
    assert engine.decoder is None and "static-shape decoder failed" in caplog.text
    assert out.texts == expected.texts and len(out.texts[0]) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_gives_the_eager_tokens(fixture_dir):
    from irg.pipeline import IRGPipeline

    cuda = IRGPipeline.from_pretrained(fixture_dir, device="cuda", dtype="float32")
    kinds = [dict(prompt="a red cube", seed=1, think_temperature=0.0, max_think_tokens=24),
             dict(prompt="a blue ball", seed=2, think_temperature=0.0, max_think_tokens=24, rounds=1)]
    texts = []
    for slot_decode in (False, True):
        engine = GenerationEngine(cuda, kv_slots(cuda, 8, 1024), slot_decode=slot_decode)
        generations = [engine.submit(request(cuda, **kind)) for kind in kinds]
        while not engine.idle:
            engine.step()
        texts.append([g.result()[0].texts for g in generations])
        assert slot_decode is False or engine.decoder._graphs  # graphs were captured and replayed
    assert texts[0] == texts[1]
