"""Rectified-flow sampling: the shifted Euler schedule and the CFG combination of velocities."""

from __future__ import annotations

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
    """One step of the sampler, for progress reporting and debugging."""

    index: int
    num_evaluations: int
    t: float
    x_t: torch.Tensor
    v_cond: torch.Tensor
    v_text: torch.Tensor | None
    v_img: torch.Tensor | None
    v: torch.Tensor
    reused: bool = False  # step caching: the branches were extrapolated, the model did not run


def guided_branches(t: float, settings: RoundSettings) -> tuple[bool, bool]:
    """Which unconditional branches a step at time t needs: (text, image); steps outside the CFG
    interval cost one branch."""
    guided = cfg_active(t, settings)
    return guided, guided and settings.cfg_img_scale > 1.0
