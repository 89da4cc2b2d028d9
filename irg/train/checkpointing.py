"""A training run's checkpoints: where they live and what one holds, in one place and with no Ray.

Each stage run keeps its checkpoints under ``<run storage>/<run name>/`` (Ray Train's layout for a
run's storage path). One checkpoint is a folder with, per rank, DeepSpeed's model and optimizer
partitions (tag :data:`ENGINE_TAG`) and the rank's EMA shard (``ema/rank00000.pt``, plain torch files
of :class:`~irg.train.ema.ShardedEMA`), plus rank 0's :data:`STATE_FILE` (step, data position, MLflow
run). The worker loop writes and restores them through :func:`write_checkpoint` and
:func:`read_checkpoint`; export reads only the EMA shards (:func:`ema_shards`), so it needs neither
DeepSpeed nor Ray. Shards are loaded with ``weights_only=True`` (:func:`load_shard`): a shard holding
any other pickled object is refused, never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import torch

from irg import storage
from irg.data.plan import DataPosition
from irg.model.checkpoint import CheckpointError
from irg.train.config import TrainConfig
from irg.train.ema import ShardedEMA

ENGINE_TAG = "engine"
STATE_FILE = "irg_state.json"
EMA_DIR = "ema"
MODEL_DIR = "model"  # the stage's exported EMA model, in BAGEL layout
FAULT_DRILL_MARKER = "fault_drill_done"
COPY_CHUNK = 64 * 2**20  # bytes per read when downloading a shard


@dataclass
class TrainState:
    """What a restarted run needs besides the weights: where it was and which MLflow run it logs to."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    mlflow_run_id: str | None = None
    resumes: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "position": self.position.to_dict(), "mlflow_run_id": self.mlflow_run_id,
                "resumes": self.resumes}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(step=d["step"], position=DataPosition.from_dict(d["position"]), mlflow_run_id=d.get("mlflow_run_id"),
                   resumes=d.get("resumes", 0))


def run_storage(cfg: TrainConfig) -> str:
    """Where Ray Train keeps the runs: configured, else ``s3://<bucket>/runs`` on the configured store."""
    if cfg.run.storage:
        return cfg.run.storage
    return storage.StoreConfig.load().uri("runs")


def run_path(cfg: TrainConfig, *parts: str) -> str:
    """A path inside this stage run's folder (``<run storage>/<run name>/...``)."""
    return storage.join(run_storage(cfg), cfg.run_name, *parts)


def ema_shard_file(rank: int) -> str:
    return f"{EMA_DIR}/rank{rank:05d}.pt"


def write_checkpoint(folder: str, engine, ema: ShardedEMA, state: TrainState, rank: int) -> None:
    """This rank's part of a checkpoint into a local ``folder`` (Ray Train merges the ranks' folders)."""
    engine.save_checkpoint(folder, tag=ENGINE_TAG)
    os.makedirs(os.path.join(folder, EMA_DIR), exist_ok=True)
    torch.save(ema.state_dict(), os.path.join(folder, ema_shard_file(rank)))
    if rank == 0:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state.to_dict(), f)


def read_checkpoint(folder: str, engine, ema: ShardedEMA, rank: int) -> TrainState:
    """Load a downloaded checkpoint ``folder`` into the engine and this rank's EMA; returns its state."""
    load_path, _ = engine.load_checkpoint(folder, tag=ENGINE_TAG)
    if load_path is None:
        raise RuntimeError(f"checkpoint {folder} has no DeepSpeed state under {ENGINE_TAG!r}")
    ema.load_state_dict(load_shard(os.path.join(folder, ema_shard_file(rank))))
    with open(os.path.join(folder, STATE_FILE)) as f:
        return TrainState.from_dict(json.load(f))


def load_shard(file: str, mmap: bool = False) -> dict:
    """An EMA shard file (``mmap``: its tensors read from disk only when used)."""
    return load_weights_only(file, "EMA shard", mmap=mmap)


def load_weights_only(file: str, what: str, allowed: list[type] = (), map_location="cpu", mmap: bool = False):
    """A torch file that may hold tensors, plain values and the ``allowed`` classes' data only, so whoever
    can write a run's folder cannot run code in training or export: anything else is refused, named."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unknown object")
        raise CheckpointError(f"{what} {file}: refused, it holds more than tensors and plain values "
                              f"(weights only load: {culprit})") from None


@contextlib.contextmanager
def ema_shards(filesystem: pafs.FileSystem, checkpoint_path: str) -> Iterator[list[dict]]:
    """Every rank's EMA shard of a checkpoint (``filesystem`` + path, as Ray's Checkpoint has them),
    memory-mapped. Shards on an object store are downloaded one by one to a temporary folder first
    (local disk for all of them; memory for none), removed on exit."""
    folder = posixpath.join(checkpoint_path, EMA_DIR)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.endswith(".pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint_path!r} has no EMA shards in {EMA_DIR}/")
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield [load_shard(path, mmap=True) for path in files]
        return
    with tempfile.TemporaryDirectory(prefix="irg-ema-") as tmp:
        local = []
        for path in files:
            local.append(os.path.join(tmp, posixpath.basename(path)))
            with filesystem.open_input_stream(path) as src, open(local[-1], "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
        yield [load_shard(path, mmap=True) for path in local]
