"""Rectified-flow sampling: the shifted Euler schedule and the CFG combination of velocities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from irg.model.latents import shift_timesteps
from irg.pipeline.settings import RoundSettings


def flow_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """Shifted times from 1 (noise) to 0 (data); ``num_steps`` points, so ``num_steps - 1`` evaluations."""
    return shift_timesteps(torch.linspace(1, 0, num_steps), shift)


def cfg_active(t: float, settings: RoundSettings) -> bool:
    lo, hi = settings.cfg_interval
    return settings.cfg_text_scale > 1.0 and lo < t <= hi


def combine_cfg(
    v_cond: torch.Tensor, v_text: torch.Tensor, v_img: torch.Tensor | None, settings: RoundSettings
) -> torch.Tensor:
    """Guided velocity for a batch [B, N, C]; ``v_img`` is None when image CFG is off."""
    s_t, s_i = settings.cfg_text_scale, settings.cfg_img_scale
    guided = v_text + s_t * (v_cond - v_text)
    if settings.cfg_renorm_type == "text_channel":
        guided = guided * _renorm_ratio(v_cond, guided, per_token=True, floor=settings.cfg_renorm_min)
        return v_img + s_i * (guided - v_img) if v_img is not None else guided
    if v_img is not None:
        guided = v_img + s_i * (guided - v_img)
    per_token = settings.cfg_renorm_type == "channel"
    return guided * _renorm_ratio(v_cond, guided, per_token=per_token, floor=settings.cfg_renorm_min)


def _renorm_ratio(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, floor: float) -> torch.Tensor:
    """Shrink the guided velocity back to the conditional one's norm (never grow it)."""
    dims = (-1,) if per_token else (-2, -1)
    ratio = reference.norm(dim=dims, keepdim=True) / (guided.norm(dim=dims, keepdim=True) + 1e-8)
    return ratio.clamp(min=floor, max=1.0)


@dataclass
class StepResult:
    """One evaluation of the sampler, for progress reporting and debugging."""

    index: int
    num_evaluations: int
    t: float
    x_t: torch.Tensor
    v_cond: torch.Tensor
    v_text: torch.Tensor | None
    v_img: torch.Tensor | None
    v: torch.Tensor


VelocityFn = Callable[[torch.Tensor, float, bool, bool], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def sample_flow(
    velocity: VelocityFn,
    x: torch.Tensor,
    num_steps: int,
    settings: RoundSettings,
    on_step: Callable[[StepResult], None] | None = None,
) -> torch.Tensor:
    """Euler integration from noise x [B, N, C] at t = 1 down to t = 0.

    ``velocity(x_t, t, need_text_uncond, need_img_uncond)`` returns (v_cond, v_text, v_img), computing
    only the branches asked for, so steps outside the CFG interval cost one branch.
    """
    times = flow_timesteps(num_steps, settings.timestep_shift)
    use_img_cfg = settings.cfg_img_scale > 1.0
    for i in range(num_steps - 1):
        t = float(times[i])
        guided = cfg_active(t, settings)
        v_cond, v_text, v_img = velocity(x, t, guided, guided and use_img_cfg)
        v = combine_cfg(v_cond, v_text, v_img, settings) if guided else v_cond
        if on_step is not None:
            on_step(StepResult(i, num_steps - 1, t, x, v_cond, v_text, v_img, v))
        x = x - v * (times[i] - times[i + 1])
    return x
