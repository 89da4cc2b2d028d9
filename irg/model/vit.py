"""SigLIP NaViT vision tower and the MLP connector that maps its features into the LLM.

BAGEL feeds SigLIP images at their native aspect ratio: the patches of several images are packed
into one sequence, each image attends only to itself, and patch positions index a learned table laid
out on a fixed ``image_size // patch_size`` grid (``r * 70 + c`` for so400m/14 at 980 px). The
module tree mirrors the checkpoint (``vit_model.vision_model.*``, ``connector.*``) so state dicts
load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from irg.model.config import ViTConfig


class GeluMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))): SigLIP's MLP and, with hidden == out, BAGEL's connector."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MLPConnector(GeluMLP):
    """ViT features -> LLM hidden size (``connector.fc1``, ``connector.fc2`` in the checkpoint)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, out_features)


class SiglipAttention(nn.Module):
    """Multi-head self-attention restricted to each image of a packed sequence."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n, d = x.shape
        # [heads, N, head_dim], split per image along N.
        q, k, v = (
            proj(x).view(n, self.num_heads, -1).transpose(0, 1).split(seqlens, dim=1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        # One dense attention per image: exact, and O(sum n_i^2) instead of a block mask's O(N^2). The
        # inputs are 4-D because SDPA's fused kernels accept nothing else.
        out = torch.cat(
            [F.scaled_dot_product_attention(qi[None], ki[None], vi[None])[0] for qi, ki, vi in zip(q, k, v)], dim=1
        )
        return self.out_proj(out.transpose(0, 1).reshape(n, d))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm transformer block; key names follow HF SigLIP."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GeluMLP(config.hidden_size, config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    """Packed patches of several images -> per-patch features after ``post_layernorm``.

    ``num_hidden_layers`` layers are built (BAGEL drops SigLIP's last one) and there is no pooling
    head: the LLM consumes every patch token.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        grid = config.image_size // config.patch_size
        self.vision_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                patch_embedding=nn.Linear(config.num_channels * config.patch_size**2, d),
                position_embedding=nn.Embedding(grid * grid, d),
            )),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)),
            )),
            post_layernorm=nn.LayerNorm(d, eps=config.layer_norm_eps),
        ))

    def forward(
        self, packed_patches: torch.Tensor, position_ids: torch.Tensor, seqlens: Sequence[int] | torch.Tensor
    ) -> torch.Tensor:
        """packed_patches [N, C*p*p] (see ``irg.transforms.patchify_image``), position_ids [N],
        seqlens: tokens per image, summing to N. Returns [N, hidden_size]."""
        seqlens = [int(s) for s in (seqlens.tolist() if isinstance(seqlens, torch.Tensor) else seqlens)]
        if sum(seqlens) != packed_patches.shape[0]:
            raise ValueError(f"seqlens sum to {sum(seqlens)}, not to the {packed_patches.shape[0]} patches")
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(packed_patches) + vm.embeddings.position_embedding(position_ids)
        for layer in vm.encoder.layers:
            x = layer(x, seqlens)
        return vm.post_layernorm(x)
