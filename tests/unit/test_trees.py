"""The tree ensemble in torch equals scikit-learn's predict_proba (NaNs, float32 inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.ensemble import HistGradientBoostingClassifier

from model.trees import TreeEnsemble
from trainer.trees import TreeBag, tree_arrays


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([3, 5]), st.floats(0.0, 0.3))
def test_tree_ensemble_equals_sklearn(seed: int, n_classes: int, nan_rate: float) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 7)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int) + (n_classes == 5) * (x[:, 2] > 1).astype(int) * 2
    y = np.minimum(y, n_classes - 1)
    y[: n_classes] = np.arange(n_classes)
    x[rng.random(x.shape) < nan_rate] = np.nan
    clf = HistGradientBoostingClassifier(max_iter=30, max_depth=5, random_state=seed).fit(x, y)
    trees = TreeEnsemble.from_arrays(tree_arrays(clf))
    test = rng.normal(size=(300, 7)).astype(np.float32)
    test[rng.random(test.shape) < nan_rate + 0.05] = np.nan
    test[:20] = x[:20]  # values exactly at thresholds
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(test)), 1).numpy()  # the compiled CPU loop
        tensors = torch.softmax(trees.forward_tensors(torch.from_numpy(test)), 1).numpy()  # the GPU form
    np.testing.assert_allclose(ours, clf.predict_proba(test), atol=1e-5)
    np.testing.assert_allclose(tensors, clf.predict_proba(test), atol=1e-5)


def test_binary_is_refused() -> None:
    x = np.random.default_rng(0).normal(size=(50, 2))
    clf = HistGradientBoostingClassifier(max_iter=3).fit(x, (x[:, 0] > 0).astype(int))
    with pytest.raises(ValueError):
        tree_arrays(clf)


def test_bag_is_one_ensemble_equal_to_its_mean_raw_score() -> None:
    """A bag of three models becomes one set of trees (leaves / 3, mean baseline) whose softmax is
    the bag's predict_proba, on the compiled loop and the GPU form alike; and it differs from
    each member (else averaging would be a no-op and this test could not fail)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    y = np.digitize(x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=500), [-0.8, 0.0, 0.8])
    x[rng.random(x.shape) < 0.1] = np.nan
    members = [HistGradientBoostingClassifier(max_iter=20, max_depth=4, max_features=0.5, random_state=s) for s in range(3)]
    bag = TreeBag(members).fit(x, y)
    trees = TreeEnsemble.from_arrays(tree_arrays(bag))
    test = rng.normal(size=(300, 6)).astype(np.float32)
    test[rng.random(test.shape) < 0.1] = np.nan
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(test)), 1).numpy()
        tensors = torch.softmax(trees.forward_tensors(torch.from_numpy(test)), 1).numpy()
    want = bag.predict_proba(test)
    np.testing.assert_allclose(ours, want, atol=1e-5)
    np.testing.assert_allclose(tensors, want, atol=1e-5)
    assert min(np.abs(m.predict_proba(test) - want).max() for m in members) > 1e-3


def test_bag_of_one_is_the_model() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = np.digitize(x[:, 0], [-0.5, 0.5])
    bag = TreeBag([HistGradientBoostingClassifier(max_iter=10, random_state=0)]).fit(x, y)
    lone = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(x, y)
    np.testing.assert_allclose(bag.predict_proba(x), lone.predict_proba(x), atol=1e-12)
