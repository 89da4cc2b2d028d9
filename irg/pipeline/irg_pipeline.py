"""The IRG multi-step generator: think, draw, reflect on the drawing, draw again.

Per prompt the pipeline keeps three contexts as KV caches (extending a cache never changes it, so
contexts share prefixes for free):
* ``main``: system prompt, user prompt, each think, each image (clean VAE latents, then ViT tokens);
* ``text_cfg``: the text-unconditional context of the next image: the system prompt alone for round 1,
  then ``main`` as it was before the latest reflection;
* ``text_only``: every text span and no image, the image-unconditional context of rounds 2+.
All prompts of a batch and all CFG branches run packed in one model forward per step. Each prompt
draws its noise and think tokens from its own generator, so its result does not depend on its batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from irg.device import resolve_device, resolve_dtype
from irg.model import KVCache, load_pretrained, save_pretrained
from irg.model.latents import grid_position_ids, patchify_latent, unpatchify_latent
from irg.pipeline.events import PipelineEvent
from irg.pipeline.flow import StepResult, sample_flow
from irg.pipeline.request import DEFAULTS, GenerationDefaults, GenerationRequest, model_defaults, validate_request
from irg.pipeline.settings import RoundSettings
from irg.pipeline.text import next_tokens
from irg.transforms import ImageTransform, patchify_image

MAX_CACHED_SYSTEM_PROMPTS = 4


@dataclass
class IRGOutput:
    """The result for one prompt: one think text, image and final packed latent per round."""

    prompt: str
    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    latents: list[torch.Tensor | None] = field(default_factory=list)  # None for a round whose image was given
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Conversation:
    main: KVCache
    text_cfg: KVCache
    generator: torch.Generator
    text_only: KVCache | None = None


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

    @torch.no_grad()
    def generate(self, request: GenerationRequest, callback=None) -> list[IRGOutput]:
        """Run a validated request; one output per prompt."""
        emit = callback or (lambda event: None)
        outputs = [IRGOutput(prompt=p, seed=s) for p, s in zip(request.prompts, request.seeds)]
        unit = self.config.pixels_per_latent_token
        grid = (request.height // unit, request.width // unit)

        start = time.perf_counter()
        system = self._system_cache(request.system_prompt)
        mains = self.model.prefill_text([system] * request.batch_size, [self._wrap(p) for p in request.prompts])
        conversations = [_Conversation(m, system, torch.Generator().manual_seed(s))
                         for m, s in zip(mains, request.seeds)]
        for r in range(request.rounds):
            round_start = time.perf_counter()
            texts = self._think(conversations, [t[r] for t in request.think_texts], r, request, callback is not None,
                                emit)
            think_done = time.perf_counter()
            self._append_think(conversations, texts, r)
            images, latents = self._round_images(conversations, [g[r] for g in request.images], request, grid, r,
                                                 emit)
            for i, out in enumerate(outputs):
                out.texts.append(texts[i])
                out.images.append(images[i])
                out.latents.append(latents[i])
                out.timings[f"round{r + 1}_think_s"] = think_done - round_start
                out.timings[f"round{r + 1}_image_s"] = time.perf_counter() - think_done
                emit(PipelineEvent("image", r, i, image=images[i]))
            if r + 1 < request.rounds:
                self._append_image(conversations, images, r, request)
        for out in outputs:
            out.timings["total_s"] = time.perf_counter() - start
        emit(PipelineEvent("done", request.rounds - 1))
        return outputs

    # ------------------------------------------------------------------ text

    def _wrap(self, text: str) -> torch.Tensor:
        """Every text span is ``<|im_start|>`` + ids + ``<|im_end|>``, with no role names."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([self.im_start, *ids, self.im_end], device=self.device)

    def _system_cache(self, system_prompt: str) -> KVCache:
        """The system prompt is nearly always the same: prefill it once (per device and dtype; a few kept)."""
        key = (system_prompt, self.device, self.dtype)
        if key not in self._system_caches:
            if len(self._system_caches) >= MAX_CACHED_SYSTEM_PROMPTS:
                self._system_caches.pop(next(iter(self._system_caches)))
            (self._system_caches[key],) = self.model.prefill_text([KVCache()], [self._wrap(system_prompt)])
        return self._system_caches[key]

    def _think(self, conversations, given, round_index, request: GenerationRequest, stream: bool,
               emit) -> list[str]:
        """The round's think texts: the given ones, others sampled until ``<|im_end|>``."""
        texts = list(given)
        todo = [i for i, t in enumerate(texts) if t is None]
        caches = {i: conversations[i].main for i in todo}
        generated: dict[int, list[int]] = {i: [] for i in todo}
        tokens = [self.im_start] * len(todo)
        for _ in range(request.max_think_tokens):
            if not todo:
                break
            logits, new_caches = self.model.decode_step([caches[i] for i in todo],
                                                        torch.tensor(tokens, device=self.device))
            chosen = next_tokens(logits, request.think_temperature, [conversations[i].generator for i in todo])
            still, tokens = [], []
            for i, cache, token in zip(todo, new_caches, chosen):
                if token == self.im_end:
                    continue
                caches[i] = cache
                generated[i].append(token)
                still.append(i)
                tokens.append(token)
                if stream:
                    emit(PipelineEvent("think_token", round_index, i, text=self.tokenizer.decode(generated[i])))
            todo = still
        for i, ids in generated.items():
            texts[i] = self.tokenizer.decode(ids)
        for i, text in enumerate(texts):
            emit(PipelineEvent("think_done", round_index, i, text=text))
        return texts

    def _append_think(self, conversations: list[_Conversation], texts: list[str], round_index: int) -> None:
        """Add the think to ``main`` and to the image-free ``text_only`` context (one packed forward)."""
        ids = [self._wrap(t) for t in texts]
        if round_index == 0:
            mains = self.model.prefill_text([c.main for c in conversations], ids)
            for c, m in zip(conversations, mains):
                c.main = c.text_only = m  # no image yet: both contexts hold the same tokens
            return
        n = len(conversations)
        contexts = [c.main for c in conversations] + [c.text_only for c in conversations]
        caches = self.model.prefill_text(contexts, ids * 2)
        for c, m, t in zip(conversations, caches[:n], caches[n:]):
            c.main, c.text_only = m, t

    # ------------------------------------------------------------------ images

    def _round_images(self, conversations, given, request: GenerationRequest, grid, round_index,
                      emit) -> tuple[list[Image.Image], list[torch.Tensor | None]]:
        """Sample (and decode) the round's image for every prompt that was not given one."""
        images, latents = list(given), [None] * len(given)
        todo = [i for i, img in enumerate(given) if img is None]
        if not todo:
            return images, latents
        shape = (grid[0] * grid[1], self.config.latent_channels)
        noise = torch.stack([self._noise(request.init_noise[round_index], i, shape, conversations[i].generator)
                             for i in todo])
        sampled = self._sample_image([conversations[i] for i in todo], noise, grid, request.num_steps,
                                     request.round_settings[round_index], round_index, emit)
        for i, image, latent in zip(todo, self._decode(sampled, grid), sampled):
            images[i], latents[i] = image, latent.cpu()
        return images, latents

    def _noise(self, given: torch.Tensor | None, index: int, shape: tuple[int, ...], generator) -> torch.Tensor:
        """Prompt ``index``'s share of the caller's noise ([...] or [B, ...]) or a draw from its generator."""
        if given is None:
            return torch.randn(shape, generator=generator).to(self.device)
        return (given if given.shape == shape else given[index]).to(self.device)

    def _sample_image(self, conversations, noise, grid, num_steps, settings: RoundSettings, round_index, emit):
        """Denoise the round's latents with all CFG branches of all prompts packed per forward."""
        position_ids = grid_position_ids(*grid, self.config.max_latent_size, device=self.device)
        batch = len(conversations)

        def velocity(x, t, need_text, need_img):
            caches = [c.main for c in conversations]
            if need_text:
                caches += [c.text_cfg for c in conversations]
            if need_img:
                caches += [c.text_only for c in conversations]
            repeats = len(caches) // batch
            times = torch.full((len(caches),), t, device=self.device)
            v = self.model.predict_velocity(caches, x.repeat(repeats, 1, 1), times, position_ids).split(batch)
            return v[0], (v[1] if need_text else None), (v[-1] if need_img else None)

        def on_step(step: StepResult):
            emit(PipelineEvent("step", round_index, step=step.index + 1, num_steps=step.num_evaluations, detail=step))

        return sample_flow(velocity, noise.float(), num_steps, settings, on_step)

    def _decode(self, latents: torch.Tensor, grid) -> list[Image.Image]:
        patch = self.config.latent_patch_size
        z = torch.stack([unpatchify_latent(x, *grid, patch) for x in latents])
        pixels = self.autoencoder.decode(z.to(self.dtype)).float()
        uint8 = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in uint8]

    def _append_image(self, conversations, images, round_index, request: GenerationRequest) -> None:
        """Feed a round's image back: clean VAE latents (generation expert), then ViT tokens."""
        patch, ae = self.config.latent_patch_size, self.config.ae
        pixels = torch.stack([ImageTransform(*request.vae_transform)(img) for img in images]).to(self.device,
                                                                                                 self.dtype)
        shape = (ae.z_channels, pixels.shape[2] // ae.downsample, pixels.shape[3] // ae.downsample)
        given = request.vae_encode_noise[round_index]
        if given is not None and given.shape[0] == 1:
            given = given[0]
        noise = torch.stack([self._noise(given, i, shape, c.generator) for i, c in enumerate(conversations)])
        latent = self.autoencoder.encode(pixels, noise=noise.to(self.dtype))
        grid = (latent.shape[2] // patch, latent.shape[3] // patch)
        tokens = [patchify_latent(z, patch) for z in latent]
        positions = grid_position_ids(*grid, self.config.max_latent_size, device=self.device)
        mains = self.model.prefill_vae_image([c.main for c in conversations], tokens, [positions] * len(tokens))

        vit_patches, vit_positions = [], []
        for img in images:
            patches, pos = patchify_image(ImageTransform(*request.vit_transform)(img), self.config.vit.patch_size,
                                          self.config.vit_max_num_patch_per_side)
            vit_patches.append(patches.to(self.device, self.dtype))
            vit_positions.append(pos.to(self.device))
        mains = self.model.prefill_vit_image(mains, vit_patches, vit_positions)
        for c, m in zip(conversations, mains):
            c.main = m
            c.text_cfg = m  # the next image's text-unconditional context: everything but the reflection
