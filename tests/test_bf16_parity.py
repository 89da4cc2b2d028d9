"""The goldens in bfloat16: on CUDA (skipped without a GPU) and on CPU, which checks the same code path.

bf16 cannot meet the float32 tolerances of the fixture README, so these compare relative errors:
``‖ours − golden‖ / ‖golden‖`` per tensor, under the bounds below, and uint8 images by mean error.
"""

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, golden_batch, load_case, load_golden
from PIL import Image

from irg.model import load_pretrained
from irg.pipeline import IRGPipeline

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]

VELOCITY_REL = 0.05  # per denoising step
LATENT_REL = 0.05
LOSS_REL = 0.02
IMAGE_MEAN_ABS = 4.0  # uint8 levels
CASE = load_case()["case"]


def rel_error(ours: torch.Tensor, golden: torch.Tensor) -> float:
    ours, golden = ours.float().cpu(), golden.float()
    return ((ours - golden).norm() / golden.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_turn1_and_turn2_in_bf16(device):
    pipe = IRGPipeline.from_pretrained(FIXTURE_DIR, device=device, dtype=torch.bfloat16)
    g1, _ = load_golden("t2i_turn1_steps8")
    g2, _ = load_golden("irg_turn2")
    image1 = Image.fromarray(g2["image1_uint8"].numpy())
    small = dict(vae_transform=tuple(CASE["vae_transform"]), vit_transform=tuple(CASE["vit_transform"]))
    steps = []
    out1 = pipe(CASE["user_prompt"], height=64, width=64, num_steps=8, rounds=1, think_texts=[CASE["think1"]],
                init_noise=[g1["init_noise"]], callback=lambda e: e.kind == "step" and steps.append(e.detail), **small)
    assert len(steps) == len(g1["step_v_cond"])  # else the loop below checks nothing
    for i, s in enumerate(steps):
        assert rel_error(s.v_cond[0], g1["step_v_cond"][i]) < VELOCITY_REL
    assert rel_error(out1.latents[0], g1["final_latent_packed"]) < LATENT_REL
    assert np.abs(np.asarray(out1.images[0], dtype=float) - g1["image_uint8"].numpy()).mean() < IMAGE_MEAN_ABS

    steps.clear()
    out2 = pipe(CASE["user_prompt"], height=64, width=64, num_steps=4, rounds=2, images=[image1],
                think_texts=[CASE["think1"], CASE["think2"]], init_noise=[None, g2["init_noise"]],
                vae_encode_noise=[g2["vae_encode_noise"]],
                callback=lambda e: e.kind == "step" and steps.append(e.detail), **small)
    assert len(steps) == len(g2["step_v_cond"])
    for i, s in enumerate(steps):
        assert rel_error(s.v_cond[0], g2["step_v_cond"][i]) < VELOCITY_REL
        assert rel_error(s.v_img[0], g2["step_v_cfg_img"][i]) < VELOCITY_REL
    assert rel_error(out2.latents[1], g2["final_latent_packed"]) < LATENT_REL


@pytest.mark.parametrize("device", DEVICES)
def test_training_forward_in_bf16(device):
    tensors, meta = load_golden("train_forward")
    pretrained = load_pretrained(FIXTURE_DIR, device=device, dtype=torch.bfloat16)
    batch = golden_batch(tensors, meta).to(device)
    with torch.no_grad():
        out = pretrained.model(batch, tensors["padded_latent"].to(device), noise=tensors["forward_noise"].to(device))
    ce = out.ce_per_token.sum().item() / meta["num_ce_tokens"]
    mse = out.mse_per_element.mean(-1).sum().item() / meta["num_mse_tokens"]
    assert ce == pytest.approx(meta["ce_loss"], rel=LOSS_REL)
    assert mse == pytest.approx(meta["mse_loss"], rel=LOSS_REL)
