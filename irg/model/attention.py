"""How packed sequences attend: one spec for training (per-sample masks) and cached inference.

Several independent sequences are packed along the token axis so that every projection and MLP runs
once over all of them; only the attention itself is computed sequence by sequence, each against its
own key/value cache. This is what lets the sampler evaluate the conditional and unconditional CFG
branches (and several requests) in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

CAUSAL = "causal"  # each query sees the whole cache plus the new tokens up to itself
FULL = "full"  # each query sees the whole cache plus every new token of its sequence


@dataclass
class PackedAttention:
    """Query lengths of the packed sequences and, per sequence, how its queries may attend.

    ``masks[i]`` is ``CAUSAL``, ``FULL`` or an explicit mask over (queries, cache + queries):
    boolean (True = attend) or additive float (0 = attend, -inf = blocked).
    """

    query_lens: list[int]
    masks: list[str | torch.Tensor]

    def __post_init__(self):
        if len(self.query_lens) != len(self.masks):
            raise ValueError("one mask per packed sequence is required")


@dataclass
class LayerKV:
    """Keys (after k-norm and RoPE) and values of one sequence in one layer: [S, kv_heads, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class KVCache:
    """The cached context of one sequence: per-layer keys/values plus the two position counters.

    ``length`` counts cached tokens; ``position`` is the next RoPE position. They differ once an image
    block has been cached, since all tokens of an image block share one position. Extending a cache
    returns a new object and never mutates the old one, so contexts that share a prefix (the CFG
    branches reuse prefixes of the main context) share its tensors for free.
    """

    layers: list[LayerKV] = field(default_factory=list)
    length: int = 0
    position: int = 0


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PackedAttention,
    past: list[LayerKV] | None,
) -> tuple[torch.Tensor, list[LayerKV]]:
    """Attention of packed queries q [T, H, D] over keys/values k, v [T, Hkv, D] (+ each past).

    Returns the attention output [T, H, D] and, per sequence, the full keys/values (past + new).
    """
    outputs, present = [], []
    start = 0
    for i, (length, mask) in enumerate(zip(spec.query_lens, spec.masks)):
        qi, ki, vi = q[start : start + length], k[start : start + length], v[start : start + length]
        start += length
        if past is not None and past[i].keys.shape[0] > 0:
            ki = torch.cat([past[i].keys, ki])
            vi = torch.cat([past[i].values, vi])
        present.append(LayerKV(ki, vi))
        # SDPA's fused kernels (flash, memory-efficient) take 4-D [batch, heads, tokens, dim] inputs only;
        # 3-D inputs silently fall back to the unfused math kernel.
        out = F.scaled_dot_product_attention(
            qi.transpose(0, 1)[None],
            ki.transpose(0, 1)[None],
            vi.transpose(0, 1)[None],
            attn_mask=_sdpa_mask(mask, length, ki.shape[0], q.device),
            enable_gqa=qi.shape[1] != ki.shape[1],
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs), present


def _sdpa_mask(mask, q_len: int, kv_len: int, device):
    if isinstance(mask, torch.Tensor):
        return mask.to(device)[None, None]
    if mask == FULL:
        return None
    if mask != CAUSAL:
        raise ValueError(f"unknown attention mask {mask!r}")
    # Bottom-right aligned: query i of q_len new tokens sees the cache and new tokens 0..i. A CausalBias
    # lets SDPA use its fused causal kernels instead of a materialised mask.
    return causal_lower_right(q_len, kv_len)
