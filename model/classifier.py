"""What the consumer runs: the encoder, optional rotation-invariant pooling, and the linear probe."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.autoencoder import AutoencoderConfig, Encoder, dihedral_views

CLASS_NAMES: tuple[str, ...] = ("AGN", "SN", "VS", "asteroid", "bogus")


def embed_stamps(encoder: Encoder, x: torch.Tensor, tta_dihedral: bool) -> torch.Tensor:
    """z of a batch; with tta_dihedral, the mean z over the 8 flips/rotations (rotation-invariant)."""
    if not tta_dihedral:
        z: torch.Tensor = encoder(x)[0]
        return z
    n = x.shape[0]
    z = encoder(torch.cat(dihedral_views(x), dim=0))[0]
    return z.view(8, n, -1).mean(dim=0)


class LinearProbe(nn.Module):
    """Logistic regression on standardised z. The z mean/std are buffers of the probe, fitted on the
    training embeddings, so the probe learns at one learning rate whatever the latent's scale."""

    def __init__(self, latent_dim: int, n_classes: int = len(CLASS_NAMES)) -> None:
        """``n_classes`` 0: an encoder without a classifier (a survey without labels, Rubin today):
        the probe's output is empty."""
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.linear = nn.Linear(latent_dim, n_classes)
        self.z_mean: torch.Tensor
        self.z_std: torch.Tensor
        self.register_buffer("z_mean", torch.zeros(latent_dim))
        self.register_buffer("z_std", torch.ones(latent_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear((z - self.z_mean) / self.z_std)
        return out


class StampClassifier(nn.Module):
    """(N, 2, 21, 21) normalised stamps -> (embedding (N, latent), probabilities (N, classes))."""

    def __init__(self, cfg: AutoencoderConfig, class_names: tuple[str, ...], tta_dihedral: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names = class_names
        self.tta_dihedral = tta_dihedral
        self.encoder = Encoder(cfg)
        self.probe = LinearProbe(cfg.latent_dim, len(class_names))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = embed_stamps(self.encoder, x, self.tta_dihedral).float()
        # The probe in float32 even under reduced-precision autocast: it costs nothing (42 x 5), and
        # in bfloat16 its near-ties flipped the stamp class of 1.9 % of the real alerts
        # (bench/inference_engines.py); in float32 the embedding's own rounding is all that is left.
        with torch.autocast(x.device.type, enabled=False):
            return z, torch.softmax(self.probe(z), dim=1)
