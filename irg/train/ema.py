"""Exponential moving average of the weights, sharded like ZeRO-3 so no rank holds a full copy.

Every parameter is seen flattened and split into ``world_size`` equal chunks (the last padded), the
way DeepSpeed ZeRO-3 partitions it; rank r keeps an fp32 EMA of chunk r only. Under ZeRO-3 that
chunk is exactly the rank's ``param.ds_tensor``; under ZeRO-0/1/2 (replicated weights) it is a slice
of the full tensor. Frozen parameters are copied once and never updated, so the shards together hold
the whole model and an export needs nothing else. Shards are plain torch files: reassembling them
needs neither DeepSpeed nor the process group (see :mod:`irg.train.export`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from irg.model.safetensors_stream import LazyTensor

SHARD_FORMAT = 1


def _chunk(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def local_slice(param: nn.Parameter, rank: int, world_size: int) -> torch.Tensor:
    """This rank's chunk of ``param`` (a view; the padded tail of the last chunk is cut off)."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the rank's partition, already padded to equal size
        return param.ds_tensor.view(-1)[: _owned(param.ds_numel, rank, world_size)]
    chunk = _chunk(param.numel(), world_size)
    return param.data.view(-1)[rank * chunk: (rank + 1) * chunk]


def _owned(numel: int, rank: int, world_size: int) -> int:
    chunk = _chunk(numel, world_size)
    return max(0, min(chunk, numel - rank * chunk))


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float, rank: int = 0, world_size: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        # plain float and ints: shards are loaded with weights_only=True, which refuses other types
        self.decay, self.rank, self.world_size = float(decay), int(rank), int(world_size)
        self.params = dict(model.named_parameters())
        self.shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()}
        self.shards = {name: local_slice(p, rank, world_size).detach().float().clone()
                       for name, p in self.params.items()}
        self.device = next(model.parameters()).device
        persistent = set(model.state_dict())
        self.buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers() if name in persistent}

    @torch.no_grad()
    def update(self) -> None:
        trainable = [name for name, p in self.params.items() if p.requires_grad]
        if not trainable:
            return
        shards = [self.shards[n] for n in trainable]
        current = [local_slice(self.params[n], self.rank, self.world_size).float() for n in trainable]
        torch._foreach_lerp_(shards, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"format": SHARD_FORMAT, "rank": self.rank, "world_size": self.world_size, "decay": self.decay,
                "shapes": self.shapes, "shards": {n: t.cpu() for n, t in self.shards.items()},
                "buffers": self.buffers if self.rank == 0 else {}}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"EMA shard of rank {state['rank']}/{state['world_size']} cannot be loaded by "
                             f"rank {self.rank}/{self.world_size}: restart with the same number of workers")
        if state["shapes"] != self.shapes:
            raise ValueError("EMA shard was saved for a different model")
        for name, shard in state["shards"].items():
            self.shards[name].copy_(shard)

    @torch.no_grad()
    def gather(self, dst: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
        """The full EMA state dict on rank ``dst`` (on CPU), None elsewhere; every rank must call it."""
        out = {} if self.rank == dst else None
        for name, shard in self.shards.items():
            numel = math.prod(self.shapes[name])
            chunk = _chunk(numel, self.world_size)
            padded = torch.zeros(chunk, dtype=shard.dtype, device=shard.device)
            padded[: shard.numel()] = shard
            if self.world_size > 1:
                parts = [torch.empty_like(padded) for _ in range(self.world_size)] if out is not None else None
                dist.gather(padded, parts, dst=dst)
            else:
                parts = [padded]
            if out is not None:
                out[name] = torch.cat(parts)[:numel].view(self.shapes[name]).to("cpu", dtype)
        if out is not None:
            out.update({name: b.to(dtype) if b.is_floating_point() else b for name, b in self.buffers.items()})
        return out


def assemble(shard_states: list[dict], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full state dict from every rank's saved :meth:`ShardedEMA.state_dict` (any order)."""
    return {name: tensor.load() for name, tensor in assemble_lazily(shard_states, dtype).items()}


def assemble_lazily(shard_states: list[dict], dtype: torch.dtype = torch.float32) -> dict[str, LazyTensor]:
    """:func:`assemble` one tensor at a time: each is put together from its pieces, straight into
    ``dtype``, only when loaded, so with memory-mapped shards an export holds one tensor at a time.
    The pieces' sizes are checked here, before anything is loaded."""
    if not shard_states:
        raise ValueError("no EMA shards found")
    world_size = shard_states[0]["world_size"]
    by_rank = {s["rank"]: s for s in shard_states}
    missing = sorted(set(range(world_size)) - set(by_rank))
    if missing:
        raise ValueError(f"EMA shards of ranks {missing} (of {world_size}) are missing")
    out = {}
    for name, shape in by_rank[0]["shapes"].items():
        pieces = [by_rank[r]["shards"][name] for r in range(world_size)]
        held, numel = sum(p.numel() for p in pieces), math.prod(shape)
        if held != numel:
            raise ValueError(f"EMA shards of {name} hold {held} values, expected {numel}")
        out[name] = LazyTensor(tuple(shape), dtype, functools.partial(_join, pieces, tuple(shape), dtype))
    for name, b in by_rank[0]["buffers"].items():
        target = dtype if b.is_floating_point() else b.dtype
        out[name] = LazyTensor(tuple(b.shape), target, functools.partial(b.to, target))
    return out


def _join(pieces: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One parameter from its ranks' pieces, each cast while copied into place (no full fp32 copy)."""
    out = torch.empty(math.prod(shape), dtype=dtype)
    offset = 0
    for piece in pieces:
        out[offset: offset + piece.numel()].copy_(piece.view(-1))
        offset += piece.numel()
    return out.view(shape)
