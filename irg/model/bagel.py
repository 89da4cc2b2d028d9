"""The unified model: MoT language model + SigLIP understanding tower + latent-token glue.

The autoencoder is not part of this module: the official checkpoint keeps it in its own file
(``ae.safetensors``) and it stays frozen, so callers encode/decode pixels themselves.

Two entry points:
* :meth:`Bagel.forward` — packed training forward (CE on text, rectified-flow MSE on latents).
* cache-based inference: :meth:`Bagel.forward_blocks` runs blocks of new tokens (text, image,
  noised latents), each against its own context, packed into one forward pass; ``prefill_text``,
  ``prefill_vae_image``, ``prefill_vit_image``, ``decode_step`` and ``predict_velocity`` are that
  forward over blocks of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from irg.model.attention import CAUSAL, FULL, KVCache, PackedAttention
from irg.model.batch import PackedBatch
from irg.model.config import BagelConfig
from irg.model.embeddings import PositionEmbedding2D, TimestepEmbedder
from irg.model.latents import patchify_latent, sample_timesteps, shift_timesteps
from irg.model.llm import MoTLanguageModel, TokenRouting
from irg.model.vit import MLPConnector, SiglipVisionTower


@dataclass
class TrainingOutput:
    """Per-token losses (reduction is the trainer's job: it needs token counts across ranks)."""

    last_hidden_state: torch.Tensor
    ce_logits: torch.Tensor | None
    ce_per_token: torch.Tensor | None  # [num_ce_tokens]
    mse_preds: torch.Tensor | None
    mse_per_element: torch.Tensor | None  # [num_noised_tokens, latent_channels]
    idle_branches: torch.Tensor | None = None  # a zero tied to branches the batch left unused (see forward)


@dataclass
class ContextBlock:
    """New tokens for one context in a packed inference forward: input embeddings, which of them go to
    the generation expert, their RoPE positions and mask, whether they join the context's cache
    (``keep``) and how far they move its next position (``advance``)."""

    embeds: torch.Tensor
    gen_mask: torch.Tensor
    position_ids: torch.Tensor
    mask: str
    keep: bool = True
    advance: int = 0


class Bagel(nn.Module):
    def __init__(self, config: BagelConfig):
        super().__init__()
        for name in ("image_start_token_id", "image_end_token_id"):
            if not 0 <= getattr(config, name) < config.llm.vocab_size:
                raise ValueError(f"{name} {getattr(config, name)} is outside the vocabulary ({config.llm.vocab_size})")
        self.config = config
        hidden = config.llm.hidden_size
        self.language_model = MoTLanguageModel(config.llm)
        self.vit_model = SiglipVisionTower(config.vit)
        self.connector = MLPConnector(config.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding2D(config.vit_max_num_patch_per_side, hidden)
        self.latent_pos_embed = PositionEmbedding2D(config.max_latent_size, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.latent_channels, hidden)
        self.llm2vae = nn.Linear(hidden, config.latent_channels)

    # ---------------------------------------------------------------- token embeddings

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens) -> torch.Tensor:
        """Flattened 14x14 patches of one or more images -> LLM inputs of their ViT tokens."""
        features = self.vit_model(patches.to(self.vae2llm.weight.dtype), position_ids, seqlens)
        return self.connector(features) + self.vit_pos_embed(position_ids)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Latent tokens x [N, 64] at flow times t [N] -> LLM inputs."""
        x = x.to(self.vae2llm.weight.dtype)
        return self.vae2llm(x) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    # ---------------------------------------------------------------- training

    def forward(
        self,
        batch: PackedBatch,
        padded_latent: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cover_idle_branches: bool = False,
    ) -> TrainingOutput:
        """Packed training forward.

        ``padded_latent`` is the (frozen) autoencoder's scaled latent of ``batch.padded_images``;
        ``noise`` the flow noise for every latent token (drawn when not given).

        ``cover_idle_branches`` is for data-parallel engines that handle parameters module by module
        (DeepSpeed ZeRO): every rank must run the same modules in the same order and give every
        trainable parameter a gradient, whatever its batch holds. A branch this batch does not use
        (ViT, latent embedding, generation expert, either head) then runs in its usual place on a
        dummy or empty input, and ``idle_branches`` (zero) ties those outputs into the loss.
        """
        device, dtype = self.vae2llm.weight.device, self.vae2llm.weight.dtype
        hidden = self.config.llm.hidden_size
        idle: list[torch.Tensor] = []
        x = torch.zeros(batch.sequence_length, hidden, device=device, dtype=dtype)
        x[batch.packed_text_indexes] = self.embed_text(batch.packed_text_ids)
        gen_mask = torch.zeros(batch.sequence_length, dtype=torch.bool, device=device)

        if batch.has_vit:
            x[batch.packed_vit_token_indexes] = self.embed_vit(
                batch.packed_vit_tokens, batch.packed_vit_position_ids, batch.vit_token_seqlens
            )
        elif cover_idle_branches:  # one blank patch: the ViT cannot take an image of no patches
            patch = torch.zeros(1, 3 * self.config.vit.patch_size**2, device=device, dtype=dtype)
            idle.append(self.embed_vit(patch, torch.zeros(1, dtype=torch.long, device=device), [1]))

        mse_target = t = None
        if batch.has_latents:
            if padded_latent is None:
                raise ValueError("the batch has latent tokens but no padded_latent was given")
            patch = self.config.latent_patch_size
            x0 = torch.cat([
                patchify_latent(latent[:, : h * patch, : w * patch], patch)
                for latent, (h, w) in zip(padded_latent, batch.patchified_vae_latent_shapes)
            ]).to(dtype)
            if noise is None:  # drawn where the generator lives, so a CPU generator works for a GPU model
                gen_device = generator.device if generator is not None else device
                noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device, dtype)
            t = shift_timesteps(sample_timesteps(batch.packed_timesteps.float(), self.config.timestep_sampling),
                                self.config.timestep_shift)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            x[batch.packed_vae_token_indexes] = self.embed_latents(x_t, t, batch.packed_latent_position_ids)
            gen_mask[batch.packed_vae_token_indexes] = True
            mse_target = noise - x0
        elif cover_idle_branches:
            none = torch.zeros(0, dtype=torch.long, device=device)
            no_latents = torch.zeros(0, self.config.latent_channels, device=device)
            idle.append(self.embed_latents(no_latents, none.float(), none))

        spec = PackedAttention(list(batch.sample_lens), list(batch.attention_masks))
        routing = TokenRouting.from_gen_mask(gen_mask, both_experts=cover_idle_branches)
        last_hidden, _ = self.language_model.model(x, batch.packed_position_ids, routing, spec)

        ce_logits = ce_per_token = None
        if batch.ce_loss_indexes is not None and batch.ce_loss_indexes.numel():
            ce_logits = self.language_model.lm_head(last_hidden[batch.ce_loss_indexes])
            ce_per_token = F.cross_entropy(ce_logits.float(), batch.packed_label_ids, reduction="none")
        elif cover_idle_branches:
            idle.append(self.language_model.lm_head(last_hidden[:0]))

        mse_preds = mse_per_element = None
        if mse_target is not None and batch.mse_loss_indexes is not None and batch.mse_loss_indexes.numel():
            mse_preds = self.llm2vae(last_hidden[batch.mse_loss_indexes])
            noised = t > 0
            mse_per_element = (mse_preds.float() - mse_target[noised].float()) ** 2
        elif cover_idle_branches:
            idle.append(self.llm2vae(last_hidden[:0]))

        idle_branches = sum((o.float().sum() for o in idle), last_hidden.new_zeros((), dtype=torch.float32)) * 0.0 \
            if cover_idle_branches else None
        return TrainingOutput(last_hidden, ce_logits, ce_per_token, mse_preds, mse_per_element, idle_branches)

    # ---------------------------------------------------------------- cached inference

    def forward_blocks(self, caches: list[KVCache], blocks: list[ContextBlock]) -> tuple[list[torch.Tensor], list]:
        """One forward of new token blocks, block i attending to cache i; blocks of any kind (text kept
        in the cache, image blocks, noised latents that are only read) share it. Returns the hidden
        states of each block and, per block, its context extended by it (None for a block not kept)."""
        embeds = torch.cat([b.embeds for b in blocks])
        position_ids = torch.cat([b.position_ids for b in blocks])
        routing = TokenRouting.from_gen_mask(torch.cat([b.gen_mask for b in blocks]))
        spec = PackedAttention([b.embeds.shape[0] for b in blocks], [b.mask for b in blocks],
                               cache_new=[b.keep for b in blocks])
        num_layers = self.config.llm.num_hidden_layers
        past = None
        if any(c.layers for c in caches):
            past = [[c.layers[layer] if c.layers else None for c in caches] for layer in range(num_layers)]
        hidden, presents = self.language_model.model(embeds, position_ids, routing, spec, past)
        new_caches = [
            KVCache(layers=[presents[layer][i] for layer in range(num_layers)],
                    length=cache.length + block.embeds.shape[0], position=cache.position + block.advance)
            if block.keep else None
            for i, (cache, block) in enumerate(zip(caches, blocks))
        ]
        return list(hidden.split(spec.query_lens)), new_caches

    def _positions(self, cache: KVCache, length: int, same: bool) -> torch.Tensor:
        device = self.vae2llm.weight.device
        if same:
            return torch.full((length,), cache.position, dtype=torch.long, device=device)
        return torch.arange(cache.position, cache.position + length, device=device)

    def text_block(self, cache: KVCache, ids: torch.Tensor) -> ContextBlock:
        """Text tokens appended to ``cache`` (causal, kept)."""
        ids = ids.to(self.vae2llm.weight.device)
        n = ids.shape[0]
        return ContextBlock(self.embed_text(ids), torch.zeros(n, dtype=torch.bool, device=ids.device),
                            self._positions(cache, n, same=False), CAUSAL, keep=True, advance=n)

    def image_block(self, cache: KVCache, token_embeds: torch.Tensor, generation_expert: bool,
                    keep: bool = True) -> ContextBlock:
        """``<|vision_start|>`` + image tokens + ``<|vision_end|>``, all at the context's current position;
        ``keep`` False for a block that is only read (a noised image), which then does not move it."""
        device = token_embeds.device
        marker_ids = [self.config.image_start_token_id, self.config.image_end_token_id]
        markers = self.embed_text(torch.tensor(marker_ids, device=device))
        embeds = torch.cat([markers[:1], token_embeds.to(markers.dtype), markers[1:]])
        n = token_embeds.shape[0]
        gen_mask = torch.zeros(n + 2, dtype=torch.bool, device=device)
        gen_mask[1 : n + 1] = generation_expert
        return ContextBlock(embeds, gen_mask, self._positions(cache, n + 2, same=True), FULL, keep=keep,
                            advance=1 if keep else 0)

    def vae_image_block(self, cache: KVCache, latent_tokens: torch.Tensor, position_ids: torch.Tensor) -> ContextBlock:
        """Clean latent tokens (t = 0) of an image as a conditioning block (kept)."""
        t = torch.zeros(latent_tokens.shape[0], device=latent_tokens.device)
        return self.image_block(cache, self.embed_latents(latent_tokens, t, position_ids), generation_expert=True)

    def noised_latent_block(self, cache: KVCache, x_t: torch.Tensor, t: float | torch.Tensor,
                            position_ids: torch.Tensor) -> ContextBlock:
        """Latent tokens x_t [N, 64] at flow time t, read against ``cache`` and not kept (a denoising step)."""
        n = x_t.shape[0]
        times = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(n)
        return self.image_block(cache, self.embed_latents(x_t, times, position_ids), generation_expert=True,
                                keep=False)

    def vit_embeds(self, patches: list[torch.Tensor], position_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ViT tokens (LLM inputs) of several images, encoded in one pass."""
        seqlens = [p.shape[0] for p in patches]
        return list(self.embed_vit(torch.cat(patches), torch.cat(position_ids), seqlens).split(seqlens))

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] (float32) of the next token after each of B hidden states [B, hidden]."""
        return self.language_model.lm_head(hidden).float()

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Flow velocity [N, 64] (float32) of a noised latent block from its hidden states (markers included)."""
        return self.llm2vae(hidden[1:-1]).float()

    @torch.no_grad()
    def prefill_text(self, caches: list[KVCache], ids: list[torch.Tensor]) -> list[KVCache]:
        """Append a text span (ids already wrapped in ``<|im_start|>``/``<|im_end|>``) to each context."""
        return self.forward_blocks(caches, [self.text_block(c, i) for c, i in zip(caches, ids)])[1]

    @torch.no_grad()
    def decode_step(self, caches: list[KVCache], token_ids: torch.Tensor) -> tuple[torch.Tensor, list[KVCache]]:
        """Feed one token per context; return next-token logits [B, vocab] and the extended caches."""
        blocks = [self.text_block(c, token_ids[i : i + 1]) for i, c in enumerate(caches)]
        hidden, caches = self.forward_blocks(caches, blocks)
        return self.next_token_logits(torch.cat(hidden)), caches

    @torch.no_grad()
    def prefill_vae_image(
        self, caches: list[KVCache], latent_tokens: list[torch.Tensor], position_ids: list[torch.Tensor]
    ) -> list[KVCache]:
        """Cache clean latent tokens (t = 0) of an image as a conditioning block."""
        blocks = [self.vae_image_block(c, tokens, pos) for c, tokens, pos in zip(caches, latent_tokens, position_ids)]
        return self.forward_blocks(caches, blocks)[1]

    @torch.no_grad()
    def prefill_vit_image(
        self, caches: list[KVCache], patches: list[torch.Tensor], position_ids: list[torch.Tensor]
    ) -> list[KVCache]:
        """Cache the understanding (ViT) tokens of an image."""
        vit = self.vit_embeds(patches, position_ids)
        blocks = [self.image_block(c, v, generation_expert=False) for c, v in zip(caches, vit)]
        return self.forward_blocks(caches, blocks)[1]

    @torch.no_grad()
    def predict_velocity(
        self, caches: list[KVCache], x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Flow velocity of latent tokens x_t [B, N, 64] at times t [B], sample i conditioned on
        context i; the query block is not cached. Returns [B, N, 64]."""
        blocks = [self.noised_latent_block(c, x_t[i], t[i], position_ids) for i, c in enumerate(caches)]
        hidden, _ = self.forward_blocks(caches, blocks)
        return torch.stack([self.velocity(h) for h in hidden])
