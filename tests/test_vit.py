"""Image preprocessing, SigLIP tower and connector against the reference goldens (float32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURE_DIR, load_golden
from PIL import Image
from safetensors.torch import load_file

from irg.model.config import ViTConfig
from irg.model.vit import MLPConnector, SiglipVisionTower
from irg.transforms import ImageTransform, patchify_image


@pytest.fixture(scope="module")
def turn2():
    return load_golden("irg_turn2")[0]


@pytest.fixture(scope="module")
def components():
    return load_golden("components")[0]


@pytest.fixture(scope="module")
def tiny_vit():
    """Tower and connector of the tiny checkpoint, loaded strictly."""
    config = ViTConfig.from_hf_dict(json.loads((FIXTURE_DIR / "vit_config.json").read_text()))
    tower, connector = SiglipVisionTower(config), MLPConnector(32, 64)
    state = load_file(str(FIXTURE_DIR / "ema.safetensors"))
    for module, prefix in ((tower, "vit_model."), (connector, "connector.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return tower.eval(), connector.eval()


def test_image_transforms_match_reference(turn2):
    image = Image.fromarray(turn2["image1_uint8"].numpy())
    vit_image = ImageTransform(56, 28, 14)(image)
    assert vit_image.dtype == torch.float32 and vit_image.shape == (3, 56, 56)
    torch.testing.assert_close(vit_image, turn2["vit_input_image"], atol=1e-6, rtol=0)
    vae_image = ImageTransform(64, 32, 16)(image)
    torch.testing.assert_close(vae_image, turn2["vae_input_image"][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "transform, size, expected",
    [
        ((1024, 512, 16), (1024, 1024), (1024, 1024)),
        ((980, 224, 14), (1024, 1024), (980, 980)),
        ((1024, 512, 16), (512, 768), (512, 768)),
        ((980, 224, 14), (512, 768), (518, 770)),  # sides snapped to the nearest multiple of 14
        ((1024, 512, 16), (2048, 1024), (1024, 512)),  # long side capped
        ((1024, 512, 16), (300, 200), (768, 512)),  # short side raised to min_size
        ((56, 28, 14), (64, 64), (56, 56)),
        ((64, 32, 16), (100, 40), (64, 32)),  # min_size gives 80x32, the final long-side cap 64x32
    ],
)
def test_target_size(transform, size, expected):
    assert ImageTransform(*transform).target_size(*size) == expected


def test_image_transform_modes_and_bad_images():
    assert ImageTransform(64, 32, 16)(Image.new("L", (32, 48), 255)).equal(torch.ones(3, 48, 32))
    with pytest.raises(ValueError, match="cannot convert image of mode 'La' to RGB"):
        ImageTransform(64, 32, 16)(Image.new("La", (32, 32)))
    with pytest.raises(ValueError, match="zero size"):
        ImageTransform(64, 32, 16)(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="PIL image"):
        ImageTransform(64, 32, 16)(torch.zeros(3, 8, 8))


def test_patchify_matches_reference(turn2):
    patches, position_ids = patchify_image(turn2["vit_input_image"], 14, 70)
    assert torch.equal(patches, turn2["vit_patches"])
    assert torch.equal(position_ids, turn2["vit_position_ids"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify_image(torch.zeros(3, 20, 28), 14, 70)


def test_tower_and_connector_match_reference(tiny_vit, turn2, components):
    tower, connector = tiny_vit
    with torch.no_grad():
        features = tower(turn2["vit_patches"], turn2["vit_position_ids"], [16])
        tokens = connector(features)
    torch.testing.assert_close(features, components["vit_siglip_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens, components["vit_connector_out"], atol=1e-4, rtol=0)


def test_packed_images_do_not_attend_to_each_other(tiny_vit, turn2):
    tower, _ = tiny_vit
    a_patches, a_ids = turn2["vit_patches"], turn2["vit_position_ids"]
    # A second, non-square image (2x3 patches) with different content.
    b_image = torch.rand(3, 28, 42, generator=torch.Generator().manual_seed(0)) * 2 - 1
    b_patches, b_ids = patchify_image(b_image, 14, 70)
    with torch.no_grad():
        alone = torch.cat([tower(a_patches, a_ids, [16]), tower(b_patches, b_ids, [6])])
        packed = tower(torch.cat([a_patches, b_patches]), torch.cat([a_ids, b_ids]), torch.tensor([16, 6]))
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)  # only GEMM rounding differs


def test_real_key_inventory_on_meta_device():
    lines = (FIXTURE_DIR / "keys_real_7b.tsv").read_text().splitlines()
    assert lines[0].startswith("#") and lines[1].split("\t") == ["key", "shape", "formula"]
    expected = {}
    for line in lines[2:]:
        key, shape, _ = line.split("\t")
        if key.startswith("vit_model."):
            expected[key] = json.loads(shape)
    with torch.device("meta"):
        tower = SiglipVisionTower(ViTConfig())
    actual = {f"vit_model.{k}": list(v.shape) for k, v in tower.state_dict().items()}
    assert actual == expected
