"""Checkpoint layout: key inventories, loading errors that name the problem, save/load round trip."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURE_DIR, load_golden

from irg.model import AutoEncoder, CheckpointError, build_model, get_config, load_pretrained, save_pretrained
from irg.model.checkpoint import read_config
from irg.model.safetensors_stream import write_safetensors


def read_inventory(name: str) -> dict[str, tuple[int, ...]]:
    rows = (FIXTURE_DIR / name).read_text().splitlines()
    entries = [r.split("\t") for r in rows if r and not r.startswith("#")][1:]  # skip the header row
    return {key: tuple(json.loads(shape)) for key, shape, _formula in entries}


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_bagel_7b_on_meta_device_has_the_official_inventory():
    with torch.device("meta"):
        model = build_model("bagel-7b")
    assert shapes(model) == read_inventory("keys_real_7b.tsv")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(14.6e9, rel=0.01)


def test_real_flux_autoencoder_inventory():
    with torch.device("meta"):
        ae = AutoEncoder(get_config("bagel-7b").ae)
    assert shapes(ae) == read_inventory("ae_keys_real.tsv")


def test_tiny_preset_matches_the_fixture():
    assert load_pretrained(FIXTURE_DIR).config == get_config("tiny")  # token ids come from the tokenizer
    with torch.device("meta"):
        assert shapes(build_model("tiny")) == read_inventory("keys.tsv")


def test_a_fresh_tiny_model_can_run_inference():
    from irg.model import KVCache
    from irg.model.latents import grid_position_ids

    model = build_model("tiny").eval()
    (cache,) = model.prefill_vae_image([KVCache()], [torch.randn(4, 64)], [grid_position_ids(2, 2, 64)])
    assert (cache.length, cache.position) == (6, 1)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'bagel-13b'"):
        build_model("bagel-13b")


@pytest.fixture
def checkpoint_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE_DIR, dst, ignore=shutil.ignore_patterns("golden"))
    dst.chmod(0o755)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_missing_file_is_named(checkpoint_copy):
    (checkpoint_copy / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_pretrained(checkpoint_copy)


def rewrite(path, name, edit):
    from safetensors.torch import load

    tensors = load((path / name).read_bytes())  # not mmapped: the file is rewritten below
    edit(tensors)
    with open(path / name, "wb") as f:
        write_safetensors(f, tensors)


def drop(key):
    return lambda t: t.pop(key)


def put(key, tensor):
    return lambda t: t.__setitem__(key, tensor)


@pytest.mark.parametrize("name, edit, problem", [
    ("ema.safetensors", drop("llm2vae.bias"), "missing keys: llm2vae.bias"),
    ("ema.safetensors", put("extra_head.weight", torch.zeros(2)), "unexpected keys: extra_head.weight"),
    ("ema.safetensors", put("vae2llm.bias", torch.zeros(65)), "shape mismatches: vae2llm.bias: checkpoint (65,) vs "
                                                               "model (64,)"),
    ("ae.safetensors", drop("decoder.conv_out.bias"), "missing keys: decoder.conv_out.bias"),
    ("ae.safetensors", put("decoder.extra.bias", torch.zeros(3)), "unexpected keys: decoder.extra.bias"),
    ("ae.safetensors", put("encoder.conv_in.weight", torch.zeros(32, 4, 3, 3)),
     "shape mismatches: encoder.conv_in.weight: checkpoint (32, 4, 3, 3) vs model (32, 3, 3, 3)"),
], ids=["ema-missing", "ema-unexpected", "ema-shape", "ae-missing", "ae-unexpected", "ae-shape"])
def test_loading_is_strict_and_names_the_one_bad_key(checkpoint_copy, name, edit, problem):
    """One key too few, one too many or one of the wrong shape fails the load, and the error names that key
    (and only that problem): nothing is silently skipped, left random or broadcast."""
    rewrite(checkpoint_copy, name, edit)
    uri = str(checkpoint_copy / name)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(checkpoint_copy)
    assert str(info.value) == f"{uri} does not match the model: {problem}"


def test_missing_tokenizer_is_named(checkpoint_copy):
    for name in ("tokenizer.json", "vocab.json"):
        (checkpoint_copy / name).unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        read_config(checkpoint_copy)


def test_corrupt_safetensors_is_named(checkpoint_copy):
    (checkpoint_copy / "ema.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="ema.safetensors: not a safetensors file"):
        load_pretrained(checkpoint_copy)


def test_save_then_load_round_trips_every_tensor(tmp_path):
    original = load_pretrained(FIXTURE_DIR)
    save_pretrained(tmp_path / "saved", original.model, original.autoencoder, original.tokenizer)
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    for required in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json"):
        assert required in names
    # The official files keep their conventions: the ViT file counts the dropped last layer.
    assert json.loads((tmp_path / "saved" / "vit_config.json").read_text())["num_hidden_layers"] == 3
    reloaded = load_pretrained(tmp_path / "saved")
    assert reloaded.config == original.config
    for a, b in ((original.model, reloaded.model), (original.autoencoder, reloaded.autoencoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    ids = original.tokenizer.encode("three red apples", add_special_tokens=False)
    assert reloaded.tokenizer.encode("three red apples", add_special_tokens=False) == ids


def test_bf16_load_casts_weights():
    pretrained = load_pretrained(FIXTURE_DIR, dtype=torch.bfloat16)
    assert {p.dtype for p in pretrained.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pretrained.autoencoder.parameters()} == {torch.bfloat16}


def test_vit_tokens_enter_the_llm_like_the_reference():
    components, _ = load_golden("components")
    turn2, _ = load_golden("irg_turn2")
    model = load_pretrained(FIXTURE_DIR).model
    with torch.no_grad():
        embeds = model.embed_vit(turn2["vit_patches"], turn2["vit_position_ids"], [16])
    torch.testing.assert_close(embeds, components["vit_llm_embeds"], atol=1e-4, rtol=0)
