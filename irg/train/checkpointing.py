"""A training run's checkpoints: where they live and what one holds, in one place and with no Ray.

Each stage run keeps its checkpoints under ``<run storage>/<run name>/`` (Ray Train's layout for a
run's storage path). One checkpoint is a folder with, per rank, DeepSpeed's model and optimizer
partitions (tag :data:`ENGINE_TAG`) and the rank's EMA shard (``ema/rank00000.pt``, plain torch files
of :class:`~irg.train.ema.ShardedEMA`), plus rank 0's :data:`STATE_FILE` (step, data position, MLflow
run). The worker loop writes and restores them through :func:`write_checkpoint` and
:func:`read_checkpoint`; export reads only the EMA shards (:func:`read_ema`), so it needs neither
DeepSpeed nor Ray.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import torch

from irg import storage
from irg.data.plan import DataPosition
from irg.train.config import TrainConfig
from irg.train.ema import ShardedEMA, assemble

ENGINE_TAG = "engine"
STATE_FILE = "irg_state.json"
EMA_DIR = "ema"
MODEL_DIR = "model"  # the stage's exported EMA model, in BAGEL layout
FAULT_DRILL_MARKER = "fault_drill_done"


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
    ema.load_state_dict(torch.load(os.path.join(folder, ema_shard_file(rank)), weights_only=True))
    with open(os.path.join(folder, STATE_FILE)) as f:
        return TrainState.from_dict(json.load(f))


def read_ema(filesystem: pafs.FileSystem, checkpoint_path: str, dtype: torch.dtype = torch.float32) -> dict:
    """The full EMA state dict of a checkpoint (``filesystem`` + path, as Ray's Checkpoint has them)."""
    folder = posixpath.join(checkpoint_path, EMA_DIR)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.endswith(".pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {checkpoint_path!r} has no EMA shards in {EMA_DIR}/")
    shards = []
    for path in files:
        with filesystem.open_input_file(path) as f:
            shards.append(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))
    return assemble(shards, dtype)
