"""One think token for each of several contexts in KV slots, with static shapes: CUDA-graph decode.

A decode iteration is a few hundred small kernels (per layer: norms, projections, RoPE, attention,
MLP) over a handful of tokens, so on a GPU its time is launch overhead more than arithmetic. Over
:class:`~irg.model.attention.KVSlots` every tensor of the step has a fixed shape for a given number of
contexts and a given span: the new keys and values are written into each context's slot at its
length, and attention reads the first ``span`` rows of each slot (a power of two at least the longest
context, so at most twice what it needs) under a mask of the rows in use. :class:`SlotDecoder` runs
that step eagerly (any device: how the CPU and the tests run it) or, on CUDA, replays it as a CUDA
graph captured once per (batch-size bucket, span) (a batch is padded up to its bucket with rows in
the slots' scratch slot whose results are ignored). Decode tokens are text, so only the understanding
expert runs. No Ray here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irg.model.attention import KVSlots
from irg.model.llm import apply_rotary

BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_SPAN = 64


class SlotDecoder:
    """Next-token logits for ``B`` contexts in ``slots``, each fed one token (its new key and value
    written at row ``lengths[i]`` of slot ``slot_ids[i]``, RoPE position ``positions[i]``).

    ``cuda_graphs`` (CUDA only): replay a graph captured per bucket of :data:`BUCKETS` instead of
    launching every kernel; the first call of a bucket captures it. Padding rows use the slots'
    scratch slot.
    """

    def __init__(self, model, slots: KVSlots, cuda_graphs: bool = False):
        self.model, self.slots = model, slots
        self.llm = model.language_model
        self.device = slots.keys[0].device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self._pool = None  # one memory pool for every captured graph

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, slot_ids: torch.Tensor, lengths: torch.Tensor,
                 positions: torch.Tensor, longest: int | None = None) -> torch.Tensor:
        """[B] each (long) -> logits [B, vocab] (float32). ``longest``: ``lengths``' largest, when the
        caller knows it (reading it off the device waits for the device)."""
        batch = tokens.shape[0]
        span = self.span((int(lengths.max()) if longest is None else longest) + 1)
        bucket = next((b for b in BUCKETS if b >= batch), None)
        if not self.cuda_graphs or bucket is None:
            return self._step(tokens, slot_ids, lengths, positions, span)
        pad = bucket - batch
        inputs = {"tokens": tokens, "slot_ids": slot_ids, "lengths": lengths, "positions": positions}
        if pad:  # the scratch slot, written at row 0 and reading only that row
            fill = {"tokens": 0, "slot_ids": self.slots.scratch_slot, "lengths": 0, "positions": 0}
            inputs = {k: torch.cat([v, v.new_full((pad,), fill[k])]) for k, v in inputs.items()}
        if (bucket, span) not in self._graphs:
            self._graphs[bucket, span] = self._capture({k: v.clone() for k, v in inputs.items()}, span)
        graph, static, logits = self._graphs[bucket, span]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return logits[:batch].clone()

    def span(self, rows: int) -> int:
        """The rows attention reads for contexts of up to ``rows`` rows: a power of two (at least
        :data:`MIN_SPAN`), at most the slot."""
        return min(max(MIN_SPAN, 1 << (rows - 1).bit_length()), self.slots.slot_tokens)

    def _capture(self, static: dict, span: int) -> tuple:
        """A CUDA graph of :meth:`_step` over the ``static`` input buffers (warmed up on a side stream first,
        as CUDA graphs require); its output buffer."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(**static, span=span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's image thread may launch work while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._step(**static, span=span)
        self._pool = graph.pool()
        return graph, static, logits

    def _step(self, tokens, slot_ids, lengths, positions, span: int) -> torch.Tensor:
        model = self.llm.model
        x = model.embed_tokens(tokens)  # [B, hidden]
        cos, sin = model.rotary(positions, x.dtype)
        rows = torch.arange(span, device=self.device)
        visible = (rows[None, :] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, span]: the context and the token
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(-1, attn.num_heads, attn.head_dim))
            k = attn.k_norm(attn.k_proj(h).view(-1, attn.num_kv_heads, attn.head_dim))
            v = attn.v_proj(h).view(-1, attn.num_kv_heads, attn.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            keys, values = self.slots.keys[index], self.slots.values[index]
            keys[slot_ids, lengths] = k
            values[slot_ids, lengths] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None, :],  # [B, heads, 1, D]
                keys[slot_ids, :span].transpose(1, 2),  # [B, kv_heads, span, D]
                values[slot_ids, :span].transpose(1, 2),
                attn_mask=visible, enable_gqa=attn.num_heads != attn.num_kv_heads)
            x = x + attn.o_proj(out.reshape(x.shape[0], -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.llm.lm_head(model.norm(x)).float()
