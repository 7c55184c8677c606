"""The fused classifier: the alert's metadata and history (a tree ensemble on ``alerts.features``)
plus the stamps (the encoder's z, through a linear correction), in one torch graph:

    logits = trees(features) + fusion(standardised z)            probabilities = softmax(logits / T)

Why this shape (docs/model.md, "Fused classifier"): on 525 labelled alerts, gradient-boosted
trees on the features beat every MLP tried on the same features (0.89 vs 0.85 macro-F1,
object-grouped 5-fold CV), so the trees carry the metadata; the stamps enter where they help, as
a linear correction of the trees' log-odds fitted on out-of-fold tree outputs (it starts at zero:
a fusion that does not help is learnt as none). T is fitted on out-of-fold predictions
(temperature scaling), so the published probabilities are calibrated.

``AlertModel`` runs the encoder, the stamp-only probe (the study's method, published as
``stamp_probabilities``) and the head together: one forward pass per batch.
"""

from __future__ import annotations

import torch
from torch import nn

from model.classifier import StampClassifier
from model.trees import TreeEnsemble


class FusedHead(nn.Module):
    def __init__(self, trees: TreeEnsemble, latent_dim: int, n_classes: int) -> None:
        super().__init__()
        self.trees = trees
        self.fusion = nn.Linear(latent_dim, n_classes)
        nn.init.zeros_(self.fusion.weight)
        nn.init.zeros_(self.fusion.bias)
        self.z_mean: torch.Tensor
        self.z_std: torch.Tensor
        self.temperature: torch.Tensor
        self.register_buffer("z_mean", torch.zeros(latent_dim))
        self.register_buffer("z_std", torch.ones(latent_dim))
        self.register_buffer("temperature", torch.ones(()))

    def logits(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Uncalibrated log-odds (before the temperature), in float32 even under autocast (a 42 x 5
        linear layer: nothing to gain from bfloat16, near-ties to lose)."""
        with torch.autocast(z.device.type, enabled=False):
            out: torch.Tensor = self.trees(features) + self.fusion((z.float() - self.z_mean) / self.z_std)
        return out

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(z, features) / self.temperature, dim=1)


class AlertModel(nn.Module):
    """(N, 2, 21, 21) normalised stamps + (N, F) features -> (z, stamp probabilities, probabilities).
    Without a head, the probabilities are the stamp probe's."""

    def __init__(self, stamp: StampClassifier, head: FusedHead | None) -> None:
        super().__init__()
        self.stamp = stamp
        self.head = head

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, stamp_probs = self.stamp(x)
        if self.head is None:
            return z, stamp_probs, stamp_probs
        return z, stamp_probs, self.head(z, features)
