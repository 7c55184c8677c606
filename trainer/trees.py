"""LightGBM's gradient-boosted trees (or a bag of them) -> ``model.trees.TreeArrays`` (tensors the
consumer evaluates in torch). Reads the fitted booster's own dump (``dump_model``: every split's
feature, threshold, missing-value rule and every leaf's value); ``tests/unit/test_trees.py`` holds
the result to ``predict_proba`` on data with NaNs, so a change in LightGBM fails loudly instead of
silently changing the predictions.

Why LightGBM and not scikit-learn's HistGradientBoostingClassifier (which grew the trees until
2026-11-26): stochastic boosting, each tree on a random 80 % of the rows and half of the features,
is what scikit-learn's trees lack, and on 525 labels it scored 91.8 ± 1.0 macro-F1 against
90.3 ± 1.4 for the bag of scikit-learn models, paired over 10 seeds +1.5 (standard error 0.5),
with as many trees of the same depth (at most 7 leaves: the consumer's loop costs 16.5 µs/alert
against 18.8, docs/model.md)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from lightgbm import LGBMClassifier
from scipy.special import softmax

from model.trees import TreeArrays

ABSENT_CLASS_LOGIT = -30.0  # a class the trees never saw in training: probability ~0


class TreeBag:
    """Gradient-boosted tree models fitted on the same data, differing only in their random seed,
    their raw scores averaged: one ensemble whose leaves are worth 1/B each, so the bundle and the
    consumer see one set of trees (``tree_arrays``). The default is one model (``head.bag``)."""

    def __init__(self, members: list[LGBMClassifier]) -> None:
        if not members:
            raise ValueError("a bag needs at least one model")
        self.members = members

    def fit(self, x: np.ndarray, y: np.ndarray) -> TreeBag:
        for m in self.members:
            m.fit(x, y)
        self.classes_ = self.members[0].classes_
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """The members' raw scores (log-odds), averaged: (N, classes seen)."""
        return np.mean([np.asarray(m.predict(x, raw_score=True), np.float64) for m in self.members], axis=0)  # type: ignore[no-any-return]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(x), axis=1)  # type: ignore[no-any-return]


class GatedTrees:
    """Two sets of trees and a gate on one feature: a row whose ``column`` is at most ``max_value``
    is scored by ``early`` alone, every other row (a NaN there included) by ``main`` alone.

    Why (docs/model.md, "New objects"): the labelled set's SN, AGN and VS are objects seen hundreds
    of times, its asteroids and artefacts first detections, so trees fitted on it learn "seen once:
    asteroid or bogus" and a new supernova's first alert is never called SN. The early trees are
    fitted on what a first detection can be (the training alerts with no earlier detection in their
    history, and the earlier views and earliest detections of the others; trainer/classify.py
    ``_fit_trees``), the main trees keep the objects the labels describe. ``tree_arrays`` turns the
    pair into one ensemble (a gate split at every root), so the bundle and the consumer see one set
    of trees."""

    def __init__(self, main: TreeBag, early: TreeBag, column: int, max_value: float, n_classes: int) -> None:
        self.main, self.early = main, early
        self.column, self.max_value = column, max_value
        self.classes_ = np.arange(n_classes)

    def gated(self, x: np.ndarray) -> np.ndarray:
        """The rows the early trees score (NaN in the gate's column: the main trees)."""
        return gated_rows(x, self.column, self.max_value)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """(N, classes) raw scores; a class a set of trees never saw scores ABSENT_CLASS_LOGIT."""
        rows = self.gated(x)
        out = np.empty((len(x), len(self.classes_)))
        for trees, sel in ((self.early, rows), (self.main, ~rows)):
            if sel.any():
                out[sel] = _full_raw(trees, x[sel], len(self.classes_))
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(x), axis=1)  # type: ignore[no-any-return]


def gated_rows(x: np.ndarray, column: int, max_value: float) -> np.ndarray:
    """Rows whose ``column`` is at most ``max_value`` (as float32, as the consumer compares; NaN:
    not gated): the gate of ``GatedTrees``, and the alerts its early trees are fitted on."""
    with np.errstate(invalid="ignore"):
        return np.asarray(x[:, column] <= np.float32(max_value))


def _full_raw(bag: TreeBag, x: np.ndarray, n_classes: int) -> np.ndarray:
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
        return gated_arrays(tree_arrays(clf.main, both), tree_arrays(clf.early, both), clf.column, clf.max_value)
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


def gated_arrays(main: TreeArrays, early: TreeArrays, column: int, max_value: float) -> TreeArrays:
    """Two ensembles -> one that scores a row by ``early`` where its ``column`` <= ``max_value`` and
    by ``main`` elsewhere (NaN: main). Every tree gets a gate split at a new root: a main tree's
    gated rows, and an early tree's other rows, reach a leaf worth 0 in one step. The early trees'
    baseline differs from the main trees' where one set never saw a class: one more gated tree per
    such class adds the difference. Depth + 1; the consumer's loop pays one step per tree and row
    for the gate (docs/benchmarks.md)."""
    width = max(main.feature.shape[1], early.feature.shape[1]) + 2
    leaf = width - 1  # the new leaf worth 0, at the end of every tree
    gate = float(_float32_threshold(np.array([max_value], np.float64))[0])
    parts = []
    for arrays, early_side in ((main, False), (early, True)):
        t, m = arrays.feature.shape
        feature, threshold, left, right, missing_left, is_leaf, value = _blank_tables(t, width)
        inner = ~arrays.is_leaf.numpy()
        feature[:, 1 : m + 1] = arrays.feature.numpy()
        threshold[:, 1 : m + 1] = arrays.threshold.numpy()
        left[:, 1 : m + 1] = np.where(inner, arrays.left.numpy() + 1, 0)
        right[:, 1 : m + 1] = np.where(inner, arrays.right.numpy() + 1, 0)
        missing_left[:, 1 : m + 1] = arrays.missing_left.numpy()
        is_leaf[:, 1 : m + 1] = arrays.is_leaf.numpy()
        value[:, 1 : m + 1] = arrays.value.numpy()
        is_leaf[:, 0], feature[:, 0], threshold[:, 0] = False, column, gate
        left[:, 0], right[:, 0] = (1, leaf) if early_side else (leaf, 1)
        parts.append((feature, threshold, left, right, missing_left, is_leaf, value, arrays.tree_class.numpy()))
    shift = early.baseline.numpy() - main.baseline.numpy()
    for c in np.flatnonzero(shift):
        feature, threshold, left, right, missing_left, is_leaf, value = _blank_tables(1, width)
        is_leaf[0, 0], feature[0, 0], threshold[0, 0], left[0, 0], right[0, 0] = False, column, gate, 1, leaf
        value[0, 1] = shift[c]
        parts.append((feature, threshold, left, right, missing_left, is_leaf, value, np.array([c], np.int64)))
    f, th, lo, hi, ml, lf, v, tc = (np.concatenate([p[i] for p in parts]) for i in range(8))
    return TreeArrays(
        torch.from_numpy(f), torch.from_numpy(th.astype(np.float32)), torch.from_numpy(lo), torch.from_numpy(hi),
        torch.from_numpy(ml), torch.from_numpy(lf), torch.from_numpy(v), torch.from_numpy(tc),
        main.baseline.clone(), max(main.depth, early.depth) + 1,
    )  # fmt: skip


def _blank_tables(trees: int, width: int) -> tuple[np.ndarray, ...]:
    """(feature, threshold, left, right, missing_left, is_leaf, value) of ``trees`` trees of
    ``width`` nodes, every node a leaf worth 0 (the padding of a shorter tree)."""
    shape = (trees, width)
    return (np.zeros(shape, np.int64), np.zeros(shape, np.float64), np.zeros(shape, np.int64), np.zeros(shape, np.int64),
            np.zeros(shape, bool), np.ones(shape, bool), np.zeros(shape, np.float32))  # fmt: skip


def _flatten(root: dict[str, Any]) -> list[dict[str, Any]]:
    """One dumped tree -> its nodes in breadth-first order (root 0), children by index. Where a
    NaN goes: LightGBM's ``missing_type`` "NaN" sends it the ``default_left`` way; "None" (no NaN
    in the feature's training values) reads NaN as 0, so it goes where 0 goes."""
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
            missing_left = float(node["threshold"]) >= 0.0  # 0 <= threshold: left
        else:  # "Zero": zeros read as missing (zero_as_missing), which the tensors cannot express
            raise ValueError(f"missing_type {missing!r} is not supported")
        entry = {"leaf": False, "feature": int(node["split_feature"]), "threshold": float(node["threshold"]),
                 "missing_left": missing_left, "depth": depth}  # fmt: skip
        nodes.append(entry)
        entry["left"] = len(nodes) + len(queue)
        entry["right"] = entry["left"] + 1
        queue += [(node["left_child"], depth + 1), (node["right_child"], depth + 1)]
    return nodes


def _float32_threshold(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= t (for float32 inputs x: x <= t  <=>  x <= that float32)."""
    with np.errstate(over="ignore"):  # a threshold beyond float32's range becomes its largest float
        f = t.astype(np.float32)
    over = f.astype(np.float64) > t
    f[over] = np.nextafter(f[over], np.float32(-np.inf))
    return f
