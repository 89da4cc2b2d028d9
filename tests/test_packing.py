"""Rows -> samples -> packed batch: exact parity with the reference's packed training batch."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURE_DIR, golden_batch, load_golden

from irg.data.format import parse_conversation
from irg.data.sequence import PreprocessConfig, SpecialTokens, VaeItem, attention_mask, build_sample, pack
from irg.model import load_pretrained
from irg.model.config import tiny_config

FIXTURE_CONFIG = PreprocessConfig(vae_transform=(64, 32, 16), vit_transform=(56, 28, 14),
                                  text_cond_dropout=0.0, vae_cond_dropout=0.0, vit_cond_dropout=0.0)


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained(FIXTURE_DIR)


def target_timesteps(batch) -> list[float]:
    """The reference's raw timestep of each generation target, in packing order."""
    noised = batch.packed_timesteps[torch.isfinite(batch.packed_timesteps)]
    return torch.unique_consecutive(noised).tolist()


def fixture_samples(tokenizer, raw_timesteps):
    samples = []
    for mode, raw_t in zip(("initial_full_learning", "improving_full_learning"), raw_timesteps):
        table = pq.read_table(FIXTURE_DIR / "golden" / "train_data" / mode / "part-0.parquet")
        parts = parse_conversation(table.column("conversation")[0].as_py())
        sample = build_sample(parts, tokenizer, FIXTURE_CONFIG, tiny_config(), np.random.default_rng(0))
        # The reference drew the targets' raw timesteps from numpy's global state; use its draws.
        sample.items = [dataclasses.replace(i, raw_timestep=raw_t) if isinstance(i, VaeItem) and i.loss else i
                        for i in sample.items]
        samples.append(sample)
    return samples


def test_fixture_rows_pack_into_the_reference_batch(pretrained):
    tensors, meta = load_golden("train_forward")
    expected = golden_batch(tensors, meta)
    samples = fixture_samples(pretrained.tokenizer, target_timesteps(expected))
    assert [s.num_tokens for s in samples] == meta["sample_lens"]
    batch = pack(samples, SpecialTokens.from_tokenizer(pretrained.tokenizer))

    assert batch.sequence_length == expected.sequence_length
    assert batch.sample_lens == expected.sample_lens
    assert batch.patchified_vae_latent_shapes == expected.patchified_vae_latent_shapes
    for name in ("packed_text_ids", "packed_text_indexes", "packed_position_ids", "packed_latent_position_ids",
                 "packed_vae_token_indexes", "mse_loss_indexes", "packed_vit_position_ids",
                 "packed_vit_token_indexes", "vit_token_seqlens", "ce_loss_indexes", "packed_label_ids"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name
    assert len(batch.attention_masks) == len(expected.attention_masks)
    for ours, reference in zip(batch.attention_masks, expected.attention_masks):
        assert torch.equal(ours, reference == 0)  # reference masks are additive: 0 attend, -inf blocked
    torch.testing.assert_close(batch.packed_timesteps, expected.packed_timesteps, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.padded_images, expected.padded_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.packed_vit_tokens, expected.packed_vit_tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.ce_loss_weights, expected.ce_loss_weights, atol=1e-6, rtol=0)


def test_model_loss_on_our_batch_equals_the_reference_losses(pretrained):
    tensors, meta = load_golden("train_forward")
    samples = fixture_samples(pretrained.tokenizer, target_timesteps(golden_batch(tensors, meta)))
    batch = pack(samples, SpecialTokens.from_tokenizer(pretrained.tokenizer))
    with torch.no_grad():
        latent = pretrained.autoencoder.encode(batch.padded_images, noise=tensors["vae_encode_noise"])
        out = pretrained.model(batch, latent, noise=tensors["forward_noise"])
    ce = out.ce_per_token.sum().item() / meta["num_ce_tokens"]
    mse = out.mse_per_element.mean(-1).sum().item() / meta["num_mse_tokens"]
    assert ce == pytest.approx(meta["ce_loss"], rel=1e-5)
    assert mse == pytest.approx(meta["mse_loss"], rel=1e-5)


def test_dropped_conditions_keep_their_rope_position(pretrained):
    """With every condition dropped, the improving sample loses its image-1 copies (and only those)."""
    table = pq.read_table(FIXTURE_DIR / "golden" / "train_data" / "improving_full_learning" / "part-0.parquet")
    parts = parse_conversation(table.column("conversation")[0].as_py())
    config = dataclasses.replace(FIXTURE_CONFIG, vae_cond_dropout=1.0, vit_cond_dropout=1.0)
    sample = build_sample(parts, pretrained.tokenizer, config, pretrained.config, np.random.default_rng(0))
    batch = pack([sample], SpecialTokens.from_tokenizer(pretrained.tokenizer))
    assert batch.packed_vit_tokens is None and len(batch.patchified_vae_latent_shapes) == 1
    full = pack([build_sample(parts, pretrained.tokenizer, FIXTURE_CONFIG, pretrained.config,
                                np.random.default_rng(0))],
                SpecialTokens.from_tokenizer(pretrained.tokenizer))
    # The reflection starts where it would with both image blocks present (each takes one position).
    assert batch.packed_position_ids[-18].item() == full.packed_position_ids[-18].item()
    assert batch.sequence_length == full.sequence_length - 36


def test_text_dropout_removes_spans_without_moving_positions(pretrained):
    parts = parse_conversation('[{"role": "user", "content": "a"}, {"role": "assistant", "content": '
                               '[{"type": "text", "content": "b c", "need_loss": true}]}]')
    config = dataclasses.replace(FIXTURE_CONFIG, text_cond_dropout=1.0)
    assert build_sample(parts, pretrained.tokenizer, config, pretrained.config, np.random.default_rng(0)).items == []


def test_attention_mask_rules():
    mask = attention_mask([(2, "causal"), (3, "noise"), (1, "causal")])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],  # the noised image is invisible to later tokens
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
