"""Clusters of the latent space (the study's next step), chosen by measurement, for the report.

Candidates: k-means for several k and HDBSCAN for several minimum cluster sizes, on the
L2-normalised z (the similarity index compares by cosine, so the clusters do too). Each is scored
against the labels of the labelled alerts by adjusted mutual information (AMI: corrected for
chance and for the number of clusters, so more clusters do not win by themselves; HDBSCAN's
noise counts as one more cluster), and described by its purity (fraction of labelled members in
their cluster's majority class), its coverage (labelled alerts not called noise) and the cosine
silhouette. The best AMI is kept; the table keeps every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.metrics import adjusted_mutual_info_score, silhouette_score

KMEANS_K = (5, 8, 12, 16, 24, 32, 48)
HDBSCAN_MIN_SIZE = (10, 25, 50)
NOISE = -1


@dataclass(frozen=True)
class Candidate:
    method: str  # e.g. "k-means k=12", "HDBSCAN min_cluster_size=25"
    labels: np.ndarray  # (N,) cluster per alert, NOISE for HDBSCAN's noise
    clusters: int
    ami: float
    purity: float
    coverage: float
    silhouette: float


def normalised(z: np.ndarray) -> np.ndarray:
    return np.asarray(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), dtype=np.float64)


def purity(clusters: np.ndarray, y: np.ndarray) -> float:
    """Fraction of labelled, non-noise alerts whose cluster's majority label is theirs."""
    m = (y >= 0) & (clusters != NOISE)
    if not m.any():
        return 0.0
    hits = 0
    for c in np.unique(clusters[m]):
        hits += int(np.bincount(y[m][clusters[m] == c]).max())
    return hits / int(m.sum())


def score(method: str, labels: np.ndarray, zn: np.ndarray, y: np.ndarray, seed: int) -> Candidate:
    lab = y >= 0
    ami = float(adjusted_mutual_info_score(y[lab], labels[lab])) if lab.sum() > 1 else float("nan")
    core = labels != NOISE
    n_clusters = len(set(labels[core].tolist()))
    sil = float("nan")
    if 1 < n_clusters < core.sum():
        sample = min(int(core.sum()), 3000)
        sil = float(silhouette_score(zn[core], labels[core], metric="cosine", sample_size=sample, random_state=seed))
    cov = float((core & lab).sum() / max(1, lab.sum()))
    return Candidate(method, labels, n_clusters, ami, purity(labels, y), cov, sil)


def candidates(z: np.ndarray, y: np.ndarray, seed: int = 0) -> list[Candidate]:
    zn = normalised(z)
    out = []
    for k in KMEANS_K:
        if k < len(zn):
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(zn)
            out.append(score(f"k-means k={k}", labels, zn, y, seed))
    for size in HDBSCAN_MIN_SIZE:
        if size < len(zn):
            labels = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(zn)
            out.append(score(f"HDBSCAN min_cluster_size={size}", labels, zn, y, seed))
    return out


def best(cands: list[Candidate]) -> Candidate:
    """Highest AMI against the labels (NaN last)."""
    return max(cands, key=lambda c: (not np.isnan(c.ami), c.ami if not np.isnan(c.ami) else 0.0))


def representatives(z: np.ndarray, labels: np.ndarray, cluster: int, n: int) -> np.ndarray:
    """Indices of the ``n`` members closest (cosine) to the cluster's mean direction."""
    zn = normalised(z)
    members = np.flatnonzero(labels == cluster)
    centre = zn[members].mean(0)
    order = np.argsort(-(zn[members] @ centre))
    return members[order[:n]]
