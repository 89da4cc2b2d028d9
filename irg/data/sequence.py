"""From a parsed IRGL row to the token plan the model trains on, and from plans to packed batches.

A *sample* is the row's parts turned into model inputs: tokenised text spans (with or without loss),
clean VAE images, ViT patches and noised generation targets, after the per-image transforms and
condition dropout. *Packing* concatenates samples into one :class:`~irg.model.PackedBatch` with
per-sample attention masks, following the reference packing rule for rule:

* text: ``<|im_start|>`` + ids + ``<|im_end|>``, causal; with loss, the ``<|im_start|>`` and text
  positions predict the next ids (the text, then ``<|im_end|>``);
* clean VAE / ViT image: ``<|vision_start|>`` + tokens + ``<|vision_end|>``, bidirectional, all at
  one RoPE position, which then advances by 1;
* generation target: like a clean VAE image, noised, seen by no later token, position not advanced;
* a condition removed by dropout still advances the position (text dropout does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from irg.data.format import ImagePart, Part, TextPart
from irg.model import BagelConfig, PackedBatch
from irg.model.latents import grid_position_ids
from irg.transforms import ImageTransform, normalize, patchify


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing of training samples. Dropouts are the IRG reference settings; the image transforms
    default to the checkpoint's own (:attr:`BagelConfig.vae_transform` / ``vit_transform``), and the
    latent grid, the ViT position table and both strides always come from the checkpoint."""

    vae_transform: tuple[int, int, int] | None = None  # (max size, min size, stride) of VAE images
    vit_transform: tuple[int, int, int] | None = None
    text_cond_dropout: float = 0.1
    vae_cond_dropout: float = 0.3
    vit_cond_dropout: float = 0.3

    def __post_init__(self):
        for name in ("text_cond_dropout", "vae_cond_dropout", "vit_cond_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"])
        return cls(*ids)


@dataclass
class TextItem:
    ids: np.ndarray  # int64, without the wrapping special tokens
    loss: bool

    @property
    def num_tokens(self) -> int:
        return len(self.ids) + 2


@dataclass
class VitItem:
    pixels: np.ndarray  # [3, H, W] uint8, resized; patchified when packed
    position_ids: np.ndarray  # [n] int64 into the ViT position table
    patch_size: int  # the ViT's patch side in pixels

    @property
    def num_tokens(self) -> int:
        return len(self.position_ids) + 2


@dataclass
class VaeItem:
    pixels: np.ndarray  # [3, H, W] uint8, resized; the autoencoder runs on the training worker
    position_ids: np.ndarray  # [h·w] int64 into the latent position table
    loss: bool  # a noised generation target (else a clean condition)
    raw_timestep: float  # N(0, 1) draw for targets (shifted in the model), -inf for clean images
    stride: int  # pixels per latent token: the autoencoder's downsampling times the latent patch

    @property
    def grid(self) -> tuple[int, int]:
        return self.pixels.shape[1] // self.stride, self.pixels.shape[2] // self.stride

    @property
    def num_tokens(self) -> int:
        return len(self.position_ids) + 2


@dataclass
class DroppedCondition:
    """An image condition removed by dropout: it leaves no token but still takes one RoPE position."""

    num_tokens: int = 0


Item = TextItem | VitItem | VaeItem | DroppedCondition


@dataclass
class Sample:
    items: list[Item] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


def build_sample(parts: list[Part], tokenizer, config: PreprocessConfig, model: BagelConfig,
                 rng: np.random.Generator) -> Sample:
    """Tokenise, transform and apply condition dropout to one conversation, for the model ``model`` describes."""
    vae_transform = ImageTransform(*(config.vae_transform or model.vae_transform))
    vit_transform = ImageTransform(*(config.vit_transform or model.vit_transform))
    if vae_transform.stride != model.pixels_per_latent_token:
        raise ValueError(f"vae_transform stride must be {model.pixels_per_latent_token} (pixels per latent token), "
                         f"got {vae_transform.stride}")
    if vit_transform.stride != model.vit.patch_size:
        raise ValueError(f"vit_transform stride must be {model.vit.patch_size} (the ViT patch), "
                         f"got {vit_transform.stride}")
    sample = Sample()
    for part in parts:
        if isinstance(part, TextPart):
            if rng.random() < config.text_cond_dropout:
                continue
            ids = np.asarray(tokenizer.encode(part.text, add_special_tokens=False), dtype=np.int64)
            sample.items.append(TextItem(ids, part.loss))
            continue
        assert isinstance(part, ImagePart)
        if part.loss:
            sample.items.append(_vae_item(part, vae_transform, model, float(rng.standard_normal())))
        if part.vae:
            dropped = rng.random() < config.vae_cond_dropout
            sample.items.append(DroppedCondition() if dropped else _vae_item(part, vae_transform, model, -np.inf))
        if part.vit:
            if rng.random() < config.vit_cond_dropout:
                sample.items.append(DroppedCondition())
            else:
                sample.items.append(_vit_item(part, vit_transform, model))
    return sample


def _vit_item(part: ImagePart, transform: ImageTransform, model: BagelConfig) -> VitItem:
    pixels = transform.resize(part.image)
    rows, cols = pixels.shape[1] // transform.stride, pixels.shape[2] // transform.stride
    per_side = model.vit_max_num_patch_per_side
    if max(rows, cols) > per_side:
        raise ValueError(f"{rows}x{cols} ViT patches exceed {per_side} per side")
    return VitItem(pixels=pixels, position_ids=grid_position_ids(rows, cols, per_side).numpy(),
                   patch_size=transform.stride)


def _vae_item(part: ImagePart, transform: ImageTransform, model: BagelConfig, raw_timestep: float) -> VaeItem:
    pixels = transform.resize(part.image)
    stride = transform.stride
    h, w = pixels.shape[1] // stride, pixels.shape[2] // stride
    if max(h, w) > model.max_latent_size:
        raise ValueError(f"image of {pixels.shape[2]}x{pixels.shape[1]} exceeds the latent grid "
                         f"({model.max_latent_size * stride} px per side)")
    return VaeItem(pixels=pixels, position_ids=grid_position_ids(h, w, model.max_latent_size).numpy(), loss=part.loss,
                   raw_timestep=raw_timestep, stride=stride)


def pack(samples: list[Sample], special: SpecialTokens) -> PackedBatch:
    """Concatenate samples into one packed batch with per-sample attention masks."""
    b = _PackedLists()
    for sample in samples:
        _pack_one(sample, special, b)
    return b.to_batch()


@dataclass
class _PackedLists:
    curr: int = 0
    sample_lens: list = field(default_factory=list)
    position_ids: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    text_ids: list = field(default_factory=list)
    text_indexes: list = field(default_factory=list)
    label_ids: list = field(default_factory=list)
    ce_indexes: list = field(default_factory=list)
    ce_weights: list = field(default_factory=list)
    vae_images: list = field(default_factory=list)
    vae_grids: list = field(default_factory=list)
    latent_position_ids: list = field(default_factory=list)
    vae_indexes: list = field(default_factory=list)
    timesteps: list = field(default_factory=list)
    mse_indexes: list = field(default_factory=list)
    vit_tokens: list = field(default_factory=list)
    vit_position_ids: list = field(default_factory=list)
    vit_indexes: list = field(default_factory=list)
    vit_seqlens: list = field(default_factory=list)

    def add_text(self, ids, index: int):
        self.text_ids.extend(ids)
        self.text_indexes.extend(range(index, index + len(ids)))

    def to_batch(self) -> PackedBatch:
        def long(values):
            return torch.tensor(values, dtype=torch.long)

        batch = PackedBatch(
            sequence_length=sum(self.sample_lens), sample_lens=list(self.sample_lens),
            packed_position_ids=long(self.position_ids), attention_masks=self.masks,
            packed_text_ids=long(self.text_ids), packed_text_indexes=long(self.text_indexes),
        )
        if self.vae_images:
            batch.padded_images = _pad_images(self.vae_images)
            batch.patchified_vae_latent_shapes = list(self.vae_grids)
            batch.packed_latent_position_ids = torch.from_numpy(np.concatenate(self.latent_position_ids))
            batch.packed_vae_token_indexes = long(self.vae_indexes)
            batch.packed_timesteps = torch.tensor(self.timesteps, dtype=torch.float32)
            batch.mse_loss_indexes = long(self.mse_indexes)
        if self.vit_tokens:
            batch.packed_vit_tokens = torch.cat(self.vit_tokens)
            batch.packed_vit_position_ids = torch.from_numpy(np.concatenate(self.vit_position_ids))
            batch.packed_vit_token_indexes = long(self.vit_indexes)
            batch.vit_token_seqlens = long(self.vit_seqlens)
        if self.label_ids:
            batch.packed_label_ids = long(self.label_ids)
            batch.ce_loss_indexes = long(self.ce_indexes)
            batch.ce_loss_weights = torch.tensor(self.ce_weights, dtype=torch.float32)
        return batch


def _pack_one(sample: Sample, special: SpecialTokens, b: _PackedLists) -> None:
    start, rope = b.curr, 0
    splits: list[tuple[int, str]] = []  # (length, attention mode) of each span of the sample
    for item in sample.items:
        if isinstance(item, DroppedCondition):
            rope += 1
            continue
        length = item.num_tokens
        if isinstance(item, TextItem):
            shifted = [special.im_start, *item.ids.tolist()]
            b.add_text(shifted + [special.im_end], b.curr)
            if item.loss:
                b.ce_indexes.extend(range(b.curr, b.curr + len(shifted)))
                b.ce_weights.extend([1.0 / np.sqrt(len(shifted))] * len(shifted))
                b.label_ids.extend(item.ids.tolist() + [special.im_end])
            b.position_ids.extend(range(rope, rope + length))
            rope += length
            splits.append((length, "causal"))
        else:
            n = length - 2
            b.add_text([special.vision_start], b.curr)
            b.add_text([special.vision_end], b.curr + n + 1)
            b.position_ids.extend([rope] * length)
            if isinstance(item, VitItem):
                b.vit_indexes.extend(range(b.curr + 1, b.curr + 1 + n))
                b.vit_tokens.append(patchify(normalize(item.pixels), item.patch_size))
                b.vit_position_ids.append(item.position_ids)
                b.vit_seqlens.append(n)
                rope += 1
                splits.append((length, "full"))
            else:
                b.vae_images.append(normalize(item.pixels))
                b.vae_grids.append(item.grid)
                b.latent_position_ids.append(item.position_ids)
                b.vae_indexes.extend(range(b.curr + 1, b.curr + 1 + n))
                b.timesteps.extend([item.raw_timestep] * n)
                if item.loss:
                    b.mse_indexes.extend(range(b.curr + 1, b.curr + 1 + n))
                    splits.append((length, "noise"))
                else:
                    rope += 1
                    splits.append((length, "full"))
        b.curr += length
    b.sample_lens.append(b.curr - start)
    b.masks.append(attention_mask(splits))


def attention_mask(splits: list[tuple[int, str]]) -> torch.Tensor:
    """Boolean mask (True = attend) of one sample from its spans.

    causal spans see every earlier span and themselves causally; full and noise spans see every
    earlier span and all of themselves; then no token outside a noise span may see it.
    """
    total = sum(length for length, _ in splits)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length, mode in splits:
        end = start + length
        mask[start:end, :start] = True
        block = torch.ones(length, length, dtype=torch.bool)
        mask[start:end, start:end] = block.tril() if mode == "causal" else block
        start = end
    start = 0
    for length, mode in splits:
        end = start + length
        if mode == "noise":
            mask[:, start:end] = False
            mask[start:end, start:end] = True
        start = end
    return mask


def _pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    padded = torch.zeros(len(images), 3, height, width)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]] = img
    return padded
