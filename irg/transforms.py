"""Image preprocessing shared by inference and the training data pipeline.

Both follow BAGEL's ``ImageTransform``: resize so the long side is at most ``max_size`` and the short
side at least ``min_size``, snap both sides to a multiple of ``stride`` (the ViT patch or the VAE
latent-token size), and map pixels to [-1, 1]. The arithmetic mirrors the reference step for step
(Python ``round``, PIL bicubic, ``/255`` then ``(x - 0.5) / 0.5``) so the pixels match it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from irg.model.latents import grid_position_ids


def _make_divisible(value: int, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


@dataclass(frozen=True)
class ImageTransform:
    """Resize to fit [min_size, max_size] on a ``stride`` grid, then normalise to [-1, 1]."""

    max_size: int
    min_size: int
    stride: int
    # BAGEL's pixel budget; with the sizes IRG uses it only bites on very elongated images.
    max_pixels: int = 14 * 14 * 9 * 1024

    def _scaled(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return (
            _make_divisible(round(width * scale), self.stride),
            _make_divisible(round(height * scale), self.stride),
        )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, computed exactly as the reference does."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image has zero size ({width}x{height})")
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._scaled(width, height, scale)
        if w * h > self.max_pixels:
            w, h = self._scaled(w, h, self.max_pixels / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._scaled(w, h, self.max_size / max(w, h))
        return w, h

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float32 tensor [3, H, W] in [-1, 1]."""
        return normalize(self.resize(image))

    def resize(self, image: Image.Image) -> np.ndarray:
        """PIL image -> resized uint8 array [3, H, W]: 4x smaller than floats to ship between processes."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as e:
            raise ValueError(f"cannot convert image of mode {image.mode!r} to RGB: {e}") from e
        size = self.target_size(*image.size)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 in [-1, 1], as the reference (``/255`` then ``(x - 0.5) / 0.5``)."""
    return torch.from_numpy(pixels).float().div(255).sub(0.5).div(0.5)


def patchify_image(
    image: torch.Tensor, patch_size: int, max_patches_per_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] -> (patches [N, 3*p*p], position ids [N]), patches in row-major order.

    A patch is flattened as (row-in-patch, col-in-patch, channel) with channel fastest, matching the
    Linear form of SigLIP's conv patch embedding; the position id ``r * max_patches_per_side + c``
    indexes the learned table of a ``max_patches_per_side``-wide grid, whatever the image's width.
    """
    patches = patchify(image, patch_size)
    rows, cols = image.shape[1] // patch_size, image.shape[2] // patch_size
    if max(rows, cols) > max_patches_per_side:
        raise ValueError(f"{rows}x{cols} patches exceed {max_patches_per_side} per side")
    return patches, grid_position_ids(rows, cols, max_patches_per_side)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> [N, 3*p*p] flattened patches in row-major order (see :func:`patchify_image`)."""
    if image.dim() != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
    c, h, w = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    return image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)
