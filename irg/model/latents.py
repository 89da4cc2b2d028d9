"""Between the autoencoder's latent maps and the LLM's latent tokens (2x2 patches, 64 features)."""

from __future__ import annotations

import torch


def patchify_latent(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, p·h, p·w] -> [h·w, p·p·C]: row-major tokens, each a (row, col, channel) flattened patch."""
    c, height, width = latent.shape
    h, w = height // patch, width // patch
    x = latent[:, : h * patch, : w * patch].reshape(c, h, patch, w, patch)
    return x.permute(1, 3, 2, 4, 0).reshape(h * w, patch * patch * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify_latent`: [h·w, p·p·C] -> [C, p·h, p·w]."""
    c = tokens.shape[1] // (patch * patch)
    x = tokens.reshape(h, w, patch, patch, c).permute(4, 0, 2, 1, 3)
    return x.reshape(c, h * patch, w * patch)


def grid_position_ids(h: int, w: int, max_per_side: int, device=None) -> torch.Tensor:
    """Index into a position table laid out on a fixed ``max_per_side`` grid: ``row * max_per_side + col``
    for an h x w grid of tokens (latent tokens or ViT patches), whatever the image's own width."""
    rows = torch.arange(h, device=device)[:, None] * max_per_side
    return (rows + torch.arange(w, device=device)[None, :]).reshape(-1)


TIMESTEP_SAMPLING = ("logit_normal", "uniform")


def sample_timesteps(draw: torch.Tensor, sampling: str) -> torch.Tensor:
    """Training timesteps in [0, 1] from N(0, 1) draws (-inf: a clean image, t = 0): logit-normal through the
    sigmoid, as the reference samples them, or uniform through the normal CDF."""
    if sampling == "logit_normal":
        return torch.sigmoid(draw)
    if sampling == "uniform":
        return torch.special.ndtr(draw)
    raise ValueError(f"timestep_sampling: expected one of {TIMESTEP_SAMPLING}, got {sampling!r}")


def shift_timesteps(t: torch.Tensor | float, shift: float):
    """Rectified-flow timestep shift s·t / (1 + (s−1)·t): more time at high noise for large images."""
    return shift * t / (1 + (shift - 1) * t)
