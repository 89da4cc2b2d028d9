"""The IRG multi-step generator: think, draw, reflect on the drawing, draw again.

Per prompt the pipeline keeps three contexts as KV caches (forking a cache is free):
* ``main``: system prompt, user prompt, each think, each image (clean VAE latents, then ViT tokens);
* ``text_cfg``: the context of the text-unconditional branch: system prompt only for round 1, then
  ``main`` as it was before the latest reflection;
* ``text_only``: every text span and no image, the context of the image-unconditional branch.
All prompts of a batch and all CFG branches run packed in one model forward per step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from irg.model import KVCache, load_pretrained
from irg.model.latents import grid_position_ids, patchify_latent, unpatchify_latent
from irg.pipeline.events import PipelineEvent
from irg.pipeline.flow import StepResult, sample_flow
from irg.pipeline.prompts import SYSTEM_PROMPT
from irg.pipeline.settings import RoundSettings, default_round_settings
from irg.pipeline.text import next_tokens
from irg.transforms import ImageTransform, patchify_image

VAE_TRANSFORM = (1024, 512, 16)
VIT_TRANSFORM = (980, 224, 14)
MAX_CACHED_SYSTEM_PROMPTS = 4


@dataclass
class IRGOutput:
    """The result for one prompt: one think text, image and final packed latent per round."""

    prompt: str
    texts: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Conversation:
    main: KVCache
    text_cfg: KVCache
    text_only: KVCache | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a ValueError that says why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"unsupported device {str(device)!r}")
    return device


class IRGPipeline:
    def __init__(self, model, autoencoder, tokenizer):
        self.model = model
        self.autoencoder = autoencoder
        self.tokenizer = tokenizer
        self.config = model.config
        self.im_start, self.im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        self._system_caches: dict[str, KVCache] = {}

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        device = resolve_device(device)
        pretrained = load_pretrained(path, device=device, dtype=dtype)
        return cls(pretrained.model, pretrained.autoencoder, pretrained.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vae2llm.weight.dtype

    # ------------------------------------------------------------------ public API

    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 50,
        rounds: int = 2,
        seed: int | None = None,
        think_texts: Sequence | None = None,
        images: Sequence | None = None,
        init_noise: Sequence[torch.Tensor] | None = None,
        vae_encode_noise: Sequence[torch.Tensor] | None = None,
        round_settings: Sequence[dict | RoundSettings] | None = None,
        vae_transform: tuple[int, int, int] = VAE_TRANSFORM,
        vit_transform: tuple[int, int, int] = VIT_TRANSFORM,
        think_temperature: float = 0.3,
        max_think_tokens: int = 1024,
        system_prompt: str = SYSTEM_PROMPT,
        callback: Callable[[PipelineEvent], None] | None = None,
    ) -> IRGOutput | list[IRGOutput]:
        """Generate ``rounds`` images per prompt, each after a think (round 2+: a reflection).

        ``prompt`` may be one string (returns an :class:`IRGOutput`) or a list (returns a list).
        ``think_texts``: per round, a text to use instead of generating one (None entries are
        generated); for a batch, one such list per prompt. ``images``: likewise, PIL images to use
        as a round's image instead of sampling one (to refine a draft; its latent is then None).
        ``init_noise[r]``: initial latent of round r, [N, 64] or [B, N, 64].
        ``vae_encode_noise[r]``: noise of re-encoding round r's image, [1 or B, 16, h, w].
        ``round_settings[r]``: overrides of :class:`RoundSettings` for round r.
        """
        single = isinstance(prompt, str)
        if not single and not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt: must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        settings = self._validate(prompts, height, width, num_steps, rounds, round_settings, vae_transform,
                                  vit_transform, think_temperature, max_think_tokens, system_prompt)
        self._validate_noise(init_noise, vae_encode_noise, len(prompts), height, width, rounds, vae_transform)
        thinks = _per_prompt_rounds("think_texts", think_texts, str, single, len(prompts), rounds)
        given_images = _per_prompt_rounds("images", images, Image.Image, single, len(prompts), rounds)
        for img in (img for per_prompt in given_images for img in per_prompt if img is not None):
            if img.size != (width, height):
                raise ValueError(f"images: a given image is {img.width}x{img.height}, the request {width}x{height}")
        if seed is None:
            seed = random.randrange(2**63)
        generator = torch.Generator().manual_seed(seed)
        emit = callback or (lambda event: None)
        outputs = [IRGOutput(prompt=p, seed=seed) for p in prompts]
        grid = (height // self.config.pixels_per_latent_token, width // self.config.pixels_per_latent_token)

        start = time.perf_counter()
        system = self._system_cache(system_prompt)
        mains = self.model.prefill_text([system] * len(prompts), [self._wrap(p) for p in prompts])
        conversations = [_Conversation(main=m, text_cfg=system) for m in mains]
        for r in range(rounds):
            round_start = time.perf_counter()
            texts = self._think(conversations, [t[r] for t in thinks], r, think_temperature, max_think_tokens,
                                generator, emit)
            think_done = time.perf_counter()
            self._append_think(conversations, texts, r)
            round_images, latents = self._round_images(conversations, [g[r] for g in given_images], init_noise,
                                                       grid, num_steps, settings[r], r, generator, emit)
            for i, out in enumerate(outputs):
                out.texts.append(texts[i])
                out.images.append(round_images[i])
                out.latents.append(latents[i])
                out.timings[f"round{r + 1}_think_s"] = think_done - round_start
                out.timings[f"round{r + 1}_image_s"] = time.perf_counter() - think_done
                emit(PipelineEvent("image", r, i, image=round_images[i]))
            if r + 1 < rounds:
                self._append_image(conversations, round_images, r, vae_encode_noise, vae_transform, vit_transform,
                                   generator)
        for out in outputs:
            out.timings["total_s"] = time.perf_counter() - start
        emit(PipelineEvent("done", rounds - 1))
        return outputs[0] if single else outputs

    # ------------------------------------------------------------------ validation

    def _validate(self, prompts, height, width, num_steps, rounds, round_settings, vae_transform, vit_transform,
                  think_temperature, max_think_tokens, system_prompt) -> list[RoundSettings]:
        """Every check that can fail runs here, before any model work."""
        if not prompts:
            raise ValueError("prompt: at least one prompt is required")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError("prompt: must be a non-empty string")
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise ValueError("system_prompt: must be a non-empty string")
        unit = self.config.pixels_per_latent_token
        max_side = unit * self.config.max_latent_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % unit:
                raise ValueError(f"{name}: must be a positive multiple of {unit}, got {value!r}")
            if value > max_side:
                raise ValueError(f"{name}: {value} exceeds the model's latent grid ({max_side} px per side)")
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps: must be an integer >= 2, got {num_steps!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: must be an integer >= 1, got {rounds!r}")
        for name, value in (("vae_transform", vae_transform), ("vit_transform", vit_transform)):
            if len(value) != 3 or any(not isinstance(v, int) or v <= 0 for v in value) or value[1] > value[0]:
                raise ValueError(f"{name}: must be (max_size, min_size, stride) positive ints, got {value!r}")
        if vit_transform[0] > self.config.vit.patch_size * self.config.vit_max_num_patch_per_side:
            raise ValueError(f"vit_transform: max_size {vit_transform[0]} exceeds the ViT position table")
        if vae_transform[0] > max_side:
            raise ValueError(f"vae_transform: max_size {vae_transform[0]} exceeds the latent grid ({max_side} px)")
        if think_temperature < 0:
            raise ValueError(f"think_temperature: must be >= 0, got {think_temperature}")
        if not isinstance(max_think_tokens, int) or max_think_tokens < 1:
            raise ValueError(f"max_think_tokens: must be an integer >= 1, got {max_think_tokens!r}")
        overrides = list(round_settings or [])
        if len(overrides) > rounds:
            raise ValueError(f"round_settings: {len(overrides)} entries for {rounds} rounds")
        settings = []
        for r in range(rounds):
            base = default_round_settings(r)
            override = overrides[r] if r < len(overrides) else None
            if isinstance(override, RoundSettings):
                settings.append(override)
            elif override:
                settings.append(base.with_overrides(dict(override)))
            else:
                settings.append(base)
        return settings

    def _validate_noise(self, init_noise, vae_encode_noise, batch, height, width, rounds, vae_transform) -> None:
        unit = self.config.pixels_per_latent_token
        tokens = (height // unit) * (width // unit)
        w, h = ImageTransform(*vae_transform).target_size(width, height)
        latent = (self.config.ae.z_channels, h // self.config.ae.downsample, w // self.config.ae.downsample)
        for name, values, shapes in (
            ("init_noise", init_noise, [(tokens, self.config.latent_channels),
                                        (batch, tokens, self.config.latent_channels)]),
            ("vae_encode_noise", vae_encode_noise, [(1, *latent), (batch, *latent)]),
        ):
            if values is None:
                continue
            if len(values) > rounds:
                raise ValueError(f"{name}: {len(values)} entries for {rounds} rounds")
            for r, value in enumerate(values):
                if value is not None and tuple(torch.as_tensor(value).shape) not in shapes:
                    raise ValueError(f"{name}[{r}]: expected shape {' or '.join(map(str, shapes))}, "
                                     f"got {tuple(torch.as_tensor(value).shape)}")

    # ------------------------------------------------------------------ text

    def _wrap(self, text: str) -> torch.Tensor:
        """Every text span is ``<|im_start|>`` + ids + ``<|im_end|>``, with no role names."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([self.im_start, *ids, self.im_end], device=self.device)

    def _system_cache(self, system_prompt: str) -> KVCache:
        """The system prompt is nearly always the same: prefill it once per pipeline (a few kept)."""
        if system_prompt not in self._system_caches:
            if len(self._system_caches) >= MAX_CACHED_SYSTEM_PROMPTS:
                self._system_caches.pop(next(iter(self._system_caches)))
            (self._system_caches[system_prompt],) = self.model.prefill_text([KVCache()], [self._wrap(system_prompt)])
        return self._system_caches[system_prompt]

    def _think(self, conversations, given, round_index, temperature, max_tokens, generator, emit) -> list[str]:
        """The round's think texts: the given ones, others sampled until ``<|im_end|>``."""
        texts = list(given)
        todo = [i for i, t in enumerate(texts) if t is None]
        caches = {i: conversations[i].main for i in todo}
        generated: dict[int, list[int]] = {i: [] for i in todo}
        tokens = [self.im_start] * len(todo)
        for _ in range(max_tokens):
            if not todo:
                break
            logits, new_caches = self.model.decode_step([caches[i] for i in todo],
                                                        torch.tensor(tokens, device=self.device))
            chosen = next_tokens(logits, temperature, generator).tolist()
            still, tokens = [], []
            for i, cache, token in zip(todo, new_caches, chosen):
                if token == self.im_end:
                    continue
                caches[i] = cache
                generated[i].append(token)
                still.append(i)
                tokens.append(token)
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

    def _round_images(self, conversations, given, init_noise, grid, num_steps, settings, round_index, generator,
                      emit) -> tuple[list[Image.Image], list[torch.Tensor | None]]:
        """Sample (and decode) the round's image for every prompt that was not given one."""
        images, latents = list(given), [None] * len(given)
        todo = [i for i, img in enumerate(given) if img is None]
        if not todo:
            return images, latents
        shape = (len(given), grid[0] * grid[1], self.config.latent_channels)
        noise = self._noise(init_noise, round_index, shape, generator)[todo]
        sampled = self._sample_image([conversations[i] for i in todo], noise, grid, num_steps, settings,
                                     round_index, emit)
        for i, image, latent in zip(todo, self._decode(sampled, grid), sampled):
            images[i], latents[i] = image, latent.cpu()
        return images, latents

    def _noise(self, given, round_index: int, shape: tuple[int, ...], generator) -> torch.Tensor:
        """The caller's noise for this round (validated, broadcast over the batch) or a fresh draw."""
        if given is not None and round_index < len(given) and given[round_index] is not None:
            return torch.as_tensor(given[round_index], dtype=torch.float32).expand(shape).to(self.device)
        return torch.randn(shape, generator=generator).to(self.device)

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

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, grid) -> list[Image.Image]:
        patch = self.config.latent_patch_size
        z = torch.stack([unpatchify_latent(x, *grid, patch) for x in latents])
        pixels = self.autoencoder.decode(z.to(self.dtype)).float()
        uint8 = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in uint8]

    @torch.no_grad()
    def _append_image(self, conversations, images, round_index, vae_encode_noise, vae_transform, vit_transform,
                      generator) -> None:
        """Feed a round's image back: clean VAE latents (generation expert), then ViT tokens."""
        patch, ae = self.config.latent_patch_size, self.config.ae
        pixels = torch.stack([ImageTransform(*vae_transform)(img) for img in images]).to(self.device, self.dtype)
        latent_shape = (len(images), ae.z_channels, pixels.shape[2] // ae.downsample, pixels.shape[3] // ae.downsample)
        noise = self._noise(vae_encode_noise, round_index, latent_shape, generator)
        latent = self.autoencoder.encode(pixels, noise=noise.to(self.dtype))
        grid = (latent.shape[2] // patch, latent.shape[3] // patch)
        tokens = [patchify_latent(z, patch) for z in latent]
        positions = grid_position_ids(*grid, self.config.max_latent_size, device=self.device)
        mains = self.model.prefill_vae_image([c.main for c in conversations], tokens, [positions] * len(tokens))

        vit_patches, vit_positions = [], []
        for img in images:
            patches, pos = patchify_image(ImageTransform(*vit_transform)(img), self.config.vit.patch_size,
                                          self.config.vit_max_num_patch_per_side)
            vit_patches.append(patches.to(self.device, self.dtype))
            vit_positions.append(pos.to(self.device))
        mains = self.model.prefill_vit_image(mains, vit_patches, vit_positions)
        for c, m in zip(conversations, mains):
            c.main = m
            c.text_cfg = m  # the next image's text-unconditional context: everything but the reflection


def _per_prompt_rounds(name: str, values, kind: type, single: bool, batch: int, rounds: int) -> list[list]:
    """Normalise an optional per-round input to one list of ``rounds`` entries (None = generate) per prompt."""
    if values is None:
        return [[None] * rounds for _ in range(batch)]
    per_prompt = [list(values)] if single else [list(v) if v is not None else [] for v in values]
    if len(per_prompt) != batch:
        raise ValueError(f"{name}: expected one list per prompt ({batch}), got {len(per_prompt)}")
    for entries in per_prompt:
        if len(entries) > rounds:
            raise ValueError(f"{name}: {len(entries)} entries for {rounds} rounds")
        if any(e is not None and not isinstance(e, kind) for e in entries):
            raise ValueError(f"{name}: entries must be {kind.__name__} or None")
    return [entries + [None] * (rounds - len(entries)) for entries in per_prompt]
