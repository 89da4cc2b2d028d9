"""FLUX autoencoder against the key inventories and the reference's golden outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURE_DIR, load_golden
from safetensors.torch import load_file

from irg.model.autoencoder import AutoEncoder
from irg.model.config import AEConfig

ATOL = 1e-4


def tiny_ae_config() -> AEConfig:
    with open(FIXTURE_DIR / "ae_config.json") as f:
        return AEConfig(**json.load(f))


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    ae = AutoEncoder(tiny_ae_config())
    ae.load_state_dict(load_file(str(FIXTURE_DIR / "ae.safetensors")), strict=True)
    return ae.eval()


def read_key_inventory(name: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from a ``key <TAB> shape <TAB> formula`` file (comment line and header skipped)."""
    shapes = {}
    with open(FIXTURE_DIR / name) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, _formula = line.rstrip("\n").split("\t")
            if key == "key":
                continue
            shapes[key] = tuple(json.loads(shape))
    return shapes


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    max_diff = (actual - expected).abs().max().item()
    assert max_diff <= atol, f"max abs diff {max_diff:.3g} > {atol}"


@pytest.mark.parametrize(
    "config, inventory",
    [(AEConfig(), "ae_keys_real.tsv"), (tiny_ae_config(), "ae_keys.tsv")],
    ids=["real_flux", "tiny"],
)
def test_state_dict_keys_and_shapes(config, inventory):
    with torch.device("meta"):
        ae = AutoEncoder(config)
    actual = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert actual == read_key_inventory(inventory)


def test_tiny_checkpoint_fills_every_weight(tiny_ae):
    """Every tensor of the module is the checkpoint's, bit for bit (strictness itself: test_checkpoint.py)."""
    state, stored = tiny_ae.state_dict(), load_file(str(FIXTURE_DIR / "ae.safetensors"))
    assert sorted(state) == sorted(stored) == sorted(read_key_inventory("ae_keys.tsv"))
    for key, value in stored.items():
        assert torch.equal(state[key], value), key


@torch.no_grad()
def test_encoder_moments(tiny_ae):
    turn2, _ = load_golden("irg_turn2")
    components, _ = load_golden("components")
    moments = tiny_ae.encode_moments(turn2["vae_input_image"])
    assert_close(moments, components["vae_encoder_moments"])


@torch.no_grad()
def test_encode_with_recorded_noise(tiny_ae):
    turn2, _ = load_golden("irg_turn2")
    latent = tiny_ae.encode(turn2["vae_input_image"], noise=turn2["vae_encode_noise"])
    assert_close(latent, turn2["vae_encoded_latent"])


@torch.no_grad()
def test_encode_training_batch(tiny_ae):
    train, _ = load_golden("train_forward")
    latent = tiny_ae.encode(train["batch_padded_images"], noise=train["vae_encode_noise"])
    assert_close(latent, train["padded_latent"])


@torch.no_grad()
def test_encode_samples_from_generator(tiny_ae):
    """Without explicit noise the sample is drawn from ``generator``: same seed, same latent."""
    turn2, _ = load_golden("irg_turn2")
    image = turn2["vae_input_image"]
    first = tiny_ae.encode(image, generator=torch.Generator().manual_seed(0))
    second = tiny_ae.encode(image, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    noise = torch.randn(first.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, tiny_ae.encode(image, noise=noise), rtol=0, atol=0)


@pytest.mark.parametrize("golden", ["t2i_turn1_steps4", "t2i_turn1_steps8", "irg_turn2"])
@torch.no_grad()
def test_decode(tiny_ae, golden):
    tensors, _ = load_golden(golden)
    assert_close(tiny_ae.decode(tensors["final_latent"]), tensors["decoded_image"])
