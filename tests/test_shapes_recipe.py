"""The shapes model's own pieces: its tokenizer, preset, autoencoder data and calibration, initialisation."""

import random

import pytest
import torch

from irg.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from irg.model import AutoEncoder, build_model
from irg.model.config import shapes_config
from irg.train.autoencoder import AETrainConfig, calibrate, render_batch
from irg.train.shapes_recipe import SHAPES_SYSTEM_PROMPT, corpus, init_weights


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus(200, seed=0), vocab_size=600)


def test_tokenizer_round_trips_world_text_and_has_qwen_special_tokens_after_its_vocabulary(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = next(t for t in corpus(3, seed=1) if t.startswith("<think> The previous image"))
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded.encode(text, add_special_tokens=False)
    assert loaded.decode(ids) == text
    assert len(ids) < len(text.split()) * 1.6  # world words are whole tokens, mostly
    special = loaded.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert special == list(range(special[0], special[0] + len(SPECIAL_TOKENS)))
    assert special[-1] == len(loaded) - 1
    wrapped = loaded.encode("<|im_start|>a red circle<|im_end|>", add_special_tokens=False)
    assert wrapped[0] == special[1] and wrapped[-1] == special[2]


def test_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a red circle"], vocab_size=100)


def test_shapes_preset_is_an_8x8_token_model_of_64px_images():
    config = shapes_config()
    assert config.vae_transform == (64, 64, 8)
    assert config.vit_transform == (64, 64, 8)
    assert 2 ** (len(config.ae.ch_mult) - 1) == config.ae.downsample
    with torch.device("meta"):
        model = build_model(config)
    assert 5e6 < sum(p.numel() for p in model.parameters()) < 3e7  # ships in a few tens of MB


def test_system_prompt_is_short_and_in_the_tokenizers_corpus(tokenizer):
    assert len(tokenizer.encode(SHAPES_SYSTEM_PROMPT, add_special_tokens=False)) < 60


def test_render_batch_is_normalised_renders_and_calibration_gives_unit_latents():
    pixels = render_batch(random.Random(0), 6, 64)
    assert pixels.shape == (6, 3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.8  # the light background
    cfg = AETrainConfig(ae=shapes_config().ae, eval_images=16)
    torch.manual_seed(0)
    autoencoder = AutoEncoder(cfg.ae)
    calibrate(autoencoder, cfg)
    same_renders = render_batch(random.Random("calibrate:0"), 16, 64)
    with torch.no_grad():
        z = autoencoder.encode(same_renders, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert autoencoder.config.scale_factor == pytest.approx(autoencoder.scale_factor, rel=1e-4)


def test_init_weights_is_seeded_small_normal():
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Embedding(100, 256))
    init_weights(layer, std=0.02, seed=3)
    first = layer[0].weight.clone()
    assert abs(float(layer[0].weight.std()) - 0.02) < 1e-3 and float(layer[0].bias.abs().sum()) == 0
    init_weights(layer, std=0.02, seed=3)
    assert torch.equal(first, layer[0].weight)
