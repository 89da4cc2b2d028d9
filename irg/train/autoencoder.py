"""Training a FLUX-architecture autoencoder on shapes-world renders, as a Ray Train job.

Nothing pretrained exists here, so the shapes model's autoencoder is trained first, on the world's own
renders (correct and deliberately flawed scenes, generated on the fly: the data is unlimited). The loss
is the usual VAE one: L1 + MSE reconstruction of a posterior sample plus a small KL term that keeps the
log-variance meaningful (the pipeline samples the posterior, as the reference does). After training,
FLUX's latent normalisation (``scale * (z - shift)``) is measured on fresh renders so latents reach
the flow model with unit variance, and the shapes detector must read every reconstruction as it
reads the original: that agreement is the autoencoder's acceptance figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from irg import storage
from irg.data.synth import make_example, measure
from irg.model.autoencoder import AutoEncoder
from irg.model.config import AEConfig
from irg.tracking import BestEffortLogger, TrackingConfig, tracking_uri
from irg.train.figures import image_strip, log_loss_curve
from irg.transforms import normalize

WEIGHTS_FILE = "ae.safetensors"
CONFIG_FILE = "ae_config.json"
STATE_FILE = "ae_state.json"


@dataclass
class AETrainConfig:
    ae: AEConfig = field(default_factory=AEConfig)
    image_size: int = 64
    batch_size: int = 32
    max_steps: int = 800
    lr: float = 1e-3
    kl_weight: float = 1e-6
    checkpoint_every: int = 200
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 2.0
    run_name: str = "shapes-ae"
    storage: str | None = None  # Ray Train run storage (folder or s3://); default: s3://<bucket>/runs
    eval_images: int = 200  # fresh renders for the latent statistics and the detector agreement
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AETrainConfig:
        d = dict(d)
        d["ae"] = AEConfig.from_dict(d.get("ae", {}))
        d["tracking"] = TrackingConfig(**d.get("tracking", {}))
        return cls(**d)


def render_batch(rng: random.Random, count: int, size: int) -> torch.Tensor:
    """``count`` renders in [-1, 1]: correct and flawed scenes alike, as both appear in the model's data."""
    images = []
    for _ in range(count // 2 + 1):
        example = make_example(rng, size)
        images += [example.correct, example.flawed]
    return torch.stack([normalize(np.asarray(image).transpose(2, 0, 1).copy()) for image in images[:count]])


def reconstruct(autoencoder: AutoEncoder, pixels: torch.Tensor, generator: torch.Generator | None = None):
    latent = autoencoder.encode(pixels, generator=generator)
    return latent, autoencoder.decode(latent)


def to_image(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def ae_loop_per_worker(config: dict) -> None:
    cfg = AETrainConfig.from_dict(config)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    autoencoder = AutoEncoder(cfg.ae)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=cfg.lr)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            autoencoder.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
            optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
            with open(os.path.join(folder, STATE_FILE)) as f:
                step = json.load(f)["step"]
    model = ray.train.torch.prepare_model(autoencoder) if context.get_world_size() > 1 else autoencoder
    logger = BestEffortLogger(tracking_uri(cfg.tracking), cfg.mlflow_run_id) \
        if rank == 0 and cfg.mlflow_run_id else None
    if logger and step == 0:
        logger.log_params({f"ae.{k}": str(v) for k, v in dataclasses.asdict(cfg.ae).items()}
                          | {k: str(v) for k, v in cfg.to_dict().items() if k not in ("ae", "tracking")})
    progress = tqdm(total=cfg.max_steps, initial=step, desc="autoencoder", disable=rank != 0, mininterval=5)
    while step < cfg.max_steps:
        rng = random.Random(f"{cfg.seed}:{rank}:{step}")  # a resumed run sees the batches it would have
        pixels = render_batch(rng, cfg.batch_size, cfg.image_size)
        moments = model(pixels) if model is not autoencoder else autoencoder.encode_moments(pixels)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = autoencoder.decoder(z)
        l1, mse = (recon - pixels).abs().mean(), ((recon - pixels) ** 2).mean()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = l1 + mse + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay: the last steps sharpen the corners
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))
        optimizer.step()
        step += 1
        progress.update(1)
        metrics = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
        if logger and step % 10 == 0:
            logger.log_metrics(metrics, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            if step == cfg.max_steps:
                calibrate(autoencoder, cfg)
                metrics |= detector_agreement(autoencoder, cfg)
                if logger:
                    logger.log_metrics({k: v for k, v in metrics.items() if k.startswith("detector")}, step)
            save(autoencoder, optimizer, step, metrics, cfg, rank)
            if logger:
                log_loss_curve(logger, ("l1", "mse"))
                logger.log_image(reconstruction_strip(autoencoder, cfg), f"reconstructions/step_{step:06d}.png")
    progress.close()


def save(autoencoder: AutoEncoder, optimizer, step: int, metrics: dict, cfg: AETrainConfig, rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_file({k: v.contiguous() for k, v in autoencoder.state_dict().items()}, os.path.join(tmp, WEIGHTS_FILE))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(dataclasses.asdict(autoencoder.config), f, indent=2)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"step": step, "metrics": metrics}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


@torch.no_grad()
def calibrate(autoencoder: AutoEncoder, cfg: AETrainConfig) -> None:
    """FLUX's latent normalisation, measured: ``shift`` the mean and ``scale`` one over the standard
    deviation of posterior samples of fresh renders."""
    autoencoder.scale_factor, autoencoder.shift_factor = 1.0, 0.0
    pixels = render_batch(random.Random(f"calibrate:{cfg.seed}"), cfg.eval_images, cfg.image_size)
    z = autoencoder.encode(pixels, generator=torch.Generator().manual_seed(0))
    shift, scale = float(z.mean()), float(1.0 / z.std())
    autoencoder.shift_factor, autoencoder.scale_factor = shift, scale
    autoencoder.config = dataclasses.replace(autoencoder.config, shift_factor=round(shift, 6),
                                             scale_factor=round(scale, 6))


@torch.no_grad()
def detector_agreement(autoencoder: AutoEncoder, cfg: AETrainConfig) -> dict:
    """How often the shapes detector reads a reconstruction exactly as it reads the original."""
    pixels = render_batch(random.Random(f"agreement:{cfg.seed}"), cfg.eval_images, cfg.image_size)
    _, recon = reconstruct(autoencoder, pixels, torch.Generator().manual_seed(1))
    same = 0
    for original, rebuilt in zip(pixels, recon):
        read = [(d.shape, d.color) for d in measure(to_image(original))]
        same += read == [(d.shape, d.color) for d in measure(to_image(rebuilt))]
    psnr = float(10 * torch.log10(4.0 / ((recon.clamp(-1, 1) - pixels) ** 2).mean()))
    return {"detector_agreement": same / len(pixels), "psnr_db": psnr}


@torch.no_grad()
def reconstruction_strip(autoencoder: AutoEncoder, cfg: AETrainConfig, count: int = 8) -> Image.Image:
    """Originals above their reconstructions."""
    pixels = render_batch(random.Random(f"strip:{cfg.seed}"), count, cfg.image_size)
    _, recon = reconstruct(autoencoder, pixels, torch.Generator().manual_seed(2))
    top, bottom = image_strip([to_image(p) for p in pixels]), image_strip([to_image(r) for r in recon])
    grid = Image.new("RGB", (top.width, top.height * 2), "white")
    grid.paste(top, (0, 0))
    grid.paste(bottom, (0, top.height))
    return grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)


def train_autoencoder(cfg: AETrainConfig, out: str) -> dict:
    """Train (resuming a run of the same name), then write ``ae.safetensors`` and ``ae_config.json``
    (with the measured normalisation) into ``out``; returns the final metrics."""
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    from irg.tracking import configure, experiment_id, find_or_create_run, worker_env

    store = storage.configured_store()
    client = MlflowClient(configure(cfg.tracking, store))
    run_id = find_or_create_run(client, experiment_id(client, cfg.tracking, store), cfg.run_name,
                                tags={"irg.stage": "autoencoder"})
    cfg = dataclasses.replace(cfg, mlflow_run_id=run_id)
    root = cfg.storage or storage.StoreConfig.load().uri("runs")
    filesystem, path = storage.arrow_filesystem(root, store)
    env = worker_env(cfg.tracking, store)
    trainer = TorchTrainer(
        ae_loop_per_worker, train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.run_name, storage_path=path, storage_filesystem=filesystem,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=2),
                                       worker_runtime_env={"env_vars": env}))
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        for name in (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE):
            with open(os.path.join(folder, name), "rb") as src, storage.open_file(storage.join(out, name), "wb") as dst:
                dst.write(src.read())
        with open(os.path.join(folder, STATE_FILE)) as f:
            metrics = json.load(f)["metrics"]
    client.set_terminated(run_id, "FINISHED")
    return metrics

