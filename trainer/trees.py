"""scikit-learn's HistGradientBoostingClassifier -> ``model.trees.TreeArrays`` (tensors the
consumer evaluates in torch). Reads the fitted estimator's tree tables (``_predictors``, a private
but long-stable attribute); ``tests/unit/test_trees.py`` holds the result to ``predict_proba``, so
a change in scikit-learn fails loudly instead of silently changing the predictions."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from model.trees import TreeArrays

ABSENT_CLASS_LOGIT = -30.0  # a class the trees never saw in training: probability ~0


def tree_arrays(clf: HistGradientBoostingClassifier, n_classes: int | None = None) -> TreeArrays:
    """``n_classes``: the model's class count, when the training data lacked some classes
    (``clf.classes_`` holds the class indices it saw)."""
    predictors = clf._predictors  # [iteration][class] -> TreePredictor with a .nodes table
    seen = np.asarray(clf.classes_, dtype=np.int64)
    n_classes = len(seen) if n_classes is None else n_classes
    if len(seen) < 3:
        raise ValueError("binary classifiers keep one tree per iteration: not supported here")
    if any(bool(n["is_categorical"].any()) for it in predictors for p in it for n in [p.nodes]):
        raise ValueError("categorical splits are not supported")
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
        value[i, :n] = nodes["value"]
        tree_class[i] = seen[k]
        depth = max(depth, int(nodes["depth"].max()))
    baseline = np.full(n_classes, ABSENT_CLASS_LOGIT, dtype=np.float32)
    baseline[seen] = np.asarray(clf._baseline_prediction, dtype=np.float32).reshape(-1)
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
