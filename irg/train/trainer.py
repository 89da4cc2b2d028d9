"""Driver side: the TorchTrainer for one IRGL stage, built in one place, and the two-stage job.

A stage run is identified by its name (``<run.name>-stage<N>``): Ray Train keeps its checkpoints
under ``<run.storage>/<name>`` and MLflow finds its run by the same key, so submitting a job again
with the same name resumes both instead of starting over.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import ray.train
from mlflow import MlflowClient
from ray.train.torch import TorchTrainer

from irg import registry, storage
from irg.data.stream import IRGLData
from irg.model.checkpoint import read_config
from irg.tracking import TRACKING_URI_ENV, configure, experiment_id, find_or_create_run
from irg.train.checkpointing import MODEL_DIR, run_path, run_storage
from irg.train.config import TrainConfig
from irg.train.data import stream_config
from irg.train.export import export_checkpoint
from irg.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: int
    run_id: str
    checkpoint_path: str  # inside the run storage
    model_uri: str  # the exported EMA model in BAGEL layout
    metrics: dict


def build_trainer(cfg: TrainConfig, store: storage.StoreConfig | None = None) -> TorchTrainer:
    """The stage's TorchTrainer: one DeepSpeed worker per GPU (or CPU slot), checkpoints on the store."""
    filesystem, path = storage.arrow_filesystem(run_storage(cfg), store)
    env = dict(store.env()) if store else {}
    env[TRACKING_URI_ENV] = configure(cfg.tracking, store)
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU, over Ray's gloo process group
    if cfg.scaling.torch_threads:
        env["OMP_NUM_THREADS"] = str(cfg.scaling.torch_threads)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=dict(cfg.scaling.resources_per_worker)),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )


def preflight(cfg: TrainConfig, store: storage.StoreConfig | None) -> dict:
    """Fail before any worker starts (and before Ray Train retries a hopeless run): the checkpoint's
    configuration must read and the data must plan an epoch. Returns the data summary."""
    read_config(cfg.model.checkpoint)
    return IRGLData(stream_config(cfg), store).summary()


def run_stage(cfg: TrainConfig, parent_run_id: str | None = None) -> StageResult:
    """Train one stage to ``run.max_steps`` (resuming if it ran before), then export its EMA weights."""
    store = storage.configured_store()
    summary = preflight(cfg, store)
    client = MlflowClient(configure(cfg.tracking, store))
    experiment = experiment_id(client, cfg.tracking, store)
    run_id = find_or_create_run(client, experiment, cfg.run_name, parent_run_id,
                                tags={"irg.stage": str(cfg.stage), "irg.base_model": cfg.model.checkpoint})
    cfg = dataclasses.replace(cfg, mlflow_run_id=run_id, mlflow_parent_run_id=parent_run_id)
    client.log_dict(run_id, summary, "data_summary.json")
    log.info("stage %d: MLflow run %s, checkpoints in %s/%s", cfg.stage, run_id, run_storage(cfg), cfg.run_name)
    try:
        result = build_trainer(cfg, store).fit()
        checkpoint = result.checkpoint
        if checkpoint is None:
            raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint")
        model_uri = run_path(cfg, MODEL_DIR)
        export_checkpoint(checkpoint.filesystem, checkpoint.path, cfg.model.checkpoint, model_uri)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, "irg.model_uri", model_uri)
    client.set_terminated(run_id, "FINISHED")
    return StageResult(stage=cfg.stage, run_id=run_id, checkpoint_path=checkpoint.path, model_uri=model_uri,
                       metrics=dict(result.metrics or {}))


def run_irgl(stage_configs: dict[int, TrainConfig], job_name: str, register: bool = True):
    """IRGL: stage 1 (all six modes), then stage 2 (the full modes) from stage 1's EMA, under one parent
    run; the stage-2 model is registered. Returns the stage results and the new model version (or None)."""
    first = stage_configs[1]
    store = storage.configured_store()
    client = MlflowClient(configure(first.tracking, store))
    experiment = experiment_id(client, first.tracking, store)
    parent = find_or_create_run(client, experiment, job_name, tags={"irg.job": "irgl"})
    results = {}
    try:
        results[1] = run_stage(stage_configs[1], parent)
        second = stage_configs[2]
        second = dataclasses.replace(second, model=dataclasses.replace(second.model, checkpoint=results[1].model_uri))
        results[2] = run_stage(second, parent)
        version = registry.log_model(results[2].model_uri, second.tracking.registered_model, results[2].run_id) \
            if register else None
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    client.set_tag(parent, "irg.model_uri", results[2].model_uri)
    client.set_terminated(parent, "FINISHED")
    return results, version
