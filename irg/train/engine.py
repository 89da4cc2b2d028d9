"""The model as DeepSpeed trains it: what is frozen, activation checkpointing, AdamW with its warm-up.

No Ray here, so a benchmark or a notebook builds the same engine as the Ray Train workers do. The
engine reads checkpoints with ``weights_only=True`` (DeepSpeed's own loader unpickles anything), so
whoever can write a run's folder cannot run code in a resumed training.
"""

from __future__ import annotations

import torch

from irg.train.config import TrainConfig


def prepare_model(model, cfg: TrainConfig):
    """Freeze what the config freezes, switch on activation checkpointing, set the flow's timestep sampling."""
    model.config.timestep_shift = cfg.model.timestep_shift
    model.config.timestep_sampling = cfg.model.timestep_sampling
    if cfg.model.freeze_vit:
        model.vit_model.requires_grad_(False)
    if cfg.model.freeze_und:
        for name, param in model.language_model.named_parameters():
            if "moe_gen" not in name:
                param.requires_grad_(False)
    model.language_model.model.gradient_checkpointing = cfg.model.activation_checkpointing
    return model.train()


def deepspeed_engine(model, cfg: TrainConfig):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter is frozen: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    warmup = max(cfg.optim.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=cfg.deepspeed.build(cfg.model, cfg.optim), dist_init_required=False)
    engine.checkpoint_engine.load = load_weights_only
    return engine


def deepspeed_state_types() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain values (found by
    loading ZeRO-0..3 checkpoints with ``weights_only=True``); their instances are restored as data."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """What DeepSpeed's checkpoint engine loads a state file with: tensors, plain values and
    :func:`deepspeed_state_types`; any other pickled object is refused, naming it."""
    from irg.train.checkpointing import load_weights_only as load

    return load(path, "DeepSpeed state", deepspeed_state_types(), map_location=map_location)
