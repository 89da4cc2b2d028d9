"""FLUX autoencoder (the VAE BAGEL uses to turn images into 16-channel latents and back).

Module and parameter names follow black-forest-labs/flux so that the official ``ae.safetensors``
loads with ``load_state_dict(strict=True)``. Pixels are in [-1, 1]; the latent is 8x smaller per side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from irg.model.config import AEConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.silu to match the reference bit for bit.
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv layers plus a skip; a 1x1 conv aligns the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def to_tokens(t: torch.Tensor) -> torch.Tensor:  # [b, c, h, w] -> [b, 1 head, h*w, c]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        q, k, v = to_tokens(self.q(normed)), to_tokens(self.k(normed)), to_tokens(self.v(normed))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv; padding only right/bottom, as the reference does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour copy, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The bottleneck: resnet, attention, resnet (the only attention in the network)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Stage(nn.Module):
    """One resolution level: a stack of resnet blocks, then an optional resampling layer."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(widths[:-1], widths[1:]))
        # Attribute names are the reference's, so the checkpoint keys match.
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f] (mean, then logvar)."""

    def __init__(self, config: AEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = conv3x3(config.in_channels, config.ch)
        last = len(widths) - 1
        in_widths = [config.ch] + widths[:-1]
        self.down = nn.ModuleList(
            Stage(in_w, w, config.num_res_blocks, resample="down" if level != last else None)
            for level, (in_w, w) in enumerate(zip(in_widths, widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3x3(widths[-1], 2 * config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f].

    ``up[i]`` is the level of resolution i (0 = full size), so it runs in reverse order; each level
    has one more resnet block than the encoder's.
    """

    def __init__(self, config: AEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = conv3x3(config.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        in_widths = widths[1:] + [widths[-1]]  # each level is fed by the (deeper) level below it
        self.up = nn.ModuleList(
            Stage(in_w, w, config.num_res_blocks + 1, resample="up" if level != 0 else None)
            for level, (in_w, w) in enumerate(zip(in_widths, widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = conv3x3(widths[0], config.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """Encoder + decoder with FLUX's latent normalisation ``scale * (z - shift)``."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.scale_factor = config.scale_factor
        self.shift_factor = config.shift_factor

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output [B, 2*z_channels, h, w]: mean, then log-variance."""
        return self.encoder(x)

    def encode(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised latent of pixels in [-1, 1].

        The latent is a sample of the posterior, not its mean: the reference samples at inference
        too. ``noise`` (standard normal, latent-shaped) makes the sample reproducible.
        """
        mean, logvar = self.encode_moments(x).chunk(2, dim=1)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels (nominally in [-1, 1], not clamped) of a normalised latent."""
        return self.decoder(z / self.scale_factor + self.shift_factor)
