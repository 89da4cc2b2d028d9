"""The Ray Train worker loop: DeepSpeed over the packed IRGL stream, with EMA, checkpoints and MLflow.

Every worker runs :func:`train_loop_per_worker`. A checkpoint holds, per rank, DeepSpeed's model and
optimizer partitions and the rank's EMA shard, plus ``irg_state.json`` (step, data position, MLflow
run); after a lost worker Ray Train restarts the group and the loop resumes from the latest one.
"""

from __future__ import annotations

import os
import signal
import tempfile
from functools import reduce

import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient
from tqdm import tqdm

from irg import storage
from irg.data.plan import DataPosition
from irg.data.sequence import SpecialTokens
from irg.model import load_pretrained
from irg.pipeline import IRGPipeline, model_defaults
from irg.tracking import BestEffortLogger, tracking_uri
from irg.train.checkpointing import FAULT_DRILL_MARKER, TrainState, read_checkpoint, run_path, write_checkpoint
from irg.train.config import TrainConfig
from irg.train.data import WorkerBatches, all_gather_objects
from irg.train.ema import ShardedEMA
from irg.train.engine import deepspeed_engine, prepare_model
from irg.train.figures import image_strip, log_loss_curve
from irg.train.step import StepResult, peak_flops, train_step

CLOSED_PORT_URI = "http://127.0.0.1:1"  # where the tracking-outage drill sends rank 0's logging


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.data.seed * 10_007 + rank)  # flow noise and timesteps differ across ranks

    pretrained = load_pretrained(cfg.model.checkpoint, device="cpu")
    model = prepare_model(pretrained.model, cfg)
    autoencoder = pretrained.autoencoder.to(device, cfg.model.torch_dtype).eval().requires_grad_(False)
    engine = deepspeed_engine(model, cfg)
    ema = ShardedEMA(engine.module, cfg.optim.ema_decay, rank, world)

    state = restore(engine, ema, rank) or TrainState(mlflow_run_id=cfg.mlflow_run_id)
    logger = BestEffortLogger(tracking_uri(cfg.tracking), state.mlflow_run_id) \
        if rank == 0 and state.mlflow_run_id else None
    if logger:
        logger.log_params(cfg.flat())
        if state.step:
            logger.set_tags({"irg.resumes": str(state.resumes)})

    batches = WorkerBatches(cfg, SpecialTokens.from_tokenizer(pretrained.tokenizer), state.position, rank, world,
                            device)
    peak = peak_flops(device, cfg.model.torch_dtype, cfg.tracking.peak_tflops)
    progress = tqdm(total=cfg.run.max_steps, initial=state.step, desc=f"stage {cfg.stage}", disable=rank != 0,
                    mininterval=5)
    window: list[StepResult] = []
    while state.step < cfg.run.max_steps:
        fault_drill(cfg, state.step, rank, world)
        packed = batches.next()
        result = train_step(engine, autoencoder, packed.batch, pretrained.config, world, cfg.optim.ce_weight,
                            cfg.optim.mse_weight, vit_trainable=not cfg.model.freeze_vit)
        ema.update()
        state.step += 1
        tracking_outage_drill(cfg, state.step, logger)
        window.append(result)
        progress.update(1)
        progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        if state.step % cfg.run.log_every == 0 or state.step == cfg.run.max_steps:
            metrics = step_metrics(window, batches, world, peak, device)
            window = []
            if logger:
                logger.log_metrics(metrics, state.step)
        if state.step % cfg.run.checkpoint_every == 0 or state.step == cfg.run.max_steps:
            state.position = reduce(DataPosition.merge, [
                DataPosition.from_dict(p) for p in all_gather_objects(batches.position.to_dict(), world)])
            save_checkpoint(engine, ema, state, rank, {"step": state.step, "loss": result.loss,
                                                        "epoch": batches.epoch})
            log_checkpoint_extras(cfg, ema, batches, pretrained, logger, state.step, world)
    progress.close()


def step_metrics(window: list[StepResult], batches: WorkerBatches, world: int, peak: float, device) -> dict:
    """Means over the steps since the last log; throughput and MFU summed over workers."""
    last = window[-1]
    totals = torch.tensor([sum(r.tokens for r in window), sum(r.flops for r in window),
                           sum(r.seconds for r in window)], dtype=torch.float64, device=device)
    seconds = totals[2].clone()
    if world > 1:
        torch.distributed.all_reduce(totals)
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    tokens, flops = totals[0].item(), totals[1].item()
    metrics = {
        "loss": sum(r.loss for r in window) / len(window),
        "grad_norm": last.grad_norm,
        "lr": last.lr,
        "tokens_per_s": tokens / seconds.item(),
        "tokens_per_s_per_worker": tokens / seconds.item() / world,
        "mfu": flops / seconds.item() / world / peak,
        "epoch": batches.epoch,
    }
    for name in ("loss_ce", "loss_mse"):  # a step without such tokens anywhere has no value, not 0
        values = [getattr(r, name) for r in window if getattr(r, name) is not None]
        if values:
            metrics[name] = sum(values) / len(values)
    return metrics


def save_checkpoint(engine, ema: ShardedEMA, state: TrainState, rank: int, metrics: dict) -> None:
    """Every rank writes its part into a local folder; Ray Train merges them into one checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, engine, ema, state, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, ema: ShardedEMA, rank: int) -> TrainState | None:
    """The latest checkpoint's state, loaded into the engine and EMA; None on a fresh start.

    Each rank downloads into its own folder: Ray's shared per-node download (``as_directory``) was
    seen handing one rank a file another rank was still writing or already cleaning up.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with tempfile.TemporaryDirectory(prefix=f"irg-restore-rank{rank}-") as folder:
        checkpoint.to_directory(folder)
        state = read_checkpoint(folder, engine, ema, rank)
    state.resumes += 1
    return state


def log_checkpoint_extras(cfg: TrainConfig, ema: ShardedEMA, batches: WorkerBatches, pretrained, logger, step: int,
                          world: int) -> None:
    """Data counts, the loss curve and a sample from the EMA weights (rank 0; the EMA gather is collective)."""
    stats = reduce(lambda a, b: a.merge(b), all_gather_objects(batches.stats, world))
    weights = ema.gather(dtype=cfg.model.torch_dtype) if cfg.tracking.sample_images else None
    if logger is None:
        return
    logger.log_metrics({"data_rows_read": stats.read, "data_rows_used": stats.used,
                        "data_rows_rejected": sum(stats.rejected.values())}, step)
    log_loss_curve(logger)
    if weights is not None:
        pipe = ema_pipeline(weights, pretrained, cfg, ema.device)
        logger.log_image(sample(pipe, cfg), f"samples/step_{step:07d}.png")
        if cfg.tracking.score_prompts:
            logger.log_metrics({"round1_shapes_score": shapes_score(pipe, cfg.tracking.score_prompts)}, step)


def ema_pipeline(weights: dict, pretrained, cfg: TrainConfig, device: torch.device) -> IRGPipeline:
    """The EMA weights as a pipeline, on rank 0's device in the training dtype (a full copy next to the
    training state: for a 7B model in bf16, 29 GB of GPU memory)."""
    from irg.model import build_model

    with torch.device("meta"):
        model = build_model(pretrained.config)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, assign=True)
    autoencoder = pretrained.autoencoder.to(device, cfg.model.torch_dtype)
    defaults = model_defaults(cfg.model.checkpoint, pretrained.config, pretrained.generation_config)
    return IRGPipeline(model.eval(), autoencoder, pretrained.tokenizer, defaults)


def shapes_score(pipe: IRGPipeline, prompts: int) -> float:
    """Round 1 of ``prompts`` fixed shapes-world prompts scored by GenEval's rules: the score against training
    tokens, as the run goes (a shapes-world model only)."""
    from irg.eval.benchmarks import shapes_prompts
    from irg.eval.geneval import shapes_scorer

    chosen = shapes_prompts(prompts, seed=0)
    outputs = pipe([p.prompt for p in chosen], rounds=1, seed=list(range(len(chosen))))
    verdicts = shapes_scorer().score([(p, out.images[0]) for p, out in zip(chosen, outputs)])
    return sum(v.score for v in verdicts) / len(verdicts)


def sample(pipe: IRGPipeline, cfg: TrainConfig):
    """The fixed prompt through every round."""
    t = cfg.tracking
    out = pipe(t.sample_prompt, height=t.sample_size, width=t.sample_size, num_steps=t.sample_steps, seed=0,
               max_think_tokens=t.sample_max_think_tokens, vae_transform=cfg.data.preprocess.vae_transform,
               vit_transform=cfg.data.preprocess.vit_transform)
    return image_strip(out.images)


def fault_drill(cfg: TrainConfig, step: int, rank: int, world: int) -> None:
    """Kill the last worker once at ``run.fault_drill_step``: a real lost worker, to prove recovery."""
    if cfg.run.fault_drill_step is None or step != cfg.run.fault_drill_step or rank != world - 1:
        return
    marker = run_path(cfg, FAULT_DRILL_MARKER)
    if storage.exists(marker):
        return
    with storage.open_file(marker, "w") as f:
        f.write(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def tracking_outage_drill(cfg: TrainConfig, step: int, logger: BestEffortLogger | None) -> None:
    """Send rank 0's logging of step ``tracking.outage_drill_step`` to a closed port: a real MLflow
    outage (connection refused), to prove training goes on without its tracking server."""
    drill = cfg.tracking.outage_drill_step
    if logger is None or drill is None or step not in (drill, drill + 1):
        return
    logger.client = MlflowClient(CLOSED_PORT_URI if step == drill else logger.uri)
