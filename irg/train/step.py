"""One optimisation step on a packed batch, and the FLOP count behind MFU.

Shared by the Ray Train worker loop and ``benchmarks/train_step.py`` (which runs without Ray), so the
number a benchmark prints is the step the cluster runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from irg.model import AutoEncoder, BagelConfig, PackedBatch

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs we run on, by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


@dataclass
class StepResult:
    loss: float
    loss_ce: float | None  # mean over every CE token of every rank; None when no rank had one
    loss_mse: float | None  # mean over every noised latent token of every rank; None when no rank had one
    grad_norm: float
    lr: float  # the learning rate this step used
    tokens: int  # this worker's packed tokens
    flops: float  # this worker's model FLOPs for forward + backward
    seconds: float


def reduce_losses(out, world_size: int, ce_weight: float, mse_weight: float,
                  device) -> tuple[torch.Tensor, list[float]]:
    """The reference reduction: token-weighted means over all ranks, scaled so that DeepSpeed's
    gradient averaging over ranks turns them into the global means. Returns the loss to backpropagate
    and the global (ce, mse) means for logging (None where no rank had such a token)."""
    zero = torch.zeros((), device=device)
    ce_sum = out.ce_per_token.sum() if out.ce_per_token is not None else zero
    mse_sum = out.mse_per_element.mean(dim=-1).sum() if out.mse_per_element is not None else zero
    counts = torch.tensor([
        ce_sum.item(), mse_sum.item(),
        0 if out.ce_per_token is None else out.ce_per_token.numel(),
        0 if out.mse_per_element is None else out.mse_per_element.shape[0],
    ], device=device, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(counts)
    total_ce, total_mse, ce_tokens, mse_tokens = counts.tolist()
    ce = ce_sum * world_size / max(ce_tokens, 1.0)
    mse = mse_sum * world_size / max(mse_tokens, 1.0)
    loss = ce_weight * ce + mse_weight * mse
    if out.idle_branches is not None:
        loss = loss + out.idle_branches
    return loss, [total_ce / ce_tokens if ce_tokens else None, total_mse / mse_tokens if mse_tokens else None]


def train_step(engine, autoencoder: AutoEncoder, batch: PackedBatch, config: BagelConfig, world_size: int,
               ce_weight: float = 1.0, mse_weight: float = 1.0, vit_trainable: bool = True) -> StepResult:
    """Forward, backward and optimizer step of a DeepSpeed engine on this worker's packed batch."""
    start = time.perf_counter()
    device = engine.device
    batch = batch.to(device)
    padded_latent = None
    if batch.has_latents:
        with torch.no_grad():
            padded_latent = autoencoder.encode(batch.padded_images.to(device, next(autoencoder.parameters()).dtype))
    out = engine(batch, padded_latent, cover_idle_branches=world_size > 1)
    loss, (ce, mse) = reduce_losses(out, world_size, ce_weight, mse_weight, device)
    engine.backward(loss)
    lr = engine.get_lr()[0]
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return StepResult(
        loss=ce_weight * (ce or 0.0) + mse_weight * (mse or 0.0), loss_ce=ce, loss_mse=mse,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=lr,
        tokens=batch.sequence_length, flops=training_flops(config, batch, vit_trainable),
        seconds=time.perf_counter() - start,
    )


def training_flops(config: BagelConfig, batch: PackedBatch, vit_trainable: bool = True) -> float:
    """Model FLOPs of forward + backward on a packed batch (the PaLM MFU convention).

    Matmul weights count 6 FLOPs per token (2 forward, 4 backward), attention 12 * layers * width per
    token pair inside each packed sample, counted dense. Each LLM token uses one expert. The frozen
    autoencoder and, when frozen, the ViT count forward only; embeddings count nothing.
    """
    llm, vit = config.llm, config.vit
    d, kv = llm.hidden_size, llm.num_key_value_heads * llm.head_dim
    per_token = llm.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * llm.intermediate_size)
    tokens = batch.sequence_length
    flops = 6 * per_token * tokens + 12 * llm.num_hidden_layers * d * sum(n * n for n in batch.sample_lens)
    if batch.ce_loss_indexes is not None:
        flops += 6 * d * llm.vocab_size * batch.ce_loss_indexes.numel()
    if batch.has_vit:
        vd = vit.hidden_size
        vit_tokens = batch.packed_vit_tokens.shape[0]
        patch = vit.num_channels * vit.patch_size**2
        vit_per_token = (patch * vd + vit.num_hidden_layers * (4 * vd * vd + 2 * vd * vit.intermediate_size)
                         + vd * d + d * d)  # patch embedding, layers, connector
        vit_attention = 4 * vit.num_hidden_layers * vd * sum(n * n for n in batch.vit_token_seqlens.tolist())
        flops += (3 if vit_trainable else 1) * (2 * vit_per_token * vit_tokens + vit_attention)
    return float(flops)


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one worker's device: configured, a known GPU, or a measured CPU matmul rate."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12 * (1.0 if dtype == torch.bfloat16 else 0.5)
        return float("nan")
    return measured_matmul_flops(dtype)


def measured_matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """What this CPU's threads sustain on a square matmul: the attainable peak on machines without a spec."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)
