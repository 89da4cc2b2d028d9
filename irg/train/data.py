"""The training workers' view of the IRGL stream: packed batches, epoch after epoch, in lockstep.

Each epoch is a different plan (a fresh weighted draw of the thinking modes, see
:mod:`irg.data.plan`), so the workers drive the epochs themselves: rank 0 builds the epoch's Ray
Dataset and splits it with ``streaming_split`` (blocks go to whichever worker asks first), and hands
one split to each rank over the process group. Every step the ranks agree that all of them still
have a batch; when any has run dry the epoch ends for all (the few rows still in other workers'
packing buffers are left for a later epoch) and the next one starts. The rows each worker trained on
make up the :class:`DataPosition` that a checkpoint stores, so a restarted run skips them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from irg import storage
from irg.data.batching import DataStats, Packed, PackedBatches
from irg.data.plan import DataPlanError, DataPosition, EpochExhausted
from irg.data.sequence import SpecialTokens
from irg.data.stream import IRGLData, StreamConfig, iter_records
from irg.train.config import TrainConfig


def stream_config(config: TrainConfig) -> StreamConfig:
    d = config.data
    return StreamConfig(
        root=d.root, checkpoint=config.model.checkpoint, weights=dict(d.weights), mandatory=tuple(d.mandatory),
        seed=d.seed, epoch_rows=d.epoch_rows, preprocess=d.preprocess, max_tokens_per_sample=d.max_tokens_per_sample,
        strict=d.strict, prepare_concurrency=d.prepare_concurrency, prepare_cpus=d.prepare_cpus,
    )


class WorkerBatches:
    def __init__(self, config: TrainConfig, special: SpecialTokens, position: DataPosition, rank: int,
                 world_size: int, device: torch.device):
        self.config, self.special = config, special
        self.rank, self.world_size, self.device = rank, world_size, device
        self.data = IRGLData(stream_config(config), storage.StoreConfig.load()) if rank == 0 else None
        self.finished_stats = DataStats()
        self._start(position)

    @property
    def epoch(self) -> int:
        return self.packer.position.epoch

    @property
    def position(self) -> DataPosition:
        return self.packer.position

    @property
    def stats(self) -> DataStats:
        return self.finished_stats.merge(self.packer.stats)

    def next(self) -> Packed:
        """This rank's next batch; every rank must call it once per step."""
        empty_epochs = 0
        while True:
            packed = next(self._batches, None)
            if self._all_have(packed is not None):
                return packed
            empty_epochs = 0 if self.packer.stats.batches else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataPlanError(f"epochs {self.epoch - 1} and {self.epoch} gave no usable batch: see the "
                                    f"rejected rows {dict(self.stats.rejected)} and {self.stats.examples}")
            self.finished_stats = self.stats
            self._start(DataPosition(self.epoch + 1))

    def _all_have(self, have: bool) -> bool:
        if self.world_size == 1:
            return have
        flag = torch.tensor([int(have)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _start(self, position: DataPosition) -> None:
        epoch, split = self._scatter_split(position)
        if epoch != position.epoch:
            position = DataPosition(epoch)
        shuffle_seed = (self.config.data.seed * 100_003 + epoch) * 1_009 + self.rank
        records = iter_records(split, self.config.data.shuffle_buffer, seed=shuffle_seed)
        self.packer = PackedBatches(
            records, self.special, self.config.data.expected_tokens, self.config.data.max_tokens,
            self.config.data.mandatory,
            position=DataPosition(position.epoch, set(position.consumed)),
        )
        self._batches = iter(self.packer)

    def _scatter_split(self, position: DataPosition):
        """Rank 0 builds the epoch's dataset (the next epoch's if this one is used up); each rank
        receives the epoch number and its ``streaming_split`` iterator."""
        payload = [None]
        if self.rank == 0:
            try:
                try:
                    epoch, dataset = position.epoch, self.data.dataset(position.epoch, position)
                except EpochExhausted:
                    epoch, dataset = position.epoch + 1, self.data.dataset(position.epoch + 1)
                payload = [(epoch, dataset.streaming_split(self.world_size, equal=False))]
            except Exception as e:  # every rank must hear about it, or the others wait forever
                payload = [e]
        if self.world_size > 1:
            dist.broadcast_object_list(payload, src=0, device=self.device if self.device.type == "cuda" else None)
        if isinstance(payload[0], Exception):
            raise payload[0]
        epoch, splits = payload[0]
        return epoch, splits[self.rank]


def all_gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
