"""The IRG multi-step generator: think, draw, reflect on the drawing, draw again.

A call runs its request through a :class:`~irg.pipeline.engine.GenerationEngine` (the same engine a
server runs continuously): every prompt's think tokens, denoising steps (all CFG branches) and image
feedback are packed into one model forward per iteration; each prompt draws its noise and think
tokens from its own generator, so its result does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from irg.device import resolve_device, resolve_dtype
from irg.model import KVCache, load_pretrained, save_pretrained
from irg.model.latents import unpatchify_latent
from irg.pipeline.engine import GenerationEngine, IRGOutput, kv_slots, longest_context, slots_per_prompt
from irg.pipeline.events import PipelineEvent
from irg.pipeline.request import DEFAULTS, GenerationDefaults, GenerationRequest, model_defaults, validate_request

__all__ = ["IRGOutput", "IRGPipeline"]

MAX_CACHED_SYSTEM_PROMPTS = 4


class IRGPipeline:
    def __init__(self, model, autoencoder, tokenizer, defaults: GenerationDefaults = DEFAULTS):
        """``defaults``: what a call gets for the arguments it leaves out (the checkpoint's, see
        :func:`~irg.pipeline.request.model_defaults`)."""
        self.model = model
        self.autoencoder = autoencoder
        self.tokenizer = tokenizer
        self.config = model.config
        self.defaults = defaults
        self.im_start, self.im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        self._system_caches: dict[tuple, KVCache] = {}

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"):
        """Load a checkpoint in the official BAGEL layout from a folder, an ``s3://`` URI or ``irg:NAME``
        (a model the package ships), with its generation defaults (its ``generation_config.json``).

        ``device`` and ``dtype`` take names or torch objects (see :mod:`irg.device`); float32 unless
        told otherwise, as in diffusers; ``dtype="auto"`` is bfloat16 on CUDA and float32 on the CPU."""
        device = resolve_device(device)
        pretrained = load_pretrained(path, device=device, dtype=resolve_dtype(dtype, device))
        defaults = model_defaults(path, pretrained.config, pretrained.generation_config)
        return cls(pretrained.model, pretrained.autoencoder, pretrained.tokenizer, defaults)

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """The official layout, with ``generation_config.json`` when the defaults are not the reference's."""
        save_pretrained(path, self.model, self.autoencoder, self.tokenizer, dtype=dtype,
                        generation_config=self.defaults.generation_config())

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> IRGPipeline:
        """Move to a device and/or dtype, given as names or torch objects (see :mod:`irg.device`)."""
        if device is not None:
            device = resolve_device(device)
        if dtype is not None:
            dtype = resolve_dtype(dtype, device or self.device)
        for module in (self.model, self.autoencoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vae2llm.weight.dtype

    # ------------------------------------------------------------------ public API

    def __call__(
        self, prompt: str | Sequence[str], callback: Callable[[PipelineEvent], None] | None = None, **kwargs
    ) -> IRGOutput | list[IRGOutput]:
        """Generate ``rounds`` images per prompt, each after a think (round 2+: a reflection).

        ``prompt`` is one string (returns an :class:`IRGOutput`) or a list (returns a list). Keyword
        arguments, all checked before any model work (see :func:`~irg.pipeline.request.validate_request`):
        ``height``, ``width`` (multiples of 16), ``num_steps`` (flow timesteps from noise to image, so
        ``num_steps - 1`` model evaluations, as in the reference), ``rounds``, ``seed`` (an int, or
        one per prompt), ``think_texts`` / ``images`` (per round, a given think or image instead of
        a generated one; for a batch one list per prompt), ``init_noise[r]`` ([N, 64] or [B, N, 64]),
        ``vae_encode_noise[r]``, ``round_settings[r]`` (overrides of :class:`RoundSettings`),
        ``vae_transform`` / ``vit_transform`` ((max, min, stride) to feed an image back),
        ``think_temperature``, ``max_think_tokens``, ``system_prompt``; left out, :attr:`defaults`.
        ``callback`` receives :class:`PipelineEvent`s as the generation goes.
        """
        request = validate_request(self.config, prompt, defaults=self.defaults, **kwargs)
        outputs = self.generate(request, callback)
        return outputs[0] if request.single else outputs

    def generate(self, request: GenerationRequest, callback=None) -> list[IRGOutput]:
        """Run a validated request; one output per prompt. An exception the callback raises ends the
        generation and is raised here. The request's contexts live in KV slots made for it."""
        slots = kv_slots(self, request.batch_size * slots_per_prompt(request), longest_context(self, request))
        engine = GenerationEngine(self, slots)
        try:
            return engine.run(engine.submit(request, callback))
        finally:
            engine.close()

    # ------------------------------------------------------------------ what the engine uses

    def wrap(self, text: str) -> torch.Tensor:
        """Every text span is ``<|im_start|>`` + ids + ``<|im_end|>``, with no role names."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([self.im_start, *ids, self.im_end], device=self.device)

    def system_cache(self, system_prompt: str) -> KVCache:
        """The system prompt is nearly always the same: prefill it once (per device and dtype; a few kept)."""
        key = (system_prompt, self.device, self.dtype)
        if key not in self._system_caches:
            if len(self._system_caches) >= MAX_CACHED_SYSTEM_PROMPTS:
                self._system_caches.pop(next(iter(self._system_caches)))
            (self._system_caches[key],) = self.model.prefill_text([KVCache()], [self.wrap(system_prompt)])
        return self._system_caches[key]

    def noise(self, given: torch.Tensor | None, index: int, shape: tuple[int, ...], generator) -> torch.Tensor:
        """Prompt ``index``'s share of the caller's noise ([...] or [B, ...]) or a draw from its generator."""
        if given is None:
            return torch.randn(shape, generator=generator).to(self.device)
        return (given if given.shape == shape else given[index]).to(self.device)

    def decode_latents(self, latents: torch.Tensor, grid) -> list[Image.Image]:
        """Packed latents [B, N, 64] on a (rows, columns) grid -> images."""
        patch = self.config.latent_patch_size
        z = torch.stack([unpatchify_latent(x, *grid, patch) for x in latents])
        pixels = self.autoencoder.decode(z.to(self.dtype)).float()
        uint8 = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in uint8]
