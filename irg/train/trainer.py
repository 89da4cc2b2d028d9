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
from irg.data.plan import epoch_quota
from irg.data.stream import IRGLData
from irg.model.checkpoint import read_config
from irg.pipeline.request import InvalidRequestError, model_defaults, validate_request
from irg.tracking import configure, experiment_id, find_or_create_run, worker_env
from irg.train.checkpointing import MODEL_DIR, run_path, run_storage
from irg.train.config import ConfigError, TrainConfig
from irg.train.data import stream_config
from irg.train.export import export_checkpoint, export_peak_bytes, model_shapes
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
    env = worker_env(cfg.tracking, store)
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


# The settings behind the generation arguments validate_request names first in its messages.
SAMPLE_SETTINGS = {"height": "tracking.sample_size", "width": "tracking.sample_size",
                   "num_steps": "tracking.sample_steps", "max_think_tokens": "tracking.sample_max_think_tokens",
                   "vae_transform": "data.preprocess.vae_transform", "vit_transform": "data.preprocess.vit_transform"}


def preflight(cfg: TrainConfig, store: storage.StoreConfig | None) -> dict:
    """Fail before any worker starts (and before Ray Train retries a hopeless run): the checkpoint's
    configuration must read, the image transforms and the sample image must fit its latent grid, and
    the data must plan an epoch of at least ``data.epoch_rows`` rows and a row per worker. Returns the
    data summary."""
    model = read_config(cfg.model.checkpoint)
    t, preprocess = cfg.tracking, cfg.data.preprocess
    try:
        validate_request(model, t.sample_prompt, height=t.sample_size, width=t.sample_size, num_steps=t.sample_steps,
                         max_think_tokens=t.sample_max_think_tokens, vae_transform=preprocess.vae_transform,
                         vit_transform=preprocess.vit_transform, defaults=model_defaults(cfg.model.checkpoint, model))
    except InvalidRequestError as e:
        setting = SAMPLE_SETTINGS.get(str(e).partition(":")[0], "tracking")
        raise ConfigError(f"{setting}: does not fit the model {cfg.model.checkpoint}: {e}") from None
    summary = IRGLData(stream_config(cfg), store).summary()
    longest = sum(epoch_quota(summary["rows_available"], cfg.data.weights).values())
    if cfg.data.epoch_rows is not None and cfg.data.epoch_rows > longest:
        raise ConfigError(f"data.epoch_rows {cfg.data.epoch_rows} exceeds the {longest} rows an epoch can draw "
                          f"from {cfg.data.root} with these weights and no row twice")
    rows = sum(summary["rows_per_epoch"].values())
    if rows < cfg.scaling.num_workers:
        raise ConfigError(f"scaling.num_workers {cfg.scaling.num_workers} exceeds the {rows} rows of an epoch "
                          f"of {cfg.data.root}: every worker needs data")
    return summary


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
        # Streamed in the training dtype (bf16: the ~29 GB serving expects for the 7B), as a task where
        # the memory is: about one tensor, not the model (see irg.train.export).
        dtype = cfg.model.torch_dtype
        export = ray.remote(num_cpus=1, memory=export_peak_bytes(model_shapes(cfg.model.checkpoint).values(), dtype),
                            runtime_env={"env_vars": worker_env(cfg.tracking, store)})(export_checkpoint)
        ray.get(export.remote(checkpoint.filesystem, checkpoint.path, cfg.model.checkpoint, model_uri, dtype))
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
    # Stage 2's settings against the data and the architecture (its checkpoint is stage 1's export, of
    # the base's configuration) before stage 1 trains for hours, not after.
    for cfg in stage_configs.values():
        preflight(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=first.model.checkpoint)),
                  store)
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
