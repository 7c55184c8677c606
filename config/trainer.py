"""The offline trainer's configuration (``trainer fit --config``), a root of its own: the consumer
never reads or validates it. The architecture is ``model.spec.AutoencoderConfig``, embedded, so a
run folder and a bundle describe the model with the very same fields."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from config.loader import ConfigError, build, read_yaml
from model.spec import AutoencoderConfig

_ARCH_FIELDS = {f.name for f in dataclasses.fields(AutoencoderConfig)}


@dataclass(frozen=True)
class HeadConfig:
    """The fused classifier (trainer/classify.py): gradient-boosted trees on the alert features,
    a linear correction from the stamp embedding, temperature scaling."""

    # LightGBM's trees (trainer/trees.py), chosen by cross-validation on ../shared/ztf
    # (docs/model.md): one model of 150 rounds at learning rate 0.1, 150 x 5 trees of at most 7
    # leaves and depth <= 6, which cost ~16-20 us per alert in the consumer on the CPU (15 leaves
    # scored the same and cost 24: the loop's cost follows the path length); each tree
    # grown on a random ``subsample`` of the rows and ``max_features`` of the features (stochastic
    # boosting: +1.5 macro-F1 over scikit-learn's trees on 525 labels, 10 seeds), leaves of at
    # least ``min_samples_leaf`` alerts. ``bag`` > 1 averages that many models differing only in
    # their seed (one set of trees in the bundle).
    bag: int = 1
    max_iter: int = 150
    learning_rate: float = 0.1
    max_depth: int = 6
    max_leaf_nodes: int = 7
    l2_regularization: float = 0.0
    max_features: float = 0.5  # fraction of the features each tree may split on
    subsample: float = 0.8  # fraction of the rows each tree is grown on
    min_samples_leaf: int = 20
    # L2 penalty of the linear correction from z. With the shipped trees and no class offsets, over
    # 10 seeds (docs/model-experiments.md "Class offsets"), 0.03 / 0.1 / 0.3 / 1 / 3 gave the fused model
    # -0.1 / +0.4 / +0.2 / +0.2 / 0.0 over the trees alone, the smallest spread at 1 (kept: the
    # value chosen before this comparison; the others are within two standard errors of it).
    fusion_l2: float = 1.0
    # Whether the fusion also fits per-class offsets (a bias per class, class-balanced) beside the
    # correction from z. Off: fitted on the out-of-fold outputs of trees grown on a quarter less
    # data, the offsets moved the classes' balance away from the one the final trees learnt
    # (asteroid 98.9 -> 97.6, bogus 89.9 -> 87.8 F1); without them the fused model scores 92.0
    # against the trees' 91.8 over 10 seeds (+0.18, standard error 0.05), with them 91.4 (-0.5).
    # ``fusion_views`` needs them on: a view's correction from z alone cannot undo "seen once".
    fusion_offsets: bool = False
    # Which alerts the fusion (with its class offsets) is fitted on: the labelled alerts as they
    # are, plus this fraction of their earlier views (trainer/stages.py: the alert at its object's
    # 1st, 2nd, ... detection), drawn at random; the trees stay fitted on the alerts as they are.
    # 0 = the alerts only. Measured (docs/model-experiments.md "With the shipped trees", LightGBM's
    # trees, 5 seeds): 0.1 costs ~1.5 points of macro-F1 on the alerts as labelled against the
    # default fusion and lifts first detections by 26 points, at the price of ~2 % more real
    # asteroids and artefacts called astrophysical. ``early_detections`` below serves first
    # detections better (+50 points, whatever ``ndethist`` says, for ~2), so the default is 0.
    fusion_views: float = 0.0
    # First detections get trees of their own (trainer/trees.py GatedTrees): alerts with at most
    # this many detections in their own 30-day history (this one included; ``all_n_det``) are scored
    # by trees fitted on the training alerts with that few and on the earlier views
    # (trainer/stages.py) of the others, the first-detection ones built from the earliest detection
    # of each object's window; 0 = one set of trees for all. Not ``ndethist``, which also counts
    # earlier sub-threshold detections: a new object's first alert often has 2 or more. Measured
    # (docs/model-experiments.md "First detections get trees of their own" and the sections after
    # it, 10 seeds): at their first detection the fused model's macro-F1 goes from ~30 to 75-81 %
    # whatever ``ndethist`` says and however the first detection is reconstructed (a new supernova
    # is no longer called an asteroid), at a cost of ~2 points on the alerts as labelled (real
    # asteroids and artefacts, which are first detections, now meet views of the other classes).
    # Views exist at 1, 2 and 3 detections: 0..3.
    early_detections: int = 1
    # ... except an alert that carries no history at all (no detection and no upper limit in its 30
    # days: an archival copy, a resent alert, a field's first visit of a season) of a place where
    # ZTF counted more than this many raw detections (``ndethist``): its object is not new, and
    # the main trees, which read ``ndethist``, score it (null: the history alone decides). Measured
    # (docs/model-experiments.md "An alert without a history", 10 seeds): 100 gives +0.4 points as labelled
    # (standard error 0.15), the first detection unchanged (+0.2, 0.6). Only where the alert carries
    # its shape measure ``elong``, as every ZTF packet does (trainer/classify.py SHAPE_FEATURE): a
    # packet rebuilt without it has nulls that only the early trees learnt (``early_nulls``).
    known_object_ndethist: int | None = 100
    # Nulls where ZTF's packets have values: the early trees are also fitted on a masked copy of
    # their training alerts, each candidate field (but the ones every packet carries) null with
    # probability ``early_nulls``, at weight ``early_nulls_weight``, so every split learns where a
    # null goes. Without it a null in a field never null in training has no learnt direction
    # (LightGBM reads it as 0, an ``elong`` or ``scorr`` no alert has; the bundle since 20261127g
    # sends it to the child with more training alerts). Measured (docs/model-experiments.md "Alerts whose
    # candidate fields are null", 10 seeds): first alerts stripped to the 25 fields of ALeRCE's
    # stamp-classifier rows 53 -> 68 % (AGN 0 -> 65), as labelled +0.1 (standard error 0.15),
    # complete first alerts -0.9 (0.4-0.7); with the 20261127g rule 49 -> 68 % ("Nulls where the
    # trees never saw one"). The main trees stay as they are: there the copy cost ~1 point as
    # labelled. 0: off.
    early_nulls: float = 0.3
    early_nulls_weight: float = 0.1
    # Packets rebuilt from an export of a few fields: a first alert null in every one of the
    # measurements ZTF always fills (trainer/classify.py EXPORT_GATE_FEATURES) is scored by export
    # trees of their own, ``export_rounds`` rounds at ``export_learning_rate``, fitted on the
    # training alerts and their earliest detections rebuilt as first alerts with only the fields of
    # ALeRCE's stamp-classifier rows (trainer/stages.py ``exported_first_alert``). No ZTF packet
    # reaches them, so the alerts as labelled score the same. Measured (docs/model-experiments.md
    # "Packets rebuilt from an export", 10 seeds): such first alerts 68.1 -> 73.8 % (bogus
    # 64.6 -> 73.9), their earliest detections 72.0 -> 76.1 %. The learning rate is the one whose
    # probabilities are calibrated (expected calibration error 3.3 % against 8.5 at 0.3 and 12.7
    # at 0.1; the F1 within its standard error of each other). 0: off.
    export_rounds: int = 50
    export_learning_rate: float = 0.2
    inner_folds: int = 4  # out-of-fold tree outputs on which the correction and T are fitted
    cv_folds: int = 5  # object-grouped cross-validation of the comparison table
    cv_seeds: int = 3
    # The stamp embedding the head reads, and so the one the bundle computes: "plain" z, or z
    # pooled over the 8 flips/rotations (8x the encoder's inference cost).
    embedding: Literal["plain", "pooled"] = "plain"


@dataclass(frozen=True)
class TrainerConfig:
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    kl_weight: float = 1e-3
    batch_size: int = 100
    lr: float = 3.33e-5
    max_epochs: int = 300
    patience: int = 15
    augment: Literal["none", "flips_rotations", "flips_rotations_tiles"] = "flips_rotations"
    tile_grid: int = 3
    # Extra objective beside reconstruction: "none" (the study); "invariance": the z of two views
    # (flip/rotation + noise) of a stamp are pulled together; "contrastive": NT-Xent over the batch.
    extra_objective: Literal["none", "invariance", "contrastive"] = "none"
    extra_weight: float = 0.1
    # NT-Xent's temperature, and a projection head for it (SimCLR): 0 = the loss reads z itself;
    # > 0 = a training-only MLP z -> 128 -> projection_dim that the bundle does not ship.
    # The second view is also shifted by up to view_shift pixels (edges repeated). Both measured
    # on a GPU (docs/gpu/2026-11-26-h100.md): they lower the stamp probe, hence off by default.
    contrastive_temperature: float = 0.2
    projection_dim: int = 0
    view_shift: int = 0
    probe_epochs: int = 200  # full-batch L-BFGS iterations
    # L2 penalty of the probe, chosen on the validation objects among these values
    probe_l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    seed: int = 0
    labels_csv: str = ""  # empty: labels.csv found beside the alerts folder, if any
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = 0
    head: HeadConfig = HeadConfig()

    def with_overrides(self, **overrides: Any) -> TrainerConfig:
        """A copy with fields replaced; architecture fields (kind, latent_dim, channels) go to
        ``autoencoder``, so sweep rows can name them flat."""
        arch = {k: v for k, v in overrides.items() if k in _ARCH_FIELDS}
        rest = {k: v for k, v in overrides.items() if k not in _ARCH_FIELDS}
        if "channels" in arch:
            arch["channels"] = tuple(arch["channels"])
        if arch:
            rest["autoencoder"] = dataclasses.replace(self.autoencoder, **arch)
        return validate_trainer_config(dataclasses.replace(self, **rest))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["autoencoder"] = self.autoencoder.to_dict()
        d["probe_l2_grid"] = list(self.probe_l2_grid)
        d["head"] = dataclasses.asdict(self.head)
        return d


def validate_trainer_config(cfg: TrainerConfig) -> TrainerConfig:
    a = cfg.autoencoder
    if a.latent_dim < 1:
        raise ConfigError("autoencoder.latent_dim must be >= 1")
    if len(a.channels) != 2 or min(a.channels) < 1:
        raise ConfigError("autoencoder.channels must be two positive integers")
    if cfg.batch_size < 1 or cfg.max_epochs < 0:
        raise ConfigError("batch_size must be >= 1 and max_epochs >= 0")
    if cfg.contrastive_temperature <= 0 or cfg.projection_dim < 0 or not 0 <= cfg.view_shift <= 5:
        raise ConfigError("contrastive_temperature must be > 0, projection_dim >= 0, view_shift in 0..5")
    if not (0.0 < cfg.head.max_features <= 1.0 and 0.0 < cfg.head.subsample <= 1.0):
        raise ConfigError("head.max_features and head.subsample must be in (0, 1]")
    if cfg.head.max_leaf_nodes < 2 or cfg.head.min_samples_leaf < 1 or cfg.head.max_iter < 1:
        raise ConfigError("head.max_leaf_nodes must be >= 2, head.min_samples_leaf and head.max_iter >= 1")
    if not 0.0 <= cfg.head.fusion_views <= 1.0:
        raise ConfigError("head.fusion_views must be in [0, 1]")
    if cfg.head.fusion_views > 0 and not cfg.head.fusion_offsets:
        raise ConfigError("head.fusion_views needs head.fusion_offsets: true (without class offsets the views change nothing)")
    if not 0 <= cfg.head.early_detections <= 3:
        raise ConfigError("head.early_detections must be in 0..3 (the earlier views stop at 3 detections)")
    if cfg.head.known_object_ndethist is not None and cfg.head.known_object_ndethist < 1:
        raise ConfigError("head.known_object_ndethist must be >= 1 or null")
    if not (0.0 <= cfg.head.early_nulls < 1.0 and 0.0 < cfg.head.early_nulls_weight <= 1.0):
        raise ConfigError("head.early_nulls must be in [0, 1) and head.early_nulls_weight in (0, 1]")
    if not 1 <= cfg.head.bag <= 16:
        raise ConfigError("head.bag must be in 1..16")
    return cfg


def parse_trainer_config(data: Mapping[str, Any] | None) -> TrainerConfig:
    return validate_trainer_config(build(TrainerConfig, data or {}))


def trainer_config_from_dict(d: Mapping[str, Any]) -> TrainerConfig:
    """The inverse of ``TrainerConfig.to_dict`` (run folders store it as JSON)."""
    return parse_trainer_config(d)


def load_trainer_config(path: str | os.PathLike[str] | None) -> TrainerConfig:
    return parse_trainer_config(read_yaml(path))
