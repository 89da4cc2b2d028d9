"""Qwen2 language model with QK-norm and a Mixture-of-Transformers (MoT) split.

Every layer holds two complete sets of weights: the *understanding* expert (text and ViT tokens) and
the *generation* expert (``*_moe_gen``, VAE latent tokens). Routing is by token type, given by the
caller; the self-attention is shared over the whole packed sequence. Key names follow the official
BAGEL checkpoint (``language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from irg.model.attention import LayerKV, PackedAttention, attend
from irg.model.config import LLMConfig


@dataclass
class TokenRouting:
    """Which packed tokens go to the generation expert; all others use the understanding expert.

    ``gen_index`` None means every token is an understanding token (text / ViT only), the common
    case that needs no gather/scatter.
    """

    gen_index: torch.Tensor | None = None
    und_index: torch.Tensor | None = None

    @classmethod
    def from_gen_mask(cls, gen_mask: torch.Tensor, both_experts: bool = False) -> TokenRouting:
        """``both_experts`` runs the generation expert even on no tokens, so that every rank of a
        sharded data-parallel job (DeepSpeed ZeRO-3) calls the same modules in the same order."""
        if not both_experts and not bool(gen_mask.any()):
            return cls()
        return cls(gen_mask.nonzero().squeeze(1), (~gen_mask).nonzero().squeeze(1))

    def apply(self, x: torch.Tensor, und_fn, gen_fn) -> torch.Tensor:
        """Run ``und_fn`` on understanding tokens and ``gen_fn`` on generation tokens of x [T, ...]."""
        if self.gen_index is None:
            return und_fn(x)
        gen_out = gen_fn(x[self.gen_index])
        out = x.new_empty((x.shape[0], *gen_out.shape[1:]))
        out[self.gen_index] = gen_out
        if self.und_index.numel():
            out[self.und_index] = und_fn(x[self.und_index])
        return out


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE; cos/sin computed in float32 for arbitrary (non-contiguous) positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        freqs = position_ids.float()[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Shared self-attention with per-expert q/k/v/o projections and per-head q/k RMSNorm."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(h, self.num_heads * d, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(self.num_heads * d, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(d, config.rms_norm_eps))
            setattr(self, "k_norm" + suffix, RMSNorm(d, config.rms_norm_eps))

    def _qkv(self, x: torch.Tensor, gen: bool) -> torch.Tensor:
        s = "_moe_gen" if gen else ""
        t = x.shape[0]
        q = getattr(self, "q_norm" + s)(getattr(self, "q_proj" + s)(x).view(t, self.num_heads, self.head_dim))
        k = getattr(self, "k_norm" + s)(getattr(self, "k_proj" + s)(x).view(t, self.num_kv_heads, self.head_dim))
        v = getattr(self, "v_proj" + s)(x).view(t, self.num_kv_heads, self.head_dim)
        # One tensor so that routing scatters q, k and v together.
        return torch.cat([q, k, v], dim=1)

    def forward(self, x, rope, routing: TokenRouting, spec: PackedAttention, past: list[LayerKV] | None):
        qkv = routing.apply(x, lambda u: self._qkv(u, False), lambda g: self._qkv(g, True))
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, present = attend(q, k, v, spec, past)
        out = out.reshape(x.shape[0], self.num_heads * self.head_dim)
        return routing.apply(out, self.o_proj, self.o_proj_moe_gen), present


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config)
        self.mlp = SwiGLU(h, config.intermediate_size)
        self.mlp_moe_gen = SwiGLU(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.input_layernorm_moe_gen = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(h, eps)

    def forward(self, x, rope, routing: TokenRouting, spec: PackedAttention, past: list[LayerKV] | None):
        normed = routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        attn_out, present = self.self_attn(normed, rope, routing, spec, past)
        x = x + attn_out
        x = x + routing.apply(
            x,
            lambda u: self.mlp(self.post_attention_layernorm(u)),
            lambda g: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(g)),
        )
        return x, present


class MoTTransformer(nn.Module):
    """Embeddings, decoder layers and the per-expert final norms (``language_model.model``)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False  # recompute each layer in backward: memory for compute

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        routing: TokenRouting,
        spec: PackedAttention,
        past: list[list[LayerKV]] | None = None,
    ) -> tuple[torch.Tensor, list[list[LayerKV]]]:
        """x: packed input embeddings [T, hidden]. ``past[layer][seq]`` are the cached keys/values.

        Returns the final-normed hidden states [T, hidden] and the per-layer, per-sequence
        keys/values including the new tokens.
        """
        rope = self.rotary(position_ids, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and self.training:
                x, present = checkpoint(
                    layer, x, rope, routing, spec, layer_past, use_reentrant=False
                )
            else:
                x, present = layer(x, rope, routing, spec, layer_past)
            presents.append(present)
        return routing.apply(x, self.norm, self.norm_moe_gen), presents


class MoTLanguageModel(nn.Module):
    """``language_model``: the transformer plus the untied LM head."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = MoTTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
