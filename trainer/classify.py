"""The fused head the bundle ships: gradient-boosted trees on the alert features (gated: first
detections get trees of their own, also fitted on a masked copy so that a null field reaches a
leaf learnt for it), a linear correction of their log-odds from the stamp embedding z, and a
temperature, the last two fitted on out-of-fold tree outputs (inner object-grouped folds).

``fit_fused`` is what ``trainer fit`` ships (through ``trainer.comparison.train_head``) and what
the comparison table's fused row cross-validates, so the table measures the shipped recipe.
Why each part is there, with the measurements: docs/model.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightgbm import LGBMClassifier
from sklearn.model_selection import StratifiedGroupKFold

from alerts.features import FEATURE_NAMES, METADATA_FEATURES, POSITION_FEATURES
from config.trainer import HeadConfig
from model.fused import FusedHead
from model.trees import TreeEnsemble
from trainer.stages import STAGES
from trainer.trees import Gate, GatedTrees, NullGate, TreeBag, tree_arrays

log = logging.getLogger("stampstream.trainer")


def gbt(cfg: HeadConfig, seed: int) -> TreeBag:
    """``cfg.bag`` LightGBM models, member b seeded ``seed + 7919 b``; one thread each, so a run
    is reproducible whatever the machine (525 alerts take ~0.1 s per model)."""
    return TreeBag([
        LGBMClassifier(
            n_estimators=cfg.max_iter, learning_rate=cfg.learning_rate, max_depth=cfg.max_depth,
            num_leaves=cfg.max_leaf_nodes, reg_lambda=cfg.l2_regularization, colsample_bytree=cfg.max_features,
            subsample=cfg.subsample, subsample_freq=1, min_child_samples=cfg.min_samples_leaf,
            class_weight="balanced", random_state=seed + 7919 * b, n_jobs=1, verbose=-1,
        )
        for b in range(cfg.bag)
    ])  # fmt: skip


# What HeadConfig.early_detections counts: the detections in the alert's own 30-day history, this
# one included (g and r; alerts/features.py). Not ``ndethist``: ZTF counts there every raw
# detection down to S/N ~3 since the survey began, alerted or not, so a new object's first alert
# often has ``ndethist`` 2 or more, and a gate on it sent such an alert to the main trees, which
# call it an asteroid or an artefact (docs/model-experiments.md, "The gate reads the alert's own history").
GATE_FEATURE = "all_n_det"
_NDETHIST = FEATURE_NAMES.index("ndethist")
# The known-object exception holds only where the alert carries this shape measure, which every ZTF
# packet of schemas 1.8-4.02 fills and a packet rebuilt from an export often lacks (ALeRCE's
# stamp-classifier rows do): the main trees never saw it null and learnt no direction for a null
# (read as 0 until 20261127g, sent to the more populous child since), the early trees learnt where
# nulls go (``with_nulls``). Measured with the old rule (docs/model-experiments.md, "Known objects rebuilt
# without a history", 10 seeds): such packets 47.5 -> 68.2 % (AGN 6 -> 64), every other test set the same.
SHAPE_FEATURE = "elong"


def history_gate(cfg: HeadConfig) -> Gate:
    """The head's gate: at most ``cfg.early_detections`` detections in the alert's own 30-day
    history; with ``cfg.known_object_ndethist``, not where the alert carries no history at all (no
    upper limit either: ``all_n_nondet``), ``ndethist`` is above it and ``SHAPE_FEATURE`` has a value."""
    column, max_value = FEATURE_NAMES.index(GATE_FEATURE), cfg.early_detections + 0.5
    if cfg.known_object_ndethist is None:
        return Gate(column, max_value)
    return Gate(column, max_value, FEATURE_NAMES.index("all_n_nondet"), _NDETHIST, cfg.known_object_ndethist + 0.5,
                FEATURE_NAMES.index(SHAPE_FEATURE))  # fmt: skip


def fit_trees(cfg: HeadConfig, seed: int, features: np.ndarray, y: np.ndarray, n_classes: int,
               stages: np.ndarray | None, earliest: np.ndarray | None = None,
               exported: np.ndarray | None = None) -> TreeBag | GatedTrees:  # fmt: skip
    """The head's trees: with ``cfg.early_detections`` > 0 and the earlier views (``stages``, (S, N, F)
    in trainer.stages.STAGES order), a ``GatedTrees``: main trees on the alerts as they are, early
    trees on the alerts ``history_gate`` picks (at most that many detections in their 30-day
    history, not a known object without a history) and on the views
    of the others at 1 to that many detections, and, with ``earliest`` ((N, F), NaN rows where
    none), on the others' earliest detections as alerts of their own time (``ndethist`` drawn as
    ``_drawn_ndethist`` says). Why both kinds of first detection: early trees fitted on one
    kind alone score up to 9 points lower on another (docs/model-experiments.md, "The first-detection view
    reads the earliest detection"). With ``cfg.early_nulls`` > 0 the early trees also learn from
    a masked copy of all of these (``with_nulls``), so that a null reaches a leaf learnt for it.
    With ``cfg.export_rounds`` > 0 and ``exported`` ((2, N, F): trainer.stages.exported_first_alert
    of each alert and of its earliest detection, NaN rows where none), the early trees' rows that
    ``export_gate`` picks go to export trees of their own, fitted on those views.
    Without views (a caller with none), one set of trees."""
    main = gbt(cfg, seed).fit(features, y)
    if cfg.early_detections == 0 or stages is None:
        return main
    gate = history_gate(cfg)
    few = gate.rows(features)  # the alerts the early trees will score, as they are
    rng = np.random.default_rng(seed)
    views = [_drawn_ndethist(stages[i][~few], k, features[few, _NDETHIST], rng)
             for i, k in enumerate(STAGES) if k <= cfg.early_detections]  # fmt: skip
    labels = [y[~few]] * len(views)
    if earliest is not None:  # the earliest detection as an alert of its own time, where there is one
        has = ~few & ~np.isnan(earliest).all(1)
        views.append(_drawn_ndethist(earliest[has], 1, features[few, _NDETHIST], rng))
        labels.append(y[has])
    x, yy = np.concatenate([features[few], *views]), np.concatenate([y[few], *labels])
    weight = None
    if cfg.early_nulls > 0:  # the masked copy (HeadConfig.early_nulls), drawn after the views
        weight = np.concatenate([np.ones(len(yy)), np.full(len(yy), cfg.early_nulls_weight)])
        x, yy = np.concatenate([x, with_nulls(x, cfg.early_nulls, rng)]), np.concatenate([yy, yy])
    early: TreeBag | GatedTrees = gbt(cfg, seed).fit(x, yy, sample_weight=weight)
    if cfg.export_rounds > 0 and exported is not None:
        rows = ~np.isnan(exported).all(2)  # (2, N): the earliest detection's view exists only where there is one
        xe, ye = exported[rows], np.broadcast_to(y, rows.shape)[rows]
        shape = dataclasses.replace(cfg, max_iter=cfg.export_rounds, learning_rate=cfg.export_learning_rate)
        early = GatedTrees(early, gbt(shape, seed).fit(xe, ye), export_gate(), n_classes)
    return GatedTrees(main, early, gate, n_classes)


# Measurements every ZTF packet of schemas 1.8-4.02 carries (none is null in any alert of
# ../shared/ztf) and ALeRCE's stamp-classifier rows do not (trainer.stages.ALERCE_STAMP_FIELDS):
# shape, PSF fit, aperture photometry. A first alert null in all three was rebuilt from an export
# of a few fields, and its export trees score it.
EXPORT_GATE_FEATURES = ("elong", "chipsf", "magap")


def export_gate() -> NullGate:
    return NullGate(tuple(FEATURE_NAMES.index(n) for n in EXPORT_GATE_FEATURES))


# The candidate features every ZTF packet carries (non-null in every schema, or derived from such
# fields): never masked by ``with_nulls``.
ALWAYS_PRESENT = ("magpsf", "sigmapsf", "isdiffpos", "fid_g", "fid_r", *POSITION_FEATURES)
NULLABLE_COLUMNS = np.array([FEATURE_NAMES.index(n) for n in METADATA_FEATURES if n not in ALWAYS_PRESENT])


def with_nulls(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``x`` with each candidate feature but ``ALWAYS_PRESENT`` set to NaN with
    probability ``p``, independently per alert and feature; the history features as they are
    (the gate reads them)."""
    out = x.copy()
    sub = out[:, NULLABLE_COLUMNS]
    sub[rng.random(sub.shape) < p] = np.nan
    out[:, NULLABLE_COLUMNS] = sub
    return out


def _drawn_ndethist(views: np.ndarray, detections: int, gated: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The views at ``detections`` with ``ndethist`` drawn from the real gated training alerts'
    values (``gated``; at least ``detections``). A view's ``ndethist`` is ``detections`` exactly,
    while the real alerts with that few detections in their history have 1 to hundreds: left as
    it is, the early trees would learn "ndethist above the view's: asteroid or artefact", and a new
    object's first alert with an earlier sub-threshold detection would be called one (measured:
    docs/model.md)."""
    pool = gated[~np.isnan(gated)]
    if len(pool) == 0:
        return views
    out = views.copy()
    out[:, _NDETHIST] = np.maximum(rng.choice(pool, len(out)), detections)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the NLL of softmax(logits / T) (temperature scaling)."""
    lt = torch.from_numpy(logits).double()
    yt = torch.from_numpy(y).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lt / log_t.exp(), yt)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _fit_fusion(
    offset: np.ndarray, z: np.ndarray, y: np.ndarray, n_classes: int, l2: float, offsets: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Linear correction of the tree log-odds (offset) from z: s * offset + W z' + b, fitted
    class-balanced with L2 on W, where the scale s > 0 of the trees' log-odds is fitted too, and
    the class offsets b only with ``offsets`` (else b = 0: HeadConfig.fusion_offsets says why).
    -> (W / s, b / s, z mean, z std, s): the same logits divided by s, so the head the bundle ships
    keeps its form (tree log-odds + linear in z) and the temperature fitted afterwards absorbs s.

    Why the scale: the boosted trees are over-confident out of fold (fitted s ~0.5), and with
    their log-odds at full weight z could only move ties. Measured (object-grouped CV, docs/model.md):
    fused 89.7 -> 90.7 macro-F1, bogus 84 -> 88."""
    mean, std = z.mean(0), z.std(0) + 1e-6
    zt = torch.from_numpy((z - mean) / std).double()
    off = torch.from_numpy(offset).double()
    yt = torch.from_numpy(y).long()
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weight = torch.from_numpy(np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0))
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=offsets)
    log_s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, log_s, *([b] if offsets else [])], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.exp(log_s) * off + zt @ w.T + b
        loss = torch.nn.functional.cross_entropy(logits, yt, weight=weight) + l2 * w.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    scale = float(torch.exp(log_s.detach()).clamp(0.05, 20.0))
    return w.detach().numpy() / scale, b.detach().numpy() / scale, mean, std, scale


@dataclass(frozen=True)
class FittedFused:
    trees: TreeBag | GatedTrees
    w: np.ndarray
    b: np.ndarray
    z_mean: np.ndarray
    z_std: np.ndarray
    temperature: float

    def logits(self, features: np.ndarray, z: np.ndarray) -> np.ndarray:
        tree_logits = np.log(np.clip(full_proba(self.trees, features, self.w.shape[0]), 1e-12, 1.0))
        return tree_logits + ((z - self.z_mean) / self.z_std) @ self.w.T + self.b  # type: ignore[no-any-return]

    def predict_proba(self, features: np.ndarray, z: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(features, z) / self.temperature)

    def head(self) -> FusedHead:
        """The torch module the bundle ships (trees as tensors)."""
        trees = TreeEnsemble.from_arrays(tree_arrays(self.trees, self.w.shape[0]))
        head = FusedHead(trees, self.w.shape[1], self.w.shape[0])
        with torch.no_grad():
            head.fusion.weight.copy_(torch.from_numpy(self.w).float())
            head.fusion.bias.copy_(torch.from_numpy(self.b).float())
            head.z_mean.copy_(torch.from_numpy(self.z_mean).float())
            head.z_std.copy_(torch.from_numpy(self.z_std).float())
            head.temperature.fill_(self.temperature)
        return head.eval()


def fit_fused(features: np.ndarray, z: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int,
              cfg: HeadConfig, seed: int, stages: np.ndarray | None = None, earliest: np.ndarray | None = None,
              exported: np.ndarray | None = None) -> FittedFused:  # fmt: skip
    """Trees on all of the data; the fusion and the temperature on out-of-fold tree outputs (inner
    object-grouped folds), so neither learns from trees that have seen the same alerts. With
    ``cfg.fusion_views`` > 0 and ``stages`` (features of the alerts' earlier views, (S, N, F)),
    that fraction of the views' out-of-fold outputs joins the fusion's fit, drawn at random. With
    ``cfg.early_detections`` > 0 and ``stages``, the trees are a ``GatedTrees`` (``fit_trees``),
    in the inner folds as in the final fit, so the fusion learns on the trees it will correct."""
    views = stages if stages is not None and cfg.fusion_views > 0 else np.zeros((0, *features.shape))
    oof = np.zeros((1 + len(views), len(y), n_classes))
    k = max(2, min(cfg.inner_folds, min(len(set(groups[y == c].tolist())) for c in np.unique(y))))
    inner = StratifiedGroupKFold(k, shuffle=True, random_state=seed + 1000)
    for tr, te in inner.split(features, y, groups):
        m = fit_trees(cfg, seed, features[tr], y[tr], n_classes, None if stages is None else stages[:, tr],
                       None if earliest is None else earliest[tr], None if exported is None else exported[:, tr])  # fmt: skip
        for block, x in enumerate([features, *views]):
            oof[block, te] = np.log(np.clip(full_proba(m, x[te], n_classes), 1e-12, 1.0))
    drawn = np.concatenate([np.ones(len(y), bool), np.random.default_rng(seed).random(len(views) * len(y)) < cfg.fusion_views])
    offset, zz, yy = oof.reshape(-1, n_classes)[drawn], np.tile(z, (len(oof), 1))[drawn], np.tile(y, len(oof))[drawn]
    w, b, mean, std, scale = _fit_fusion(offset, zz, yy, n_classes, cfg.fusion_l2, cfg.fusion_offsets)
    log.debug("fusion: trees' log-odds scaled by %.3f", scale)
    temperature = fit_temperature(offset + ((zz - mean) / std) @ w.T + b, yy)
    trees = fit_trees(cfg, seed, features, y, n_classes, stages, earliest, exported)
    return FittedFused(trees, w, b, mean, std, temperature)


def full_proba(m: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a fold may lack one)."""
    p = np.zeros((len(x), n_classes))
    p[:, m.classes_] = m.predict_proba(x)
    return p
