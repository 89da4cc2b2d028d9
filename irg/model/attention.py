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
    boolean (True = attend) or additive float (0 = attend, -inf = blocked). ``cache_new``: whether the
    new tokens join their sequences' caches (False for a query block that is only read, such as the
    noised image of a denoising step), for all sequences or one flag per sequence (a generation
    engine packs think tokens, which are kept, with denoising steps, which are not).
    """

    query_lens: list[int]
    masks: list[str | torch.Tensor]
    cache_new: bool | list[bool] = True

    def __post_init__(self):
        if len(self.query_lens) != len(self.masks):
            raise ValueError("one mask per packed sequence is required")
        if isinstance(self.cache_new, list) and len(self.cache_new) != len(self.query_lens):
            raise ValueError("one cache_new flag per packed sequence is required")

    def keeps(self, i: int) -> bool:
        """Whether sequence i's new tokens join its cache."""
        return self.cache_new[i] if isinstance(self.cache_new, list) else self.cache_new

    @property
    def keeps_any(self) -> bool:
        return any(self.cache_new) if isinstance(self.cache_new, list) else self.cache_new


class _KVBuffer:
    """Room for the keys and values of a context and its extensions, [capacity, kv_heads, head_dim]
    each; rows below ``filled`` belong to some context and are never written again."""

    __slots__ = ("keys", "values", "filled", "slot")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int, slot: int | None = None):
        self.keys, self.values, self.filled = keys, values, filled
        self.slot = slot  # the KVSlots slot these rows are, or None for memory of their own

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]


class LayerKV:
    """Keys (after k-norm and RoPE) and values of one sequence in one layer: the first ``length`` rows
    of a buffer, [length, kv_heads, head_dim].

    A context is extended without copying it: the new rows are written into its buffer right after
    its own, when the buffer has room and no other context has taken those rows yet (a decode step
    costs the new token, not the context, as concatenation did). A context whose rows were already
    taken (a fork: two contexts grown from one prefix) or whose buffer is full moves to a new buffer
    with room to grow (doubling, so appends are amortised O(new rows)). Rows a view covers never
    change, so contexts that share a prefix (the CFG branches, the system prompt of every request)
    share its memory, each a length over the same buffer.
    """

    __slots__ = ("_buffer", "length")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self._buffer = _KVBuffer(keys, values, keys.shape[0])
        self.length = keys.shape[0]

    @classmethod
    def _view(cls, buffer: _KVBuffer, length: int) -> LayerKV:
        view = cls.__new__(cls)
        view._buffer, view.length = buffer, length
        return view

    @property
    def keys(self) -> torch.Tensor:
        return self._buffer.keys[: self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._buffer.values[: self.length]

    def _room_for(self, rows: int) -> _KVBuffer:
        """This view's buffer if ``rows`` more fit right after it, unclaimed; else a new one holding a copy."""
        buffer, end = self._buffer, self.length + rows
        if buffer.filled == self.length and end <= buffer.capacity:
            return buffer
        capacity = max(end, 2 * self.length)
        keys = buffer.keys.new_empty((capacity, *buffer.keys.shape[1:]))
        values = buffer.values.new_empty((capacity, *buffer.values.shape[1:]))
        keys[: self.length] = self.keys
        values[: self.length] = self.values
        return _KVBuffer(keys, values, self.length)

    def extended(self, keys: torch.Tensor, values: torch.Tensor) -> LayerKV:
        """This context followed by ``keys``/``values`` (new rows), as a new view; this one is unchanged."""
        buffer, end = self._room_for(keys.shape[0]), self.length + keys.shape[0]
        buffer.keys[self.length : end] = keys
        buffer.values[self.length : end] = values
        buffer.filled = end
        return LayerKV._view(buffer, end)

    def read_with(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This context's keys/values followed by new rows that are read once and not kept: written into
        unclaimed room when there is some (nothing claimed, so the next extension writes there again),
        else concatenated."""
        end = self.length + keys.shape[0]
        buffer = self._buffer
        if buffer.filled == self.length and end <= buffer.capacity:
            buffer.keys[self.length : end] = keys
            buffer.values[self.length : end] = values
            return buffer.keys[:end], buffer.values[:end]
        return torch.cat([self.keys, keys]), torch.cat([self.values, values])

    def release_to(self, prefix: LayerKV) -> None:
        """Give back the rows this view claimed past ``prefix`` (a view of the same context's start),
        when nothing claimed rows after them: the next extension of ``prefix`` then writes in place."""
        if prefix._buffer is self._buffer and self._buffer.filled == self.length:
            self._buffer.filled = prefix.length


@dataclass
class KVCache:
    """The cached context of one sequence: per-layer keys/values plus the two position counters.

    ``length`` counts cached tokens; ``position`` is the next RoPE position. They differ once an image
    block has been cached, since all tokens of an image block share one position. Extending a cache
    returns a new object and never changes the old one (:class:`LayerKV`), so contexts that share a
    prefix (the CFG branches reuse prefixes of the main context) share its memory.
    """

    layers: list[LayerKV] = field(default_factory=list)
    length: int = 0
    position: int = 0

    def release_to(self, prefix: KVCache) -> None:
        """This cache is dropped for ``prefix``, which it extends (a think's decoding context, whose text
        is prefilled again): its rows past ``prefix`` become free for ``prefix``'s next extension."""
        for mine, theirs in zip(self.layers, prefix.layers):
            mine.release_to(theirs)


class KVSlots:
    """Preallocated keys and values for ``num_slots`` contexts of up to ``slot_tokens`` tokens each, one
    [num_slots, slot_tokens, kv_heads, head_dim] buffer per layer: what a generation engine serves from,
    so a context grows in place token by token without allocating. A slot is claimed for a context
    (:meth:`claim`, :meth:`context`) and released when its request ends; contexts that grow from one
    (its CFG prefixes) are lengths over the same slot. A context that outgrows its slot moves to
    memory of its own (:class:`LayerKV`), so a long think costs a copy, never a failure."""

    def __init__(self, num_slots: int, slot_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_slots < 1 or slot_tokens < 1:
            raise ValueError(f"KV slots need num_slots >= 1 and slot_tokens >= 1, got {num_slots}, {slot_tokens}")
        # One more slot than is handed out: scratch rows for padded static-shape batches (SlotDecoder).
        shape = (num_slots + 1, slot_tokens, kv_heads, head_dim)
        # Zeros, not garbage: a static-shape decode reads a span of each slot under a mask, and a NaN in
        # a masked row would still reach the output through its zero weight.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.slot_tokens = slot_tokens
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0] - 1

    @property
    def scratch_slot(self) -> int:
        """A slot never handed out, whose rows anyone may overwrite."""
        return self.num_slots

    @property
    def free(self) -> int:
        return len(self._free)

    def claim(self, count: int = 1) -> list[int]:
        """``count`` free slots; a ValueError if there are fewer."""
        if count > len(self._free):
            raise ValueError(f"{count} KV slots asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            if slot in self._free or not 0 <= slot < self.num_slots:
                raise ValueError(f"KV slot {slot} is not claimed")
            self._free.append(slot)

    def context(self, slot: int, prefix: KVCache) -> KVCache:
        """A context in ``slot`` holding a copy of ``prefix`` (which must fit), ready to grow in place."""
        if prefix.length > self.slot_tokens:
            raise ValueError(f"a context of {prefix.length} tokens does not fit a KV slot of {self.slot_tokens}")
        layers = []
        for keys, values, layer in zip(self.keys, self.values, prefix.layers or [None] * len(self.keys)):
            own_keys, own_values = keys[slot], values[slot]
            if layer is not None:
                own_keys[: layer.length] = layer.keys
                own_values[: layer.length] = layer.values
            layers.append(LayerKV._view(_KVBuffer(own_keys, own_values, prefix.length, slot), prefix.length))
        return KVCache(layers, prefix.length, prefix.position)

    def appendable_slot(self, cache: KVCache) -> int | None:
        """The slot ``cache`` may grow in place by one token (its rows at the slot's start, the row after
        them unclaimed and inside the slot), or None: how a static-shape decode picks its contexts."""
        if not cache.layers:
            return None
        layer = cache.layers[0]
        buffer = layer._buffer
        if buffer.slot is None or buffer.filled != layer.length or layer.length >= self.slot_tokens:
            return None
        return buffer.slot

    def appended(self, cache: KVCache) -> KVCache:
        """``cache`` followed by the token a static-shape decode wrote into its slot (row ``length``)."""
        layers = []
        for layer in cache.layers:
            layer._buffer.filled = layer.length + 1
            layers.append(LayerKV._view(layer._buffer, layer.length + 1))
        return KVCache(layers, cache.length + 1, cache.position + 1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PackedAttention,
    past: list[LayerKV | None] | None,
) -> tuple[torch.Tensor, list[LayerKV] | None]:
    """Attention of packed queries q [T, H, D] over keys/values k, v [T, Hkv, D] (+ each past).

    Returns the attention output [T, H, D] and, when any sequence keeps its new tokens, per sequence
    its keys/values extended by them (None for a sequence that does not keep them; None instead of the
    list when none does). ``past[i]`` None: sequence i has no cache yet.
    """
    outputs, present = [], []
    start = 0
    for i, (length, mask) in enumerate(zip(spec.query_lens, spec.masks)):
        qi, ki, vi = q[start : start + length], k[start : start + length], v[start : start + length]
        start += length
        cached = past[i] if past is not None else None
        keep = spec.keeps(i)
        if cached is None or (cached.length == 0 and not keep):
            present.append(LayerKV(ki, vi) if keep else None)
        elif keep:
            layer = cached.extended(ki, vi)
            present.append(layer)
            ki, vi = layer.keys, layer.values
        else:
            present.append(None)
            ki, vi = cached.read_with(ki, vi)
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
    return torch.cat(outputs), present if spec.keeps_any else None


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
