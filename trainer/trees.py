"""scikit-learn's HistGradientBoostingClassifier (or a bag of them) -> ``model.trees.TreeArrays``
(tensors the consumer evaluates in torch). Reads the fitted estimator's tree tables
(``_predictors``, a private but long-stable attribute); ``tests/unit/test_trees.py`` holds the
result to ``predict_proba``, so a change in scikit-learn fails loudly instead of silently changing
the predictions."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax
from sklearn.ensemble import HistGradientBoostingClassifier

from model.trees import TreeArrays

ABSENT_CLASS_LOGIT = -30.0  # a class the trees never saw in training: probability ~0


class TreeBag:
    """Gradient-boosted tree models fitted on the same data, differing only in their random seed
    (each split chooses among a random part of the features), their raw scores averaged: one
    ensemble whose leaves are worth 1/B each, so the bundle and the consumer see one set of trees
    (``tree_arrays``). Why: on 525 labels one model's feature draws move the macro-F1 by a point or
    two; 3 models of 50 rounds at learning rate 0.3 (as many trees as one model of 150 rounds at
    0.1, so the consumer's cost is unchanged) scored ~1 point higher in object-grouped
    cross-validation over 10 seeds (docs/model.md)."""

    def __init__(self, members: list[HistGradientBoostingClassifier]) -> None:
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
        return np.mean([np.asarray(m.decision_function(x), np.float64) for m in self.members], axis=0)  # type: ignore[no-any-return]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(x), axis=1)  # type: ignore[no-any-return]


def tree_arrays(clf: HistGradientBoostingClassifier | TreeBag, n_classes: int | None = None) -> TreeArrays:
    """``n_classes``: the model's class count, when the training data lacked some classes
    (``clf.classes_`` holds the class indices it saw). A bag becomes one ensemble: every member's
    trees, each leaf divided by the bag's size, and the members' mean baseline."""
    members = clf.members if isinstance(clf, TreeBag) else [clf]
    seen = np.asarray(clf.classes_, dtype=np.int64)
    n_classes = len(seen) if n_classes is None else n_classes
    if len(seen) < 3:
        raise ValueError("binary classifiers keep one tree per iteration: not supported here")
    # [iteration][class] -> TreePredictor with a .nodes table, for every member
    predictors = [it for m in members for it in m._predictors]
    if any(bool(n["is_categorical"].any()) for it in predictors for p in it for n in [p.nodes]):
        raise ValueError("categorical splits are not supported")
    if any(not np.array_equal(m.classes_, seen) for m in members):
        raise ValueError("the bag's members saw different classes")
    tables = [(k, p.nodes) for it in predictors for k, p in enumerate(it)]
    m = max(len(nodes) for _, nodes in tables)
    t = len(tables)
    feature = np.zeros((t, m), np.int64)
    threshold = np.zeros((t, m), np.float32)
    left = np.zeros((t, m), np.int64)
    right = np.zeros((t, m), np.int64)
    missing_left = np.zeros((t, m), bool)
    is_leaf = np.ones((t, m), bool)
    value = np.zeros((t, m), np.float32)
    tree_class = np.zeros(t, np.int64)
    depth = 0
    for i, (k, nodes) in enumerate(tables):
        n = len(nodes)
        feature[i, :n] = nodes["feature_idx"]
        # float32 thresholds: the features reach the model as float32, and x <= t must decide
        # the same in both (np.float32 rounding of the threshold towards the data).
        threshold[i, :n] = _float32_threshold(nodes["num_threshold"])
        left[i, :n] = nodes["left"]
        right[i, :n] = nodes["right"]
        missing_left[i, :n] = nodes["missing_go_to_left"].astype(bool)
        is_leaf[i, :n] = nodes["is_leaf"].astype(bool)
        value[i, :n] = nodes["value"] / len(members)
        tree_class[i] = seen[k]
        depth = max(depth, int(nodes["depth"].max()))
    baseline = np.full(n_classes, ABSENT_CLASS_LOGIT, dtype=np.float32)
    baseline[seen] = np.mean([np.asarray(m._baseline_prediction, np.float64).reshape(-1) for m in members], axis=0)
    return TreeArrays(
        torch.from_numpy(feature), torch.from_numpy(threshold), torch.from_numpy(left), torch.from_numpy(right),
        torch.from_numpy(missing_left), torch.from_numpy(is_leaf), torch.from_numpy(value),
        torch.from_numpy(tree_class), torch.from_numpy(baseline), depth,
    )  # fmt: skip


def _float32_threshold(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= t (for float32 inputs x: x <= t  <=>  x <= that float32)."""
    f = t.astype(np.float32)
    over = f.astype(np.float64) > t
    f[over] = np.nextafter(f[over], np.float32(-np.inf))
    return f
