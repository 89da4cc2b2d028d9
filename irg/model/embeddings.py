"""Timestep and fixed 2-D position embeddings of image tokens."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f_k) ..., sin(t·f_k) ...] with f_k = max_period^(-k/(dim/2)); t used as is, in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Flow time t -> hidden vector added to every latent token (``time_embedder.mlp``)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def sincos_table_2d(grid_size: int, dim: int) -> np.ndarray:
    """Row r·G + c = [1-D(dim/2, c), 1-D(dim/2, r)]: the first half encodes the column."""
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along the row-major flat index
    return np.concatenate([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], axis=1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


class PositionEmbedding2D(nn.Module):
    """Fixed sin-cos table over a G x G grid, indexed by ``row * G + col``.

    Stored as a frozen parameter because the official checkpoint carries it as ``pos_embed``.
    """

    def __init__(self, grid_size: int, hidden_size: int):
        super().__init__()
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(torch.empty(grid_size * grid_size, hidden_size), requires_grad=False)
        if not self.pos_embed.is_meta:
            self.reset_parameters()

    def reset_parameters(self):
        table = sincos_table_2d(self.grid_size, self.pos_embed.shape[1])
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).float())

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]
