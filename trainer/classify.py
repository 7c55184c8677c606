"""The classifier on top of the stamps: object-grouped cross-validation of every row of the
comparison table, and the fit of the fused head that the bundle ships.

Rows kept in every table (docs/model.md): the study's stamp-only linear probe (the study's
method) and trees on the same z (stamp only, read non-linearly), metadata only, history only,
metadata + history (gradient-boosted trees: the reference, and logistic regression), the same
without position (ablation), trees on metadata + history + z, an MLP on everything, and the
shipped fused model (trees on metadata + history, plus a linear correction from z without class
offsets, temperature-scaled).

Protocol: StratifiedGroupKFold by objectId (an object is never in two folds), 5 folds, several
seeds (seed = fold assignment + model initialisation); macro-F1 and per-class F1 over the
out-of-fold predictions of each seed, then mean ± std over seeds. Calibration (ECE, reliability)
is measured on the out-of-fold probabilities of the fused model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightgbm import LGBMClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from alerts.features import FEATURE_NAMES, HISTORY_FEATURES, METADATA_FEATURES, POSITION_FEATURES
from config.trainer import HeadConfig
from model.autoencoder import dihedral_views
from model.fused import FusedHead
from model.trees import TreeEnsemble
from trainer.stages import STAGES
from trainer.trees import Gate, GatedTrees, TreeBag, tree_arrays

log = logging.getLogger("stampstream.trainer")

STUDY_ROW = "study: stamp-only linear probe on z (the study's method)"
REFERENCE_ROW = "metadata + history, gradient-boosted trees (reference)"
FUSED_ROW = "fused: trees on metadata + history + linear on z, calibrated (shipped)"
END_TO_END_ROW = "stamps + metadata + history, encoder fine-tuned end to end (ALeRCE's recipe)"
# The fused model's own trees without z: beside the fused row it shows what the stamps add, and
# beside the reference row what the gate for first detections costs as labelled and gains on the
# views.
GATED_ROW = "metadata + history, the fused model's gated trees (no z)"
# Rows also evaluated on the earlier views of the test alerts (trainer/stages.py): they read only
# the features and z, so the views cost a prediction, not a fit.
STAGED_ROWS = (REFERENCE_ROW, GATED_ROW, FUSED_ROW)


@dataclass(frozen=True)
class Labelled:
    features: np.ndarray  # (N, F) float32, NaN = missing
    z: np.ndarray  # (N, latent)
    y: np.ndarray  # (N,) class index
    groups: np.ndarray  # (N,) objectId
    class_names: tuple[str, ...]
    sequences: np.ndarray | None = None  # (N, L, 6): alerts.features.history_sequence
    stamps: np.ndarray | None = None  # (N, 2, 21, 21) normalised: for the end-to-end row
    stages: np.ndarray | None = None  # (S, N, F): features of the earlier views (trainer/stages.py)
    earliest: np.ndarray | None = None  # (N, F): trainer.stages.earliest_detection_alert's features (NaN rows: none)

    def with_views(self) -> Labelled:
        """The alerts followed by each earlier view of them: (1 + S) N rows, the views' features in
        place of the alert's, the rest repeated. A row fitted on indices below N and asked for the
        test indices of every block predicts each view with the very model it fitted on the alerts
        as they are. ``stages`` and ``earliest`` stay as they are, indexed by alert: the fits read
        them at training indices, all below N, so the fused row fits the very recipe the bundle
        ships (until 20261127d's run the table dropped ``earliest`` here, and its fused row was
        fitted without the second kind of first-detection view)."""
        assert self.stages is not None
        blocks = 1 + len(self.stages)
        return dataclasses.replace(
            self, features=np.concatenate([self.features, *self.stages]), z=np.tile(self.z, (blocks, 1)),
            y=np.tile(self.y, blocks), groups=np.tile(self.groups, blocks), sequences=None, stamps=None,
        )  # fmt: skip

    def views_at(self, tr: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The earlier views and the earliest detections of the alerts ``tr`` (None where absent):
        what the head's trees are fitted on beside the alerts themselves."""
        return (None if self.stages is None else self.stages[:, tr]), (None if self.earliest is None else self.earliest[tr])


def _columns(names: Sequence[str]) -> list[int]:
    return [FEATURE_NAMES.index(n) for n in names]


def _gbt(cfg: HeadConfig, seed: int) -> TreeBag:
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
# call it an asteroid or an artefact (docs/model.md, "The gate reads the alert's own history").
GATE_FEATURE = "all_n_det"
_NDETHIST = FEATURE_NAMES.index("ndethist")
# The known-object exception holds only where the alert carries this shape measure, which every ZTF
# packet of schemas 1.8-4.02 fills and a packet rebuilt from an export often lacks (ALeRCE's
# stamp-classifier rows do): the main trees never saw it null and learnt no direction for a null
# (read as 0 until 20261127g, sent to the more populous child since), the early trees learnt where
# nulls go (``with_nulls``). Measured with the old rule (docs/model.md, "Known objects rebuilt
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


def _fit_trees(cfg: HeadConfig, seed: int, features: np.ndarray, y: np.ndarray, n_classes: int,
               stages: np.ndarray | None, earliest: np.ndarray | None = None) -> TreeBag | GatedTrees:  # fmt: skip
    """The head's trees: with ``cfg.early_detections`` > 0 and the earlier views (``stages``, (S, N, F)
    in trainer.stages.STAGES order), a ``GatedTrees``: main trees on the alerts as they are, early
    trees on the alerts ``history_gate`` picks (at most that many detections in their 30-day
    history, not a known object without a history) and on the views
    of the others at 1 to that many detections, and, with ``earliest`` ((N, F), NaN rows where
    none), on the others' earliest detections as alerts of their own time (``ndethist`` drawn as
    ``_drawn_ndethist`` says). Why both kinds of first detection: early trees fitted on one
    kind alone score up to 9 points lower on another (docs/model.md, "The first-detection view
    reads the earliest detection"). With ``cfg.early_nulls`` > 0 the early trees also learn from
    a masked copy of all of these (``with_nulls``), so that a null reaches a leaf learnt for it.
    Without views (a caller with none), one set of trees."""
    main = _gbt(cfg, seed).fit(features, y)
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
    return GatedTrees(main, _gbt(cfg, seed).fit(x, yy, sample_weight=weight), gate, n_classes)


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


def _impute_scale(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median-impute, scale by the IQR, and add a missing flag per column (for linear models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(train, 0)
        q = np.nanpercentile(train, [25, 75], 0)
    med = np.where(np.isnan(med), 0.0, med)
    scale = np.where(np.isnan(q[1] - q[0]) | (q[1] - q[0] < 1e-6), 1.0, q[1] - q[0])

    def t(a: np.ndarray) -> np.ndarray:
        miss = np.isnan(a)
        out = np.clip((np.where(miss, med, a) - med) / scale, -10, 10)
        return np.concatenate([out, miss.astype(np.float64)], axis=1)

    return t(train), t(test)


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
        tree_logits = np.log(np.clip(_full_proba(self.trees, features, self.w.shape[0]), 1e-12, 1.0))
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
              cfg: HeadConfig, seed: int, stages: np.ndarray | None = None, earliest: np.ndarray | None = None) -> FittedFused:  # fmt: skip
    """Trees on all of the data; the fusion and the temperature on out-of-fold tree outputs (inner
    object-grouped folds), so neither learns from trees that have seen the same alerts. With
    ``cfg.fusion_views`` > 0 and ``stages`` (features of the alerts' earlier views, (S, N, F)),
    that fraction of the views' out-of-fold outputs joins the fusion's fit, drawn at random. With
    ``cfg.early_detections`` > 0 and ``stages``, the trees are a ``GatedTrees`` (``_fit_trees``),
    in the inner folds as in the final fit, so the fusion learns on the trees it will correct."""
    views = stages if stages is not None and cfg.fusion_views > 0 else np.zeros((0, *features.shape))
    oof = np.zeros((1 + len(views), len(y), n_classes))
    k = max(2, min(cfg.inner_folds, min(len(set(groups[y == c].tolist())) for c in np.unique(y))))
    inner = StratifiedGroupKFold(k, shuffle=True, random_state=seed + 1000)
    for tr, te in inner.split(features, y, groups):
        m = _fit_trees(cfg, seed, features[tr], y[tr], n_classes, None if stages is None else stages[:, tr],
                       None if earliest is None else earliest[tr])  # fmt: skip
        for block, x in enumerate([features, *views]):
            oof[block, te] = np.log(np.clip(_full_proba(m, x[te], n_classes), 1e-12, 1.0))
    drawn = np.concatenate([np.ones(len(y), bool), np.random.default_rng(seed).random(len(views) * len(y)) < cfg.fusion_views])
    offset, zz, yy = oof.reshape(-1, n_classes)[drawn], np.tile(z, (len(oof), 1))[drawn], np.tile(y, len(oof))[drawn]
    w, b, mean, std, scale = _fit_fusion(offset, zz, yy, n_classes, cfg.fusion_l2, cfg.fusion_offsets)
    log.debug("fusion: trees' log-odds scaled by %.3f", scale)
    temperature = fit_temperature(offset + ((zz - mean) / std) @ w.T + b, yy)
    trees = _fit_trees(cfg, seed, features, y, n_classes, stages, earliest)
    return FittedFused(trees, w, b, mean, std, temperature)


def _full_proba(m: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a fold may lack one)."""
    p = np.zeros((len(x), n_classes))
    p[:, m.classes_] = m.predict_proba(x)
    return p


# ---- the rows of the table ------------------------------------------------------------------

Predictor = Callable[[Labelled, np.ndarray, np.ndarray, int], np.ndarray]  # -> (n_test, C) probabilities


def _row_trees(cols: list[int], with_z: bool, cfg: HeadConfig) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        x = d.features[:, cols]
        if with_z:
            x = np.concatenate([x, d.z], axis=1)
        return _full_proba(_gbt(cfg, seed).fit(x[tr], d.y[tr]), x[te], len(d.class_names))

    return run


def _row_logreg(cols: list[int] | None, with_z: bool, c: float = 0.3) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        parts = []
        if cols:
            parts.append(d.features[:, cols])
        if with_z:
            parts.append(d.z)
        a, b = _impute_scale(np.concatenate(parts, 1)[tr], np.concatenate(parts, 1)[te])
        m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed).fit(a, d.y[tr])
        return _full_proba(m, b, len(d.class_names))

    return run


def _train_and_predict(
    net: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
    epochs: int, weight_decay: float,
) -> np.ndarray:
    """Class-balanced cross-entropy, AdamW, minibatches of 64 -> test probabilities."""
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long()
    counts = np.bincount(y_train, minlength=n_classes)
    weight = torch.tensor(len(y_train) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    gen = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(y_train), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss: torch.Tensor = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    net.eval()
    with torch.no_grad():
        out: np.ndarray = torch.softmax(net(torch.from_numpy(x_test).float()), 1).numpy()
    return out


def _row_mlp(hidden: int = 128, epochs: int = 200) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        a, b = _impute_scale(np.concatenate([d.features, d.z], 1)[tr], np.concatenate([d.features, d.z], 1)[te])
        torch.manual_seed(seed)
        n_classes = len(d.class_names)
        net = torch.nn.Sequential(
            torch.nn.Linear(a.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.5),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(hidden, n_classes),
        )  # fmt: skip
        return _train_and_predict(net, a, d.y[tr], b, n_classes, epochs, weight_decay=1e-2)

    return run


class _SequenceNet(torch.nn.Module):
    """The study's next step, a recurrent classifier on the light curve: a GRU over the cleaned
    history (features.history_sequence), its last state to the classes."""

    def __init__(self, channels: int, n_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(channels, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        out: torch.Tensor = self.out(h[-1])
        return out


def _row_gru(epochs: int = 60) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        assert d.sequences is not None
        torch.manual_seed(seed)
        n_classes = len(d.class_names)
        net = _SequenceNet(d.sequences.shape[2], n_classes)
        return _train_and_predict(net, d.sequences[tr], d.y[tr], d.sequences[te], n_classes, epochs, weight_decay=1e-3)

    return run


class _EndToEnd(torch.nn.Module):
    """ALeRCE's stamp-classifier recipe on our inputs: the stamp encoder (starting from the
    self-supervised autoencoder's weights) and the alert's features, concatenated, to the classes;
    trained end to end, the encoder at a tenth of the head's learning rate."""

    def __init__(self, encoder: torch.nn.Module, n_features: int, n_classes: int, latent: int, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.z_norm = torch.nn.BatchNorm1d(latent)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(latent + n_features, hidden), torch.nn.GELU(), torch.nn.Dropout(0.5),
            torch.nn.Linear(hidden, n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        z = self.z_norm(self.encoder(x)[0])
        out: torch.Tensor = self.head(torch.cat([z, f], 1))
        return out


def _row_end_to_end(encoder: torch.nn.Module, epochs: int = 80) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        assert d.stamps is not None
        a, b = _impute_scale(d.features[tr], d.features[te])
        torch.manual_seed(seed)
        n_classes = len(d.class_names)
        net = _EndToEnd(encoder, a.shape[1], n_classes, d.z.shape[1])
        opt = torch.optim.AdamW([{"params": net.encoder.parameters(), "lr": 1e-4},
                                 {"params": [*net.z_norm.parameters(), *net.head.parameters()], "lr": 1e-3}],
                                weight_decay=1e-2)  # fmt: skip
        xs, fs, ys = torch.from_numpy(d.stamps[tr]), torch.from_numpy(a).float(), torch.from_numpy(d.y[tr]).long()
        counts = np.bincount(d.y[tr], minlength=n_classes)
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(len(tr) / (n_classes * np.maximum(counts, 1)),
                                                                dtype=torch.float32))  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(tr), generator=gen)
            for start in range(0, len(tr), 64):
                idx = order[start : start + 64]
                if len(idx) < 2:  # batch norm needs two rows
                    continue
                view = int(torch.randint(8, (1,), generator=gen))  # one of the 8 flips/rotations per batch
                x = dihedral_views(xs[idx])[view]
                opt.zero_grad()
                loss: torch.Tensor = loss_fn(net(x, fs[idx]), ys[idx])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
        net.eval()
        with torch.no_grad():
            out: np.ndarray = torch.softmax(net(torch.from_numpy(d.stamps[te]), torch.from_numpy(b).float()), 1).numpy()
        return out

    return run


def _row_gated_trees(cfg: HeadConfig) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        m = _fit_trees(cfg, seed, d.features[tr], d.y[tr], len(d.class_names), *d.views_at(tr))
        return _full_proba(m, d.features[te], len(d.class_names))

    return run


def _row_fused(cfg: HeadConfig) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        f = fit_fused(d.features[tr], d.z[tr], d.y[tr], d.groups[tr], len(d.class_names), cfg, seed, *d.views_at(tr))
        return f.predict_proba(d.features[te], d.z[te])

    return run


def rows(cfg: HeadConfig, quick: bool = False, with_sequences: bool = True,
         encoder: torch.nn.Module | None = None) -> list[tuple[str, Predictor]]:  # fmt: skip
    meta, hist = _columns(METADATA_FEATURES), _columns(HISTORY_FEATURES)
    everything = list(range(len(FEATURE_NAMES)))
    no_position = [i for i in everything if FEATURE_NAMES[i] not in POSITION_FEATURES]
    table: list[tuple[str, Predictor]] = [
        (STUDY_ROW, _row_logreg(None, True)),
        # The same z read non-linearly: how much of the classes the embedding holds beyond what a
        # linear probe reads (docs/model.md; the published stamp_probabilities stay the study's).
        ("stamp only: gradient-boosted trees on z", _row_trees([], True, cfg)),
        ("metadata only, gradient-boosted trees", _row_trees(meta, False, cfg)),
        ("history only, gradient-boosted trees on hand-made statistics", _row_trees(hist, False, cfg)),
        ("history only, GRU over the light curve (learned)", _row_gru()),
        (REFERENCE_ROW, _row_trees(everything, False, cfg)),
        ("metadata + history, logistic regression", _row_logreg(everything, False)),
        ("metadata + history without position (ablation), trees", _row_trees(no_position, False, cfg)),
        ("metadata + history + z, gradient-boosted trees", _row_trees(everything, True, cfg)),
        ("metadata + history + z, MLP (torch)", _row_mlp()),
        (GATED_ROW, _row_gated_trees(cfg)),
        (FUSED_ROW, _row_fused(cfg)),
    ]
    if encoder is not None:
        table.insert(-2, (END_TO_END_ROW, _row_end_to_end(encoder)))
    if quick:
        return [r for r in table if r[0] in (STUDY_ROW, REFERENCE_ROW, FUSED_ROW)]
    if not with_sequences:
        return [r for r in table if "GRU" not in r[0]]
    return table


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-class probability, and the reliability table."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    table = []
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
            table.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "confidence": float(conf[m].mean()),
                          "accuracy": float(correct[m].mean())})  # fmt: skip
    return {"ece": float(ece), "bins": table}


def cross_validate(d: Labelled, table: list[tuple[str, Predictor]], seeds: int = 3, folds: int = 5,
                   show_progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every row over ``seeds`` x ``folds`` object-grouped folds -> per row: macro-F1 per seed,
    per-class F1 per seed, and (for the fused row) out-of-fold probabilities of seed 0. With
    ``d.stages``, the rows of ``STAGED_ROWS`` are scored on each earlier view as well ("stages":
    the same per seed for each number of detections of ``trainer.stages.STAGES``)."""
    n_classes, n = len(d.class_names), len(d.y)
    out: dict[str, Any] = {"seeds": seeds, "folds": folds, "labelled": n, "objects": len(set(d.groups.tolist())),
                           "rows": {}}  # fmt: skip
    viewed = d.with_views() if d.stages is not None else None
    n_views = 0 if d.stages is None else len(d.stages)
    bar = tqdm(total=len(table) * seeds * folds, desc="cross-validation", unit="fit", disable=not show_progress)
    for name, predict in table:
        blocks = 1 + n_views if name in STAGED_ROWS else 1
        scores: list[dict[str, list[Any]]] = [{"macro_f1": [], "per_class_f1": []} for _ in range(blocks)]
        oof0 = None
        for seed in range(seeds):
            oof = np.zeros((blocks, n, n_classes))
            for tr, te in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(d.features, d.y, d.groups):
                if blocks == 1:
                    oof[0, te] = predict(d, tr, te, seed)
                else:
                    assert viewed is not None
                    every = np.concatenate([te + b * n for b in range(blocks)])
                    oof[:, te] = predict(viewed, tr, every, seed).reshape(blocks, len(te), n_classes)
                bar.update(1)
            for b in range(blocks):
                pred = oof[b].argmax(1)
                scores[b]["macro_f1"].append(float(f1_score(d.y, pred, average="macro", zero_division=0)))
                scores[b]["per_class_f1"].append(
                    f1_score(d.y, pred, average=None, labels=list(range(n_classes)), zero_division=0).tolist())
            if seed == 0:
                oof0 = oof[0]
        assert oof0 is not None
        row: dict[str, Any] = dict(scores[0])
        if blocks > 1:
            row["stages"] = [{"detections": k} | s for k, s in zip(STAGES, scores[1:], strict=True)]
        if name == FUSED_ROW:
            row["calibration"] = calibration(oof0, d.y)
            row["oof_probabilities_seed0"] = oof0.tolist()
        out["rows"][name] = row
        log.info("%s: macro-F1 %.3f ± %.3f", name, np.mean(row["macro_f1"]), np.std(row["macro_f1"]))
    bar.close()
    return out


def summarise(table: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """mean ± std per row (for bundles and reports), without the out-of-fold probabilities."""
    out: dict[str, Any] = {"seeds": table["seeds"], "folds": table["folds"], "labelled": table["labelled"],
                           "objects": table["objects"], "rows": {}}  # fmt: skip
    for name, row in table["rows"].items():
        out["rows"][name] = _mean_scores(row, class_names)
        if "stages" in row:
            out["rows"][name]["stages"] = [{"detections": s["detections"]} | _mean_scores(s, class_names) for s in row["stages"]]
        if "calibration" in row:
            out["rows"][name]["ece"] = row["calibration"]["ece"]
    return out


def _mean_scores(scores: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    per = np.asarray(scores["per_class_f1"])
    return {
        "macro_f1_mean": float(np.mean(scores["macro_f1"])), "macro_f1_std": float(np.std(scores["macro_f1"])),
        "per_class_f1": {c: float(per[:, i].mean()) for i, c in enumerate(class_names)},
    }  # fmt: skip


def train_head(features: np.ndarray, z: np.ndarray, y: np.ndarray, groups: np.ndarray, class_names: tuple[str, ...],
               cfg: HeadConfig, *, sequences: np.ndarray | None = None, quick: bool = False,
               show_progress: bool = True, stamps: np.ndarray | None = None,
               encoder: torch.nn.Module | None = None, stages: np.ndarray | None = None,
               earliest: np.ndarray | None = None) -> tuple[FittedFused, dict[str, Any]]:  # fmt: skip
    """Cross-validate the table's rows on the labelled alerts, then fit the shipped head on all of
    them. -> (fitted head, the full table). With ``stamps`` and the pretrained ``encoder``, the
    table also has the end-to-end row; with ``stages`` (features of trainer/stages.py's earlier
    views), the reference and fused rows are scored on them too."""
    d = Labelled(features, z, y, groups, class_names, sequences, stamps, stages, earliest)
    n_objects_min = min(len(set(groups[y == c].tolist())) for c in np.unique(y))
    folds = max(2, min(cfg.cv_folds, n_objects_min))
    end_to_end = encoder if stamps is not None and not quick else None
    table = cross_validate(d, rows(cfg, quick, sequences is not None, end_to_end), seeds=1 if quick else cfg.cv_seeds, folds=folds,
                           show_progress=show_progress)  # fmt: skip
    fitted = fit_fused(features, z, y, groups, len(class_names), cfg, seed=0, stages=stages, earliest=earliest)
    return fitted, table
