"""One training forward on the reference's packed batch (README §5.5)."""

import pytest
import torch
from conftest import FIXTURE_DIR, golden_batch, load_golden

from irg.model import load_pretrained


@pytest.fixture(scope="module")
def golden():
    return load_golden("train_forward")


def test_training_forward_matches_reference(golden):
    tensors, meta = golden
    pretrained = load_pretrained(FIXTURE_DIR)
    model, ae = pretrained.model, pretrained.autoencoder
    batch = golden_batch(tensors, meta)
    with torch.no_grad():
        padded_latent = ae.encode(batch.padded_images, noise=tensors["vae_encode_noise"])
        torch.testing.assert_close(padded_latent, tensors["padded_latent"], atol=1e-4, rtol=0)
        out = model(batch, padded_latent, noise=tensors["forward_noise"])

    torch.testing.assert_close(out.last_hidden_state, tensors["last_hidden_state"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.ce_logits, tensors["ce_logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(out.ce_per_token, tensors["ce_per_token"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mse_preds, tensors["mse_preds"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mse_per_element, tensors["mse_per_element"], atol=1e-3, rtol=0)

    # The reference loop's reductions on one rank: mean CE over CE tokens, mean over tokens of the
    # per-token channel mean for MSE, weights 1.0 and 1.0.
    ce_loss = out.ce_per_token.sum() / meta["num_ce_tokens"]
    mse_loss = out.mse_per_element.mean(dim=-1).sum() / meta["num_mse_tokens"]
    assert ce_loss.item() == pytest.approx(meta["ce_loss"], rel=1e-5)
    assert mse_loss.item() == pytest.approx(meta["mse_loss"], rel=1e-5)
    assert (ce_loss + mse_loss).item() == pytest.approx(meta["total_loss"], rel=1e-5)


def test_training_forward_backpropagates_into_both_experts(golden):
    tensors, meta = golden
    model = load_pretrained(FIXTURE_DIR).model.train()
    batch = golden_batch(tensors, meta)
    out = model(batch, tensors["padded_latent"], noise=tensors["forward_noise"])
    (out.ce_per_token.mean() + out.mse_per_element.mean()).backward()
    layer = model.language_model.model.layers[0]
    assert layer.mlp.up_proj.weight.grad.abs().sum() > 0
    assert layer.mlp_moe_gen.up_proj.weight.grad.abs().sum() > 0
    assert model.vit_model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.latent_pos_embed.pos_embed.grad is None  # fixed sin-cos table stays frozen


def test_activation_checkpointing_gives_the_same_gradients(golden):
    tensors, meta = golden
    batch = golden_batch(tensors, meta)
    grads = []
    for checkpointing in (False, True):
        model = load_pretrained(FIXTURE_DIR).model.train()
        model.language_model.model.gradient_checkpointing = checkpointing
        out = model(batch, tensors["padded_latent"], noise=tensors["forward_noise"])
        (out.ce_per_token.mean() + out.mse_per_element.mean()).backward()
        grads.append(model.language_model.model.layers[1].self_attn.q_proj_moe_gen.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)
