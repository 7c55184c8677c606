"""Latent clusters of the report: purity, the AMI choice and the representatives, on planted clusters."""

from __future__ import annotations

import numpy as np

from trainer.clusters import NOISE, best, candidates, purity, representatives


def planted(n_per: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 well-separated directions, labels = cluster (a third unlabelled)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(42)[:4] * 5
    z = np.concatenate([c + 0.3 * rng.normal(size=(n_per, 42)) for c in centres])
    y = np.repeat(np.arange(4), n_per)
    y[::3] = -1
    return z.astype(np.float32), y


def test_purity_counts_labelled_non_noise_members() -> None:
    clusters = np.array([0, 0, 0, 1, 1, NOISE])
    y = np.array([2, 2, 1, 3, -1, 0])
    assert purity(clusters, y) == 3 / 4


def test_planted_clusters_are_found_and_chosen() -> None:
    z, y = planted()
    cands = candidates(z, y)
    assert {c.method.split()[0] for c in cands} == {"k-means", "HDBSCAN"}
    chosen = best(cands)
    assert chosen.ami > 0.9 and chosen.purity > 0.95, chosen
    km5 = next(c for c in cands if c.method == "k-means k=5")
    assert km5.coverage == 1.0 and km5.purity > 0.95


def test_representatives_are_members_nearest_the_centre() -> None:
    z, _ = planted()
    labels = np.repeat(np.arange(4), 60)
    z[7] = z[7] * 0 + np.eye(42)[0] * 5  # exactly on cluster 0's direction
    rep = representatives(z, labels, 0, 5)
    assert set(rep) <= set(range(60)) and rep[0] == 7 and len(rep) == 5
