"""Per-round sampler settings and their defaults (the IRG reference settings)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


MAX_STEP_CACHE_INTERVAL = 8


@dataclass(frozen=True)
class RoundSettings:
    """How one round's image is sampled: CFG scales and interval, renorm, timestep shift, and step
    caching (off by default): with ``step_cache_interval`` N > 1 the model runs only every N-th
    denoising step (and the first two and the last); the steps between extrapolate each CFG branch's
    velocity, a linear map of the generation expert's last features, from the last two it ran
    (TaylorSeer's first order in t; ``step_cache_order`` 0 reuses the last, as FORA does).

    ``start_noise`` (rounds after the first; None, the paper's recipe, starts from pure noise): start
    from the previous round's latent noised again to level s in [0, 1] (as SDEdit does) and run only
    the schedule's steps below s; at s = 0 the round keeps the previous latent as it is."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    step_cache_interval: int = 1
    step_cache_order: int = 1
    start_noise: float | None = None

    def __post_init__(self):
        if self.start_noise is not None and (isinstance(self.start_noise, bool)
                                             or not isinstance(self.start_noise, (int, float))
                                             or not 0.0 <= self.start_noise <= 1.0):
            raise ValueError(f"start_noise must be a number in [0, 1] or null (from pure noise), "
                             f"got {self.start_noise!r}")
        for name in ("step_cache_interval", "step_cache_order"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not 1 <= self.step_cache_interval <= MAX_STEP_CACHE_INTERVAL:
            raise ValueError(f"step_cache_interval must be in [1, {MAX_STEP_CACHE_INTERVAL}] (1: off), "
                             f"got {self.step_cache_interval}")
        if self.step_cache_order not in (0, 1):
            raise ValueError(f"step_cache_order must be 0 or 1, got {self.step_cache_order}")
        numbers = {"cfg_text_scale": self.cfg_text_scale, "cfg_img_scale": self.cfg_img_scale,
                   "cfg_renorm_min": self.cfg_renorm_min, "timestep_shift": self.timestep_shift,
                   "cfg_interval": self.cfg_interval[0], "cfg_interval ": self.cfg_interval[1]}
        for name, value in numbers.items():  # NaN passes every comparison below, inf breaks the sampler
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name.strip()} must be a finite number, got {value!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {self.cfg_interval}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        if self.cfg_text_scale < 0 or self.cfg_img_scale < 0:
            raise ValueError("cfg_text_scale and cfg_img_scale must be >= 0")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")

    def with_overrides(self, overrides: dict) -> RoundSettings:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown round setting(s) {unknown}; known: {sorted(known)}")
        if "cfg_interval" in overrides:
            overrides = {**overrides, "cfg_interval": tuple(overrides["cfg_interval"])}
        return dataclasses.replace(self, **overrides)


FIRST_ROUND = RoundSettings()
"""Round 1: text CFG only, active for t in (0.4, 1], global renorm."""

LATER_ROUNDS = RoundSettings(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
"""Rounds 2+: text CFG 4.0 and image CFG 2.0 at every step, per-token renorm of the text branch."""


def runs_model(step: int, evaluations: int, settings: RoundSettings) -> bool:
    """Whether denoising step ``step`` (of ``evaluations``) runs the model, or (step caching) reuses it."""
    interval = settings.step_cache_interval
    return interval == 1 or step < 2 or step == evaluations - 1 or step % interval == 0


def restart_times(times, start_noise: float):
    """The part of a schedule (descending, 1 to 0) a round run from level ``start_noise`` takes: that
    level, then the schedule's times below it."""
    below = times[times < start_noise]
    return torch.cat([torch.tensor([float(start_noise)], dtype=times.dtype), below])


def default_round_settings(round_index: int) -> RoundSettings:
    return FIRST_ROUND if round_index == 0 else LATER_ROUNDS
