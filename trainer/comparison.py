"""The comparison table: object-grouped cross-validation of every row, the calibration of the
fused row, the summaries the bundle and the report keep, and ``train_head``, which runs the table
and then fits the shipped head (trainer/classify.py) on all the labelled alerts.

Rows kept in every table (docs/model.md): the study's stamp-only linear probe (the study's
method) and trees on the same z (stamp only, read non-linearly), metadata only, history only,
metadata + history (gradient-boosted trees: the reference, and logistic regression), the same
without position (ablation), trees on metadata + history + z, an MLP on everything, the fused
model's own gated trees without z, and the shipped fused model (gated trees on metadata +
history, plus a linear correction from z without class offsets, temperature-scaled).

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
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from alerts.features import FEATURE_NAMES, HISTORY_FEATURES, METADATA_FEATURES, POSITION_FEATURES
from config.trainer import HeadConfig
from model.autoencoder import dihedral_views
from trainer.classify import FittedFused, fit_fused, fit_trees, full_proba, gbt
from trainer.stages import STAGES

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
    """The labelled alerts every row of the table is cross-validated on, row-aligned: what each
    kind of row reads (features, z, the history as a sequence, the stamps), and the earlier views
    that the head's early trees are fitted on and the staged rows are scored on."""

    features: np.ndarray  # (N, F) float32, NaN = missing
    z: np.ndarray  # (N, latent)
    y: np.ndarray  # (N,) class index
    groups: np.ndarray  # (N,) objectId
    class_names: tuple[str, ...]
    sequences: np.ndarray | None = None  # (N, L, 6): alerts.features.history_sequence
    stamps: np.ndarray | None = None  # (N, 2, 21, 21) normalised: for the end-to-end row
    stages: np.ndarray | None = None  # (S, N, F): features of the earlier views (trainer/stages.py)
    earliest: np.ndarray | None = None  # (N, F): trainer.stages.earliest_detection_alert's features (NaN rows: none)
    exported: np.ndarray | None = None  # (2, N, F): trainer.stages.exported_first_alert of each and of its earliest

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

    def views_at(self, tr: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The earlier views, the earliest detections and the exported first alerts of the alerts
        ``tr`` (None where absent): what the head's trees are fitted on beside the alerts themselves."""
        return ((None if self.stages is None else self.stages[:, tr]), (None if self.earliest is None else self.earliest[tr]),
                (None if self.exported is None else self.exported[:, tr]))  # fmt: skip


def _columns(names: Sequence[str]) -> list[int]:
    return [FEATURE_NAMES.index(n) for n in names]


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


# ---- the rows of the table ------------------------------------------------------------------

Predictor = Callable[[Labelled, np.ndarray, np.ndarray, int], np.ndarray]  # -> (n_test, C) probabilities


def _row_trees(cols: list[int], with_z: bool, cfg: HeadConfig) -> Predictor:
    def run(d: Labelled, tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        x = d.features[:, cols]
        if with_z:
            x = np.concatenate([x, d.z], axis=1)
        return full_proba(gbt(cfg, seed).fit(x[tr], d.y[tr]), x[te], len(d.class_names))

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
        return full_proba(m, b, len(d.class_names))

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
        m = fit_trees(cfg, seed, d.features[tr], d.y[tr], len(d.class_names), *d.views_at(tr))
        return full_proba(m, d.features[te], len(d.class_names))

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
    if "unlabelled" in table:
        out["unlabelled"] = table["unlabelled"]
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
               earliest: np.ndarray | None = None,
               exported: np.ndarray | None = None) -> tuple[FittedFused, dict[str, Any]]:  # fmt: skip
    """Cross-validate the table's rows on the labelled alerts, then fit the shipped head on all of
    them. -> (fitted head, the full table). With ``stamps`` and the pretrained ``encoder``, the
    table also has the end-to-end row; with ``stages`` (features of trainer/stages.py's earlier
    views), the reference and fused rows are scored on them too."""
    d = Labelled(features, z, y, groups, class_names, sequences, stamps, stages, earliest, exported)
    n_objects_min = min(len(set(groups[y == c].tolist())) for c in np.unique(y))
    folds = max(2, min(cfg.cv_folds, n_objects_min))
    end_to_end = encoder if stamps is not None and not quick else None
    table = cross_validate(d, rows(cfg, quick, sequences is not None, end_to_end), seeds=1 if quick else cfg.cv_seeds, folds=folds,
                           show_progress=show_progress)  # fmt: skip
    fitted = fit_fused(features, z, y, groups, len(class_names), cfg, seed=0, stages=stages, earliest=earliest,
                       exported=exported)  # fmt: skip
    return fitted, table
