"""LightGBM's gradient-boosted trees (or a bag of them) -> ``model.trees.TreeArrays`` (tensors the
consumer evaluates in torch). Reads the fitted booster's own dump (``dump_model``: every split's
feature, threshold, missing-value rule, every node's training count and every leaf's value);
``tests/unit/test_trees.py`` holds the result to ``predict_proba`` on data with NaNs, so a change
in LightGBM fails loudly instead of silently changing the predictions.

One rule differs from LightGBM's own ``predict``, on purpose: a NaN in a feature that had no NaN in
the training data goes to the child with more training alerts (scikit-learn's histogram trees do
the same), not where 0 goes (LightGBM reads it as 0; an ``elong``, ``fwhm`` or ``magpsf`` of 0 is no
value a real alert has). ``TreeBag`` scores through the same tables, so the cross-validation
measures the rule the bundle runs (docs/model-experiments.md, "Nulls where the trees never saw one").

Why LightGBM and not scikit-learn's HistGradientBoostingClassifier (which grew the trees until
2026-11-26): stochastic boosting, each tree on a random 80 % of the rows and half of the features,
is what scikit-learn's trees lack, and on 525 labels it scored 91.8 ± 1.0 macro-F1 against
90.3 ± 1.4 for the bag of scikit-learn models, paired over 10 seeds +1.5 (standard error 0.5),
with as many trees of the same depth (at most 7 leaves: the consumer's loop costs 16.5 µs/alert
against 18.8, docs/model.md)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightgbm import LGBMClassifier
from scipy.special import softmax

from alerts.features import FLOAT32_MAX
from model.tree_kernel import evaluate_trees
from model.trees import TreeArrays, TreeEnsemble

ABSENT_CLASS_LOGIT = -30.0  # a class the trees never saw in training: probability ~0


class TreeBag:
    """Gradient-boosted tree models fitted on the same data, differing only in their random seed,
    their raw scores averaged: one ensemble whose leaves are worth 1/B each, so the bundle and the
    consumer see one set of trees (``tree_arrays``). The default is one model (``head.bag``)."""

    def __init__(self, members: list[LGBMClassifier]) -> None:
        if not members:
            raise ValueError("a bag needs at least one model")
        self.members = members
        self._tables: dict[str, np.ndarray] | None = None

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> TreeBag:
        for m in self.members:
            m.fit(x, y, sample_weight=sample_weight)
        self.classes_ = self.members[0].classes_
        self._tables = None
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """The members' raw scores (log-odds), averaged: (N, classes seen). Evaluated on the tables
        the bundle ships (float32 features, as the consumer passes them), not by LightGBM's
        ``predict``: the two differ only for a NaN in a feature never NaN in training, where the
        tables send it to the child with more training alerts (``_flatten``)."""
        seen = np.asarray(self.classes_, np.int64)
        if self._tables is None:
            self._tables = TreeEnsemble.from_arrays(tree_arrays(self, int(seen.max()) + 1)).tables()
        return evaluate_trees(np.asarray(x, np.float32), self._tables)[:, seen].astype(np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(x), axis=1)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Gate:
    """Which rows the early trees of a ``GatedTrees`` score: those whose ``column`` is at most
    ``max_value`` (NaN: not), except, with ``count_column``, the rows that are also empty in
    ``empty_column`` (at most 0.5, or NaN) and above ``max_count`` in ``count_column`` (NaN: not),
    and, with ``present_column``, have a value there (not NaN).

    For the head (trainer/classify.py ``history_gate``): no earlier detection in the alert's own
    30-day history, unless the alert carries no history at all and ZTF counted more than
    ``max_count`` raw detections at its place (``ndethist``): an alert with no history (an archival
    copy, a field's first visit of a season) cannot say by it whether its object is new, and an
    object detected that often before is not (docs/model-experiments.md, "An alert without a
    history"). The exception holds only where the alert carries its shape measure (``elong``),
    which every ZTF packet fills: the main trees never saw a null there and learnt no direction for
    one, while the early trees learnt where nulls go (docs/model-experiments.md, "Known objects
    rebuilt without a history")."""

    column: int
    max_value: float
    empty_column: int | None = None
    count_column: int | None = None
    max_count: float | None = None
    present_column: int | None = None

    def __post_init__(self) -> None:
        if (self.count_column is None) != (self.max_count is None) or (self.count_column is None) != (self.empty_column is None):
            raise ValueError("empty_column, count_column and max_count go together")
        if self.present_column is not None and self.count_column is None:
            raise ValueError("present_column narrows the exception: it needs count_column")

    @property
    def splits(self) -> int:
        """The gate's nodes above every root in ``gated_arrays``."""
        return 1 if self.count_column is None else 3 if self.present_column is None else 4

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The rows the early trees score (compared as float32, as the consumer compares)."""
        with np.errstate(invalid="ignore"):
            out = np.asarray(x[:, self.column] <= np.float32(self.max_value))
            if self.count_column is not None and self.empty_column is not None and self.max_count is not None:
                empty = ~(x[:, self.empty_column] > np.float32(0.5))
                known = np.asarray(x[:, self.count_column] > np.float32(self.max_count))
                if self.present_column is not None:
                    known &= ~np.isnan(x[:, self.present_column])
                out &= ~(empty & known)
        return out

    def write_prefix(self, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                     missing_left: np.ndarray, tree: int, other: int) -> None:  # fmt: skip
        """Nodes 0..splits-1 of every tree in the tables: the gate, leading to node ``tree`` (the
        tree's own root) where it picks the row and to ``other`` (a leaf worth 0) elsewhere."""
        feature[:, 0], threshold[:, 0], missing_left[:, 0] = self.column, _f32(self.max_value), False
        if self.splits == 1:
            left[:, 0], right[:, 0] = tree, other  # <= max_value: early; NaN: main
            return
        assert self.empty_column is not None and self.count_column is not None and self.max_count is not None
        left[:, 0], right[:, 0] = 1, other
        feature[:, 1], threshold[:, 1], missing_left[:, 1] = self.empty_column, _f32(0.5), True
        left[:, 1], right[:, 1] = 2, tree  # empty (or NaN): ask the count; a history: early
        feature[:, 2], threshold[:, 2], missing_left[:, 2] = self.count_column, _f32(self.max_count), True
        left[:, 2], right[:, 2] = tree, (other if self.splits == 3 else 3)  # at most max_count (or NaN): early
        if self.splits == 4:  # a value in present_column (every feature is <= FLOAT32_MAX): main; NaN: early
            feature[:, 3], threshold[:, 3], missing_left[:, 3] = self.present_column, FLOAT32_MAX, False
            left[:, 3], right[:, 3] = other, tree


@dataclass(frozen=True)
class NullGate:
    """Picks the rows that are null (NaN) in every one of ``columns``: for the head
    (trainer/classify.py ``export_gate``), a packet without the measurements every ZTF packet
    carries, as one rebuilt from an export of a few fields (trainer/stages.py
    ``exported_first_alert``)."""

    columns: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError("a null gate needs at least one column")

    @property
    def splits(self) -> int:
        return len(self.columns)

    def rows(self, x: np.ndarray) -> np.ndarray:
        return np.isnan(x[:, list(self.columns)]).all(1)  # type: ignore[no-any-return]

    def write_prefix(self, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                     missing_left: np.ndarray, tree: int, other: int) -> None:  # fmt: skip
        """One node per column: a value (every feature is <= FLOAT32_MAX) leads to ``other``, a NaN
        to the next column's node, and past the last one to ``tree``."""
        for i, column in enumerate(self.columns):
            feature[:, i], threshold[:, i], missing_left[:, i] = column, FLOAT32_MAX, False
            left[:, i], right[:, i] = other, (i + 1 if i + 1 < len(self.columns) else tree)


class GatedTrees:
    """Two sets of trees and a ``Gate``: a row the gate picks is scored by ``early`` alone, every
    other row by ``main`` alone.

    Why (docs/model.md, "New objects"): the labelled set's SN, AGN and VS are objects seen hundreds
    of times, its asteroids and artefacts first detections, so trees fitted on it learn "seen once:
    asteroid or bogus" and a new supernova's first alert is never called SN. The early trees are
    fitted on what a first detection can be (the training alerts the gate picks, and the earlier
    views and earliest detections of the others; trainer/classify.py ``fit_trees``), the main
    trees keep the objects the labels describe. ``tree_arrays`` turns the pair into one ensemble
    (the gate's splits above every root), so the bundle and the consumer see one set of trees.
    Either side may itself be a ``GatedTrees``: the head's early side holds the early trees and,
    behind a ``NullGate``, the export trees (trainer/classify.py ``fit_trees``)."""

    def __init__(self, main: TreeBag | GatedTrees, early: TreeBag | GatedTrees, gate: Gate | NullGate,
                 n_classes: int) -> None:  # fmt: skip
        self.main, self.early, self.gate = main, early, gate
        self.classes_ = np.arange(n_classes)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """(N, classes) raw scores; a class a set of trees never saw scores ABSENT_CLASS_LOGIT."""
        rows = self.gate.rows(x)
        out = np.empty((len(x), len(self.classes_)))
        for trees, sel in ((self.early, rows), (self.main, ~rows)):
            if sel.any():
                out[sel] = _full_raw(trees, x[sel], len(self.classes_))
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(x), axis=1)  # type: ignore[no-any-return]


def _full_raw(bag: TreeBag | GatedTrees, x: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((len(x), n_classes), ABSENT_CLASS_LOGIT)
    out[:, bag.classes_] = bag.decision_function(x)
    return out


def tree_arrays(clf: LGBMClassifier | TreeBag | GatedTrees, n_classes: int | None = None) -> TreeArrays:
    """``n_classes``: the model's class count, when the training data lacked some classes
    (``clf.classes_`` holds the class indices it saw). A bag becomes one ensemble: every member's
    trees, each leaf divided by the bag's size. Multiclass LightGBM starts every class at 0 and
    keeps tree i for class i mod (classes seen). A ``GatedTrees`` becomes one ensemble too
    (``gated_arrays``)."""
    if isinstance(clf, GatedTrees):
        both = len(clf.classes_)
        return gated_arrays(tree_arrays(clf.main, both), tree_arrays(clf.early, both), clf.gate)
    members = clf.members if isinstance(clf, TreeBag) else [clf]
    seen = np.asarray(clf.classes_, dtype=np.int64)
    n_classes = len(seen) if n_classes is None else n_classes
    if len(seen) < 3:
        raise ValueError("binary classifiers keep one tree per iteration: not supported here")
    if any(not np.array_equal(m.classes_, seen) for m in members):
        raise ValueError("the bag's members saw different classes")
    tables = []
    for m in members:
        dump = m.booster_.dump_model()
        if dump["num_tree_per_iteration"] != len(seen):
            raise ValueError("expected one tree per class and iteration")
        tables += [(i % len(seen), _flatten(t["tree_structure"])) for i, t in enumerate(dump["tree_info"])]
    width = max(len(nodes) for _, nodes in tables)
    t = len(tables)
    feature, threshold, left, right, missing_left, is_leaf, value = _blank_tables(t, width)
    tree_class = np.zeros(t, np.int64)
    depth = 0
    for i, (k, nodes) in enumerate(tables):
        for j, n in enumerate(nodes):
            if n["leaf"]:
                value[i, j] = n["value"] / len(members)
                continue
            is_leaf[i, j] = False
            feature[i, j], left[i, j], right[i, j] = n["feature"], n["left"], n["right"]
            threshold[i, j], missing_left[i, j] = n["threshold"], n["missing_left"]
        tree_class[i] = seen[k]
        depth = max(depth, max(n["depth"] for n in nodes))
    baseline = np.full(n_classes, ABSENT_CLASS_LOGIT, dtype=np.float32)
    baseline[seen] = 0.0
    # float32 thresholds: the features reach the model as float32, and x <= t must decide the same
    # in both (the largest float32 not above LightGBM's double threshold).
    return TreeArrays(
        torch.from_numpy(feature), torch.from_numpy(_float32_threshold(threshold)), torch.from_numpy(left), torch.from_numpy(right),
        torch.from_numpy(missing_left), torch.from_numpy(is_leaf), torch.from_numpy(value),
        torch.from_numpy(tree_class), torch.from_numpy(baseline), depth,
    )  # fmt: skip


def gated_arrays(main: TreeArrays, early: TreeArrays, gate: Gate | NullGate) -> TreeArrays:
    """Two ensembles -> one that scores a row by ``early`` where ``gate`` picks it and by ``main``
    elsewhere. Every tree gets the gate's splits above its root (``gate.write_prefix``, which both
    sides share as a small graph: a ``Gate``'s column and its exception's, a ``NullGate``'s one node
    per column): a main tree's gated rows, and an early tree's other rows, reach a leaf worth 0.
    The early trees' baseline differs from the main trees' where one set never saw a class: one
    more gated tree per such class adds the difference. Depth + ``gate.splits``; for the head's
    history gate the consumer's loop pays one step per tree for a row with an earlier detection,
    and up to four for one without (docs/benchmarks.md)."""
    splits = gate.splits
    width = max(main.feature.shape[1], early.feature.shape[1]) + splits + 1
    leaf = width - 1  # the new leaf worth 0, at the end of every tree

    def prefix(feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
               missing_left: np.ndarray, is_leaf: np.ndarray, early_side: bool) -> None:  # fmt: skip
        """Node 0..splits-1: the gate. ``splits`` is the tree's root; ``leaf`` is worth 0."""
        tree, other = (splits, leaf) if early_side else (leaf, splits)
        is_leaf[:, :splits] = False
        gate.write_prefix(feature, threshold, left, right, missing_left, tree, other)

    parts = []
    for arrays, early_side in ((main, False), (early, True)):
        t, m = arrays.feature.shape
        feature, threshold, left, right, missing_left, is_leaf, value = _blank_tables(t, width)
        inner = ~arrays.is_leaf.numpy()
        body = slice(splits, m + splits)
        feature[:, body] = arrays.feature.numpy()
        threshold[:, body] = arrays.threshold.numpy()
        left[:, body] = np.where(inner, arrays.left.numpy() + splits, 0)
        right[:, body] = np.where(inner, arrays.right.numpy() + splits, 0)
        missing_left[:, body] = arrays.missing_left.numpy()
        is_leaf[:, body] = arrays.is_leaf.numpy()
        value[:, body] = arrays.value.numpy()
        prefix(feature, threshold, left, right, missing_left, is_leaf, early_side)
        parts.append((feature, threshold, left, right, missing_left, is_leaf, value, arrays.tree_class.numpy()))
    shift = early.baseline.numpy() - main.baseline.numpy()
    for c in np.flatnonzero(shift):
        feature, threshold, left, right, missing_left, is_leaf, value = _blank_tables(1, width)
        prefix(feature, threshold, left, right, missing_left, is_leaf, True)
        value[0, splits] = shift[c]  # the early side's "tree" is one leaf worth the difference
        parts.append((feature, threshold, left, right, missing_left, is_leaf, value, np.array([c], np.int64)))
    f, th, lo, hi, ml, lf, v, tc = (np.concatenate([p[i] for p in parts]) for i in range(8))
    return TreeArrays(
        torch.from_numpy(f), torch.from_numpy(th.astype(np.float32)), torch.from_numpy(lo), torch.from_numpy(hi),
        torch.from_numpy(ml), torch.from_numpy(lf), torch.from_numpy(v), torch.from_numpy(tc),
        main.baseline.clone(), max(main.depth, early.depth) + splits,
    )  # fmt: skip


def _f32(value: float) -> float:
    """A gate threshold as the consumer compares it (float32 features)."""
    return float(_float32_threshold(np.array([value], np.float64))[0])


def _blank_tables(trees: int, width: int) -> tuple[np.ndarray, ...]:
    """(feature, threshold, left, right, missing_left, is_leaf, value) of ``trees`` trees of
    ``width`` nodes, every node a leaf worth 0 (the padding of a shorter tree)."""
    shape = (trees, width)
    return (np.zeros(shape, np.int64), np.zeros(shape, np.float64), np.zeros(shape, np.int64), np.zeros(shape, np.int64),
            np.zeros(shape, bool), np.ones(shape, bool), np.zeros(shape, np.float32))  # fmt: skip


def _flatten(root: dict[str, Any]) -> list[dict[str, Any]]:
    """One dumped tree -> its nodes in breadth-first order (root 0), children by index. Where a
    NaN goes: LightGBM's ``missing_type`` "NaN" sends it the ``default_left`` way, learnt from the
    training NaNs. "None" (no NaN in the feature's training values): to the child with more
    training alerts (left on a tie), as scikit-learn's histogram trees do. LightGBM's ``predict``
    reads such a NaN as 0 instead, a value no real alert has in most features (``fwhm``, ``elong``,
    ``magpsf``...). Measured over 10 seeds (docs/model-experiments.md, "Nulls where the trees never saw one"):
    the labelled alerts with 10 / 30 % of their candidate fields null +1.3 / +2.0 macro-F1 (ahead
    on 10 of 10 seeds), every complete alert the same."""
    nodes: list[dict[str, Any]] = []
    queue: deque[tuple[dict[str, Any], int]] = deque([(root, 0)])
    while queue:
        node, depth = queue.popleft()
        if "leaf_value" in node:
            nodes.append({"leaf": True, "value": float(node["leaf_value"]), "depth": depth})
            continue
        if node["decision_type"] != "<=":
            raise ValueError(f"split {node['decision_type']!r} is not supported (categorical features?)")
        missing = node["missing_type"]
        if missing == "NaN":
            missing_left = bool(node["default_left"])
        elif missing == "None":
            missing_left = _count(node["left_child"]) >= _count(node["right_child"])
        else:  # "Zero": zeros read as missing (zero_as_missing), which the tensors cannot express
            raise ValueError(f"missing_type {missing!r} is not supported")
        entry = {"leaf": False, "feature": int(node["split_feature"]), "threshold": float(node["threshold"]),
                 "missing_left": missing_left, "depth": depth}  # fmt: skip
        nodes.append(entry)
        entry["left"] = len(nodes) + len(queue)
        entry["right"] = entry["left"] + 1
        queue += [(node["left_child"], depth + 1), (node["right_child"], depth + 1)]
    return nodes


def _count(node: dict[str, Any]) -> int:
    """The training alerts that reached a dumped node (LightGBM's unweighted count)."""
    return int(node["leaf_count"] if "leaf_value" in node else node["internal_count"])


def _float32_threshold(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= t (for float32 inputs x: x <= t  <=>  x <= that float32)."""
    with np.errstate(over="ignore"):  # a threshold beyond float32's range becomes its largest float
        f = t.astype(np.float32)
    over = f.astype(np.float64) > t
    f[over] = np.nextafter(f[over], np.float32(-np.inf))
    return f
