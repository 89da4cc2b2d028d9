"""Validation of a generation request, separate from the model so that a CLI or a server can reject
bad input from the model's configuration alone, before loading or running anything.

This module owns what a request gets when it does not say and how far it may go (:data:`LIMITS`).
The defaults are the model's: a checkpoint's optional ``generation_config.json`` over the IRG
reference settings (:data:`DEFAULTS`), see :func:`model_defaults`. Every front end (the CLI, Serve,
evaluation, training samples, the registry's pyfunc) passes None for what its user did not set and
the loaded model's :class:`GenerationDefaults` fill it in; Serve's bounds are :data:`LIMITS`. The
image transforms that feed a round's image back default to the checkpoint's own
(:attr:`BagelConfig.vae_transform`, :attr:`BagelConfig.vit_transform`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from irg import storage
from irg.model.checkpoint import (
    GENERATION_CONFIG,
    CheckpointError,
    read_config,
    read_generation_config,
    resolve_model,
)
from irg.model.config import BagelConfig
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.pipeline.settings import RoundSettings, default_round_settings
from irg.transforms import ImageTransform


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets for whatever it leaves unset: the IRG reference settings unless the model's
    ``generation_config.json`` says otherwise (:meth:`from_generation_config`)."""

    height: int = 1024
    width: int = 1024
    num_steps: int = 50
    rounds: int = 2  # the paper found 2 best
    think_temperature: float = 0.3
    max_think_tokens: int = 1000  # the reference's max_length for a think
    system_prompt: str = SYSTEM_PROMPT
    # Per round, overrides of RoundSettings under the request's own; the last entry also holds for the
    # rounds after it, as the library's round-2 settings do for every later round.
    round_settings: tuple[dict, ...] = ()

    @classmethod
    def from_generation_config(cls, values: dict, config: BagelConfig,
                               source: str = GENERATION_CONFIG) -> GenerationDefaults:
        """The defaults a ``generation_config.json`` holds, over the reference ones, checked with the
        rules and limits of a request against ``config`` so a bad file fails when the model loads.

        Keys of Hugging Face's ``GenerationConfig`` (an official BAGEL checkpoint carries Qwen2.5's
        text-sampling file under the same name) are passed over; any other unknown key is an error,
        so that a typo is never silently ignored. Errors name ``source`` and the key."""
        ours = {f.name for f in dataclasses.fields(cls)}
        others = set(values) - ours
        if others:
            from transformers import GenerationConfig

            unknown = sorted(others - set(GenerationConfig().to_dict()))
            if unknown:
                raise CheckpointError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(ours))})")
        round_settings = values.get("round_settings", [])
        if (not isinstance(round_settings, list) or len(round_settings) > LIMITS.max_rounds
                or not all(isinstance(r, dict) for r in round_settings)):
            raise CheckpointError(f"{source}: round_settings: must be a list of at most {LIMITS.max_rounds} "
                                  f"objects (one per round), got {round_settings!r}")
        defaults = cls(**{k: v for k, v in values.items() if k in ours - {"round_settings"}},
                       round_settings=tuple(round_settings))
        # Checked as a request using them would be, over every round the file names (even past its rounds).
        rounds = max(defaults.rounds, len(round_settings)) if _is_int(defaults.rounds) else None
        try:
            validate_request(config, "a prompt", rounds=rounds, defaults=defaults)
        except InvalidRequestError as e:
            raise CheckpointError(f"{source}: {e}") from None
        return defaults

    def generation_config(self) -> dict:
        """What differs from the reference settings, as ``generation_config.json`` holds it ({}: nothing)."""
        reference = GenerationDefaults()
        return {f.name: list(getattr(self, f.name)) if f.name == "round_settings" else getattr(self, f.name)
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(reference, f.name)}


@dataclass(frozen=True)
class GenerationLimits:
    """The largest request any front end accepts (a server may add budgets of its own on top)."""

    min_num_steps: int = 2  # timesteps from noise to image: at least one model evaluation
    max_num_steps: int = 200  # four times the reference's 50
    max_rounds: int = 8  # the paper found 2 best, 3-4 slightly worse
    max_think_tokens: int = 4096  # four times the reference's think budget


DEFAULTS = GenerationDefaults()
LIMITS = GenerationLimits()


def model_defaults(path: str | os.PathLike, config: BagelConfig | None = None,
                   generation_config: dict | None = None) -> GenerationDefaults:
    """The generation defaults of the checkpoint at ``path`` (a folder, URI or ``irg:NAME``), without
    reading its weights; ``config`` and ``generation_config`` when already read (:class:`Pretrained`)."""
    path = resolve_model(path)
    config = read_config(path) if config is None else config
    values = read_generation_config(path) if generation_config is None else generation_config
    return GenerationDefaults.from_generation_config(values, config, storage.join(path, GENERATION_CONFIG))


class InvalidRequestError(ValueError):
    """A generation argument that cannot work; the message starts with the argument's name."""


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: one entry per prompt in every per-prompt list."""

    prompts: list[str]
    single: bool  # a bare string was given: return one output, not a list
    height: int
    width: int
    num_steps: int
    rounds: int
    seeds: list[int]
    think_texts: list[list[str | None]]  # [prompt][round]; None = generate
    images: list[list[Image.Image | None]]  # [prompt][round]; None = sample
    init_noise: list  # [round] tensor [N, 64] or [B, N, 64], or None
    vae_encode_noise: list  # [round] tensor [1 or B, z, h, w], or None
    round_settings: list[RoundSettings]
    vae_transform: tuple[int, int, int]
    vit_transform: tuple[int, int, int]
    think_temperature: float
    max_think_tokens: int
    system_prompt: str

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


def validate_request(
    config: BagelConfig,
    prompt: str | Sequence[str],
    height: int | None = None,
    width: int | None = None,
    num_steps: int | None = None,
    rounds: int | None = None,
    seed: int | Sequence[int] | None = None,
    think_texts: Sequence | None = None,
    images: Sequence | None = None,
    init_noise: Sequence | None = None,
    vae_encode_noise: Sequence | None = None,
    round_settings: Sequence[dict | RoundSettings] | None = None,
    vae_transform: tuple[int, int, int] | None = None,
    vit_transform: tuple[int, int, int] | None = None,
    think_temperature: float | None = None,
    max_think_tokens: int | None = None,
    system_prompt: str | None = None,
    defaults: GenerationDefaults = DEFAULTS,
) -> GenerationRequest:
    """Check every argument of :meth:`IRGPipeline.__call__` against the model configuration; None
    means the default (``defaults``: the model's, see :func:`model_defaults`; or the checkpoint's
    transforms). The request's ``round_settings`` apply over those of ``defaults``."""
    height = defaults.height if height is None else height
    width = defaults.width if width is None else width
    num_steps = defaults.num_steps if num_steps is None else num_steps
    rounds = defaults.rounds if rounds is None else rounds
    think_temperature = defaults.think_temperature if think_temperature is None else think_temperature
    max_think_tokens = defaults.max_think_tokens if max_think_tokens is None else max_think_tokens
    system_prompt = defaults.system_prompt if system_prompt is None else system_prompt
    vae_transform = config.vae_transform if vae_transform is None else vae_transform
    vit_transform = config.vit_transform if vit_transform is None else vit_transform
    single = isinstance(prompt, str)
    if not single and not isinstance(prompt, (list, tuple)):
        raise InvalidRequestError(f"prompt: must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise InvalidRequestError("prompt: at least one prompt is required")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InvalidRequestError("prompt: must be a non-empty string")
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise InvalidRequestError("system_prompt: must be a non-empty string")
    unit = config.pixels_per_latent_token
    max_side = unit * config.max_latent_size
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0 or value % unit:
            raise InvalidRequestError(f"{name}: must be a positive multiple of {unit}, got {value!r}")
        if value > max_side:
            raise InvalidRequestError(f"{name}: {value} exceeds the model's latent grid ({max_side} px per side)")
    _check_range("num_steps", num_steps, LIMITS.min_num_steps, LIMITS.max_num_steps)
    _check_range("rounds", rounds, 1, LIMITS.max_rounds)
    _check_transform("vae_transform", vae_transform, unit, max_side)
    _check_transform("vit_transform", vit_transform, config.vit.patch_size, config.vit_transform[0])
    if not isinstance(think_temperature, (int, float)) or isinstance(think_temperature, bool) \
            or not math.isfinite(think_temperature) or think_temperature < 0:
        raise InvalidRequestError(f"think_temperature: must be a finite number >= 0, got {think_temperature!r}")
    _check_range("max_think_tokens", max_think_tokens, 1, LIMITS.max_think_tokens)

    request = GenerationRequest(
        prompts=prompts, single=single, height=height, width=width, num_steps=num_steps, rounds=rounds,
        seeds=_seeds(seed, len(prompts)),
        think_texts=_per_prompt_rounds("think_texts", think_texts, str, single, len(prompts), rounds),
        images=_per_prompt_rounds("images", images, Image.Image, single, len(prompts), rounds),
        init_noise=_per_round("init_noise", init_noise, rounds),
        vae_encode_noise=_per_round("vae_encode_noise", vae_encode_noise, rounds),
        round_settings=_round_settings(round_settings, defaults.round_settings, rounds),
        vae_transform=tuple(vae_transform), vit_transform=tuple(vit_transform),
        think_temperature=float(think_temperature), max_think_tokens=max_think_tokens, system_prompt=system_prompt,
    )
    for img in (img for per_prompt in request.images for img in per_prompt if img is not None):
        if img.size != (width, height):
            raise InvalidRequestError(f"images: a given image is {img.width}x{img.height}, "
                                      f"the request {width}x{height}")
    _check_noise_shapes(config, request)
    return request


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, value, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise InvalidRequestError(f"{name}: must be an integer from {low} to {high}, got {value!r}")


def _check_transform(name: str, value, stride_unit: int, max_size: int) -> None:
    if (not isinstance(value, (tuple, list)) or len(value) != 3 or not all(_is_int(v) and v > 0 for v in value)
            or value[1] > value[0]):
        raise InvalidRequestError(f"{name}: must be (max_size, min_size, stride) positive ints with "
                                  f"min_size <= max_size, got {value!r}")
    if value[2] % stride_unit:
        raise InvalidRequestError(f"{name}: stride {value[2]} must be a multiple of {stride_unit}")
    if value[0] > max_size:
        raise InvalidRequestError(f"{name}: max_size {value[0]} exceeds what the model can take ({max_size} px)")


def _seeds(seed, batch: int) -> list[int]:
    """One seed per prompt, so a prompt's result does not depend on the rest of its batch."""
    if seed is None:
        return [random.randrange(2**63) for _ in range(batch)]
    if _is_int(seed):
        return [seed + i for i in range(batch)]
    if isinstance(seed, (list, tuple)) and len(seed) == batch and all(_is_int(s) for s in seed):
        return list(seed)
    raise InvalidRequestError(f"seed: must be an integer or one integer per prompt ({batch}), got {seed!r}")


def _per_prompt_rounds(name: str, values, kind: type, single: bool, batch: int, rounds: int) -> list[list]:
    """An optional per-round input as one list of ``rounds`` entries (None = generate) per prompt."""
    if values is None:
        return [[None] * rounds for _ in range(batch)]
    if not isinstance(values, (list, tuple)):
        raise InvalidRequestError(f"{name}: must be a list")
    per_prompt = [list(values)] if single else [list(v) if v is not None else [] for v in values]
    if len(per_prompt) != batch:
        raise InvalidRequestError(f"{name}: expected one list per prompt ({batch}), got {len(per_prompt)}")
    for entries in per_prompt:
        if len(entries) > rounds:
            raise InvalidRequestError(f"{name}: {len(entries)} entries for {rounds} rounds")
        if any(e is not None and not isinstance(e, kind) for e in entries):
            raise InvalidRequestError(f"{name}: entries must be {kind.__name__} or None")
    return [entries + [None] * (rounds - len(entries)) for entries in per_prompt]


def _per_round(name: str, values, rounds: int) -> list:
    if values is None:
        return [None] * rounds
    if len(values) > rounds:
        raise InvalidRequestError(f"{name}: {len(values)} entries for {rounds} rounds")
    return [None if v is None else torch.as_tensor(v, dtype=torch.float32) for v in values] + \
        [None] * (rounds - len(values))


def _round_settings(overrides, model_overrides: Sequence[dict], rounds: int) -> list[RoundSettings]:
    """Each round's settings: the library's, then the model's overrides, then the request's."""
    overrides = list(overrides or [])
    if len(overrides) > rounds:
        raise InvalidRequestError(f"round_settings: {len(overrides)} entries for {rounds} rounds")
    settings = []
    for r in range(rounds):
        override = overrides[r] if r < len(overrides) else None
        model_override = model_overrides[min(r, len(model_overrides) - 1)] if model_overrides else {}
        try:
            if isinstance(override, RoundSettings):
                settings.append(override)
            else:
                base = default_round_settings(r).with_overrides(dict(model_override))
                settings.append(base.with_overrides(dict(override or {})))
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"round_settings[{r}]: {e}") from None
    return settings


def _check_noise_shapes(config: BagelConfig, request: GenerationRequest) -> None:
    unit = config.pixels_per_latent_token
    tokens = (request.height // unit) * (request.width // unit)
    w, h = ImageTransform(*request.vae_transform).target_size(request.width, request.height)
    latent = (config.ae.z_channels, h // config.ae.downsample, w // config.ae.downsample)
    batch = request.batch_size
    for name, values, shapes in (
        ("init_noise", request.init_noise, [(tokens, config.latent_channels), (batch, tokens, config.latent_channels)]),
        ("vae_encode_noise", request.vae_encode_noise, [(1, *latent), (batch, *latent)]),
    ):
        for r, value in enumerate(values):
            if value is not None and tuple(value.shape) not in shapes:
                raise InvalidRequestError(f"{name}[{r}]: expected shape {' or '.join(map(str, shapes))}, "
                                          f"got {tuple(value.shape)}")
