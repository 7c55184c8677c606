"""The study's convolutional autoencoder for (2, 21, 21) stamps, and its VAE variant.

Encoder: 4 conv layers (two 2x2 max-pools: 21 -> 10 -> 5) + 1 fully connected layer to z.
Decoder: 1 fully connected layer + 6 conv layers (two upsamplings: 5 -> 10 -> 21), sigmoid output
since inputs are min-max scaled to [0, 1]. Loss: MSE (+ KL for the VAE).
"""

from __future__ import annotations

import torch
from torch import nn

from model.spec import AutoencoderConfig

__all__ = ["STAMP_SHAPE", "Autoencoder", "AutoencoderConfig", "Decoder", "Encoder", "autoencoder_loss", "dihedral_views"]

STAMP_SHAPE = (2, 21, 21)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        self.cfg = cfg
        self.features = nn.Sequential(
            nn.Conv2d(2, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 21 -> 10
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 10 -> 5
            nn.Flatten(),
        )  # fmt: skip
        out = cfg.latent_dim * (2 if cfg.kind == "vae" else 1)
        self.fc = nn.Linear(c2 * 5 * 5, out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (mu, logvar); logvar is None for the plain autoencoder. mu is the embedding z."""
        h = self.fc(self.features(x))
        if self.cfg.kind == "vae":
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar.clamp(-20.0, 10.0)
        return h, None


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        self.c2 = c2
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, c2 * 5 * 5), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Upsample(size=(10, 10), mode="nearest"),
            nn.Conv2d(c2, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Upsample(size=(21, 21), mode="nearest"),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, 2, 3, padding=1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.fc(z).view(-1, self.c2, 5, 5))
        return out


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (reconstruction, mu, logvar). Samples z by reparameterisation in training (VAE)."""
        mu, logvar = self.encoder(x)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def autoencoder_loss(
    x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor | None, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (total loss, reconstruction MSE). KL is the mean over the batch of the per-sample KL."""
    mse = torch.mean((recon - x) ** 2)
    if logvar is None:
        return mse, mse
    kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    return mse + kl_weight * kl, mse


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a (N, C, H, W) batch (the symmetry group of a square stamp)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        views.append(r)
        views.append(torch.flip(r, dims=(3,)))
    return views
