"""Training pieces without a cluster: config files, the sharded EMA, loss reduction, idle branches, FLOPs."""

import os

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, REPO, golden_batch, load_golden

from irg.data.format import STAGE_WEIGHTS
from irg.data.sequence import PreprocessConfig, SpecialTokens, TextPart, build_sample, pack
from irg.model import load_pretrained
from irg.train.config import TrainConfig, load_config
from irg.train.ema import ShardedEMA, assemble
from irg.train.step import reduce_losses, training_flops

TINY_CONFIG = str(REPO / "jobs" / "configs" / "tiny.yaml")
BAGEL_CONFIG = str(REPO / "jobs" / "configs" / "bagel-7b.yaml")


def test_stage_entries_and_overrides_layer_over_the_shared_settings():
    one = load_config(TINY_CONFIG, 1)
    two = load_config(TINY_CONFIG, 2, ["deepspeed.zero_stage=3", "optim.betas=[0.8, 0.9]", "run.name=exp"])
    assert one.data.weights == STAGE_WEIGHTS[1] and two.data.weights == STAGE_WEIGHTS[2]
    assert one.optim.warmup_steps == 5 and two.optim.warmup_steps == 0  # from stages.2
    assert one.deepspeed.zero_stage == 2 and two.deepspeed.zero_stage == 3
    assert two.optim.betas == (0.8, 0.9) and two.run_name == "exp-stage2"
    assert isinstance(two.data.preprocess, PreprocessConfig) and two.data.preprocess.vae_transform == (64, 32, 16)
    assert TrainConfig.from_dict(two.to_dict()) == two  # what travels to the workers
    assert two.flat()["deepspeed.zero_stage"] == "3"


def test_the_paper_config_keeps_the_reference_recipe():
    config = load_config(BAGEL_CONFIG, 2)
    assert (config.optim.lr, config.optim.betas, config.optim.eps) == (2e-5, (0.9, 0.95), 1e-15)
    assert (config.optim.grad_clip, config.optim.ema_decay, config.model.timestep_shift) == (1.0, 0.995, 4.0)
    assert config.model.dtype == "bfloat16" and config.scaling.use_gpu
    assert load_config(BAGEL_CONFIG, 1).optim.warmup_steps == 500
    assert load_config(TINY_CONFIG, 1, ["model.dtype=bf16"]).model.torch_dtype is torch.bfloat16


@pytest.mark.parametrize("override, message", [
    (["optim.learning_rate=1"], "unknown setting optim.learning_rate"),
    (["model.dtype=float16"], "model.dtype: training runs in float32 or bfloat16"),
    (["model.dtype=fp64"], "model.dtype: unknown dtype 'fp64'"),
    (["run.max_steps=0"], "run.max_steps must be >= 1"),
    (["nonsense"], "not of the form"),
])
def test_bad_settings_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY_CONFIG, 1, override)


def _toy_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    model[1].bias.requires_grad_(False)  # a frozen parameter is carried, never averaged
    return model


def test_ema_shards_of_any_world_size_assemble_into_the_averaged_model():
    model = _toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    world = 3  # 7*5=35 weights: chunks of 12, 12 and 11; 3 biases: 1 each
    emas = [ShardedEMA(model, decay=0.9, rank=r, world_size=world) for r in range(world)]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    for ema in emas:
        ema.update()
    full = assemble([e.state_dict() for e in reversed(emas)])
    for name, value in full.items():
        moved = model.get_parameter(name).requires_grad
        expected = before[name] + (0.1 if moved else 0.0)  # 0.9 * old + 0.1 * (old + 1)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match=r"ranks \[1\]"):
        assemble([emas[0].state_dict(), emas[2].state_dict()])
    with pytest.raises(ValueError, match="same number of workers"):
        ShardedEMA(model, 0.9, 0, 2).load_state_dict(emas[0].state_dict())


def test_the_loss_reduction_is_the_reference_one_on_a_single_rank():
    tensors, meta = load_golden("train_forward")
    model = load_pretrained(FIXTURE_DIR).model
    with torch.no_grad():
        out = model(golden_batch(tensors, meta), tensors["padded_latent"], noise=tensors["forward_noise"])
    loss, (ce, mse) = reduce_losses(out, 1, 1.0, 1.0, torch.device("cpu"))
    assert ce == pytest.approx(meta["ce_loss"], rel=1e-5) and mse == pytest.approx(meta["mse_loss"], rel=1e-5)
    assert loss.item() == pytest.approx(meta["total_loss"], rel=1e-5)


def test_a_text_only_batch_still_gives_every_trainable_parameter_a_gradient():
    """A rank whose batch has no image would otherwise skip the ViT, latent path and generation expert,
    and DeepSpeed's per-parameter gradient reduction would fall out of step with the other ranks."""
    pretrained = load_pretrained(FIXTURE_DIR)
    model = pretrained.model.train()
    special = SpecialTokens.from_tokenizer(pretrained.tokenizer)
    parts = [TextPart("a red cube on the left", loss=False), TextPart("I will draw it now.", loss=True)]
    sample = build_sample(parts, pretrained.tokenizer, PreprocessConfig(text_cond_dropout=0.0), pretrained.config,
                          np.random.default_rng(0))
    batch = pack([sample], special)
    assert not batch.has_vit and not batch.has_latents

    out = model(batch, cover_idle_branches=True)
    assert out.idle_branches.item() == 0.0
    loss, (ce, mse) = reduce_losses(out, 1, 1.0, 1.0, torch.device("cpu"))
    assert ce > 0 and mse is None  # no latent token: no MSE value at all, rather than a fake 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_the_flop_count_matches_the_model_it_describes():
    """6 x (weights one token passes through) per token, checked against the tiny model's own modules."""
    tensors, meta = load_golden("train_forward")
    model = load_pretrained(FIXTURE_DIR).model
    batch = golden_batch(tensors, meta)
    llm = model.language_model.model
    per_token = sum(m.weight.numel() for layer in llm.layers
                    for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                              layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    c = model.config
    attention = 12 * c.llm.num_hidden_layers * c.llm.hidden_size * sum(n * n for n in batch.sample_lens)
    head = 6 * model.language_model.lm_head.weight.numel() * batch.ce_loss_indexes.numel()
    without_vit = 6 * per_token * batch.sequence_length + attention + head
    with_frozen_vit = training_flops(c, batch, vit_trainable=False)
    with_vit = training_flops(c, batch, vit_trainable=True)
    vit_forward = with_frozen_vit - without_vit
    assert vit_forward > 0
    assert with_vit - without_vit == pytest.approx(3 * vit_forward)
    vit_weights = sum(p.numel() for n, p in model.vit_model.named_parameters() if n.endswith("weight") and p.dim() == 2
                      and "position_embedding" not in n) + sum(p.numel() for p in (model.connector.fc1.weight,
                                                                            model.connector.fc2.weight))
    vit_tokens = batch.packed_vit_tokens.shape[0]
    vit_attention = 4 * c.vit.num_hidden_layers * c.vit.hidden_size * sum(
        n * n for n in batch.vit_token_seqlens.tolist())
    assert vit_forward == pytest.approx(2 * vit_weights * vit_tokens + vit_attention)


def test_freezing_options_leave_only_the_chosen_parts_trainable():
    from irg.train.engine import prepare_model

    config = load_config(TINY_CONFIG, 1, ["model.freeze_vit=true", "model.freeze_und=true",
                                          "model.activation_checkpointing=true", "model.timestep_shift=3.0"])
    model = prepare_model(load_pretrained(FIXTURE_DIR).model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vit_model.") for n in trainable)
    llm = {n for n in trainable if n.startswith("language_model.")}
    assert llm and all("moe_gen" in n for n in llm)  # only the generation expert of the LLM
    assert "vae2llm.weight" in trainable and "connector.fc1.weight" in trainable
    assert model.language_model.model.gradient_checkpointing and model.training
    assert model.config.timestep_shift == 3.0


@pytest.mark.integration  # a subprocess run of jobs/train.py (about 12 s each)
@pytest.mark.parametrize("setting, message", [
    ("data.root=/nonexistent/irgl", "no rows to train on"),
    ("model.checkpoint=/nonexistent/ckpt", "has no llm_config.json"),
    ("optim.learnin_rate=1", "unknown setting optim.learnin_rate"),
])
def test_the_job_refuses_bad_input_before_starting_a_cluster(setting, message, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "IRG_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    # From the repository root, as users run it: the config's model.checkpoint is a repository path.
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--stage", "1", "--config", TINY_CONFIG,
                           "--set", f"run.storage={tmp_path}/runs", "--set", setting],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr


def test_timestep_sampling_is_logit_normal_or_uniform_and_clean_images_stay_at_zero():
    from irg.model.latents import sample_timesteps
    from irg.train.config import ConfigError, TrainConfig

    draws = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    uniform, logit_normal = sample_timesteps(draws, "uniform"), sample_timesteps(draws, "logit_normal")
    for share in (0.1, 0.5, 0.9):  # uniform: P(t < q) = q; logit-normal puts less mass near the ends
        assert abs((uniform < share).float().mean().item() - share) < 0.01
    assert (logit_normal < 0.1).float().mean().item() < 0.05
    clean = torch.tensor([float("-inf")])
    assert sample_timesteps(clean, "uniform").item() == sample_timesteps(clean, "logit_normal").item() == 0.0
    with pytest.raises(ConfigError, match="timestep_sampling"):
        TrainConfig.from_dict({"model": {"timestep_sampling": "cosine"}})
