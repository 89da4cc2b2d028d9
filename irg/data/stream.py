"""The IRGL data pipeline on Ray Data: per-mode parquet folders -> prepared samples, sharded to workers.

Driver side, :class:`IRGLData` plans an epoch from the parquet footers (which rows of which mode, in
what order; see :mod:`irg.data.plan`) and builds a lazy ``ray.data.Dataset`` over the plan's work
units: each task reads one row group from object storage and prepares its selected rows in CPU
workers (:mod:`irg.data.prepare`). Nothing is materialised: Ray Data streams the records with
backpressure to however many consumers ``streaming_split`` / Ray Train's ``get_dataset_shard``
create, and each consumer packs its records into batches (:mod:`irg.data.batching`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from irg import storage
from irg.data.format import MODES, STAGE_WEIGHTS
from irg.data.plan import (
    DataPlanError,
    DataPosition,
    EpochExhausted,
    WorkUnit,
    discover,
    epoch_quota,
    plan_epoch,
    rows_per_mode,
)
from irg.data.prepare import PREPARED_COLUMNS, Preparer
from irg.data.sequence import PreprocessConfig


@dataclass
class StreamConfig:
    """Where the data is and how one epoch of it is drawn and prepared."""

    root: str  # folder or s3:// URI holding one folder per learning mode
    checkpoint: str  # folder or URI of the checkpoint trained: its tokenizer and its image geometry
    weights: dict[str, float] = field(default_factory=lambda: dict(STAGE_WEIGHTS[1]))
    mandatory: tuple[str, ...] = ()
    seed: int = 0
    epoch_rows: int | None = None  # rows per epoch; default: as many as the weights allow without repeats
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    max_tokens_per_sample: int = 16384
    strict: bool = False
    prepare_concurrency: int = 2  # Ray Data workers that decode and tokenise
    prepare_cpus: float = 1.0  # CPUs each reserves (less lets them share cores with training workers)

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(MODES))
        if unknown:
            raise ValueError(f"weights name unknown modes {unknown}; the modes are {list(MODES)}")
        missing = sorted(set(self.mandatory) - {m for m, w in self.weights.items() if w > 0})
        if missing:
            raise ValueError(f"mandatory modes {missing} have no positive weight")

    @classmethod
    def for_stage(cls, stage: int, root: str, checkpoint: str, **overrides) -> StreamConfig:
        """IRGL stage 1 (all six modes) or 2 (the two full modes), with the reference weights."""
        if stage not in STAGE_WEIGHTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_WEIGHTS)}, got {stage}")
        return cls(root=root, checkpoint=checkpoint, weights=dict(STAGE_WEIGHTS[stage]), **overrides)


class IRGLData:
    """Driver-side handle: plans epochs and builds their Ray datasets."""

    def __init__(self, config: StreamConfig, store: storage.StoreConfig | None = None):
        self.config = config
        self.store = store
        fs, root = storage.arrow_filesystem(config.root, store)
        modes = [m for m, w in config.weights.items() if w > 0]
        self.row_groups, self.issues = discover(fs, root, modes)
        problems = [i for i in self.issues
                    if config.strict or (i.kind == "missing_mode" and i.mode in config.mandatory)]
        if problems:
            raise DataPlanError("; ".join(f"{i.kind} at {i.location}: {i.detail}" for i in problems))
        self.available = rows_per_mode(self.row_groups)
        if not any(self.available.get(m, 0) for m in modes):
            found = "; ".join(f"{i.kind} at {i.location}" for i in self.issues[:6])
            raise DataPlanError(f"{config.root}: no rows to train on in modes {modes}"
                                + (f" ({found})" if found else ""))
        self.quota = epoch_quota(self.available, config.weights, config.epoch_rows)

    def dataset(self, epoch: int = 0, position: DataPosition | None = None) -> ray.data.Dataset:
        """The prepared records of one epoch, minus the rows ``position`` says were consumed in it."""
        consumed = position.consumed if position is not None and position.epoch == epoch else set()
        units = plan_epoch(self.row_groups, self.quota, self.config.seed, epoch, consumed)
        if not units:
            raise EpochExhausted(f"epoch {epoch} has no rows left to read")
        items = [dataclasses.asdict(u) for u in units]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PrepareUnits,
            fn_constructor_kwargs={"config": self.config, "store": self.store, "epoch": epoch},
            batch_size=1,
            num_cpus=self.config.prepare_cpus,
            compute=ray.data.ActorPoolStrategy(size=min(self.config.prepare_concurrency, len(items))),
        )

    def summary(self) -> dict:
        return {
            "root": self.config.root,
            "rows_available": dict(self.available),
            "rows_per_epoch": dict(self.quota),
            "issues": [dataclasses.asdict(i) for i in self.issues],
        }


class _PrepareUnits:
    """Ray Data UDF: read and prepare work units (holds the tokenizer and filesystem per worker)."""

    def __init__(self, config: StreamConfig, store: storage.StoreConfig | None, epoch: int):
        from irg.model.checkpoint import load_tokenizer, read_config

        self.fs, _ = storage.arrow_filesystem(config.root, store)
        self.preparer = Preparer(
            tokenizer=load_tokenizer(config.checkpoint), config=config.preprocess,
            model=read_config(config.checkpoint), max_tokens_per_sample=config.max_tokens_per_sample,
            seed=config.seed, epoch=epoch, strict=config.strict)

    def __call__(self, batch: dict) -> dict:
        records = []
        for i in range(len(batch["path"])):
            unit = WorkUnit(mode=str(batch["mode"][i]), path=str(batch["path"][i]), relpath=str(batch["relpath"][i]),
                            row_group=int(batch["row_group"][i]), rows=tuple(int(r) for r in batch["rows"][i]))
            records.extend(self.preparer(self.fs, unit))
        return {name: [r[name] for r in records] for name in PREPARED_COLUMNS}


def iter_records(shard, shuffle_buffer: int = 0, seed: int | None = None) -> Iterator[dict]:
    """Records of a dataset shard (a ``DataIterator`` or ``Dataset``), optionally locally shuffled."""
    batches = shard.iter_batches(batch_size=8, batch_format="numpy",
                                 local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed)
    for batch in batches:
        for i in range(len(batch["row_id"])):
            yield {name: batch[name][i] for name in PREPARED_COLUMNS}
