"""DRVAE: the denoising ResNet variational autoencoder of Yan et al. (IEEE TMI 2023).

A residual encoder maps a ``(1, box, box)`` particle to a Gaussian latent; a residual decoder
maps a latent sample back to a denoised image. Training is unsupervised (the noisy image is its
own target, so the bottleneck keeps the signal shared across particles and drops the noise);
later rounds replace the target of *reliable* particles by their aligned class average.
This module holds the network and its loss only: no I/O, no data handling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection; ``stride`` 2 halves, ``upsample`` doubles the size."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(8, out_channels), out_channels)
        self.norm2 = nn.GroupNorm(min(8, out_channels), out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class DRVAE(nn.Module):
    """Denoising ResNet VAE for square images whose side is a multiple of 8.

    Parameters
    ----------
    box_size : int
        Image side in pixels (working box).
    latent_dim : int
        Size of the Gaussian latent.
    channels : int
        Width of the first stage; deeper stages use twice as many.
    """

    def __init__(self, box_size: int, latent_dim: int = 16, channels: int = 32):
        super().__init__()
        if box_size % 8:
            raise ValueError(f"DRVAE needs a box size divisible by 8, got {box_size}")
        self.box_size = box_size
        self.latent_dim = latent_dim
        wide = 2 * channels
        self.bottom = box_size // 8
        flat = wide * self.bottom * self.bottom
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.SiLU(),
            ResidualBlock(channels, channels, stride=2),
            ResidualBlock(channels, wide, stride=2),
            ResidualBlock(wide, wide, stride=2),
            nn.Flatten(),
        )
        self.to_mean = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            ResidualBlock(wide, wide, upsample=True),
            ResidualBlock(wide, channels, upsample=True),
            ResidualBlock(channels, channels, upsample=True),
            nn.Conv2d(channels, 1, 3, padding=1),
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, box, box)`` -> latent mean and log-variance, each ``(n, latent_dim)``."""
        h = self.encoder(images.unsqueeze(1))
        return self.to_mean(h), self.to_logvar(h).clamp(-10.0, 10.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``(n, latent_dim)`` -> ``(n, box, box)`` images."""
        wide = self.from_latent.out_features // (self.bottom * self.bottom)
        h = self.from_latent(latent).reshape(-1, wide, self.bottom, self.bottom)
        return self.decoder(h).squeeze(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(images)
        if self.training:
            latent = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        else:
            latent = mean
        return self.decode(latent), mean, logvar


def drvae_loss(reconstruction: torch.Tensor, target: torch.Tensor, mean: torch.Tensor,
               logvar: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total loss, reconstruction MSE and KL divergence (per image, averaged over the batch)."""
    recon = ((reconstruction - target) ** 2).flatten(1).mean(1).mean()
    kl = (-0.5 * (1 + logvar - mean ** 2 - logvar.exp()).sum(1)).mean()
    return recon + kl_weight * kl / reconstruction[0].numel(), recon, kl
