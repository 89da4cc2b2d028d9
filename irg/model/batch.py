"""The packed training batch consumed by :meth:`irg.model.bagel.Bagel.forward`.

Several samples are concatenated into one token sequence. Field names follow the reference packing
so that batches are easy to compare; every index is a position in the packed sequence unless noted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    sequence_length: int
    sample_lens: list[int]
    packed_position_ids: torch.Tensor  # [T] RoPE positions, restarting at 0 for each sample
    attention_masks: list[torch.Tensor]  # per sample [L_i, L_i]: bool (True = attend) or additive float
    packed_text_ids: torch.Tensor
    packed_text_indexes: torch.Tensor
    # Generation-expert tokens (clean conditioning latents and noised targets), all images together.
    padded_images: torch.Tensor | None = None  # [n_images, 3, H_max, W_max] in [-1, 1]
    patchified_vae_latent_shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    packed_latent_position_ids: torch.Tensor | None = None  # index into latent_pos_embed
    packed_vae_token_indexes: torch.Tensor | None = None
    packed_timesteps: torch.Tensor | None = None  # raw draws; -inf marks clean conditioning tokens
    mse_loss_indexes: torch.Tensor | None = None
    # Understanding-expert image tokens.
    packed_vit_tokens: torch.Tensor | None = None  # [N_vit, 3·14·14] flattened patches
    packed_vit_position_ids: torch.Tensor | None = None
    packed_vit_token_indexes: torch.Tensor | None = None
    vit_token_seqlens: torch.Tensor | None = None
    # Text loss.
    ce_loss_indexes: torch.Tensor | None = None
    packed_label_ids: torch.Tensor | None = None
    ce_loss_weights: torch.Tensor | None = None

    @property
    def has_latents(self) -> bool:
        return self.packed_vae_token_indexes is not None and self.packed_vae_token_indexes.numel() > 0

    @property
    def has_vit(self) -> bool:
        return self.packed_vit_token_indexes is not None and self.packed_vit_token_indexes.numel() > 0

    def to(self, device) -> PackedBatch:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                return [v.to(device) for v in value]
            return value

        return PackedBatch(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})
