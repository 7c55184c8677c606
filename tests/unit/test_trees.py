"""The tree ensemble in torch equals LightGBM's predict_proba (NaNs, float32 inputs), except for a
NaN where training had none, which goes to the child with more training alerts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightgbm import LGBMClassifier

from model.trees import TreeEnsemble
from trainer.trees import Gate, GatedTrees, NullGate, TreeBag, tree_arrays


def _lgbm(seed: int, **kw: object) -> LGBMClassifier:
    args: dict[str, object] = dict(n_estimators=30, num_leaves=15, max_depth=5, min_child_samples=5, subsample=0.8,
                                   subsample_freq=1, colsample_bytree=0.7, random_state=seed, n_jobs=1, verbose=-1)  # fmt: skip
    return LGBMClassifier(**(args | kw))


def _walk(clf: LGBMClassifier, x: np.ndarray) -> np.ndarray:
    """The reference the tables are held to: LightGBM's own dump, walked node by node for each row
    (no breadth-first tables, no compiled loop). A NaN goes the ``default_left`` way where the
    feature had NaNs in training (``missing_type`` "NaN"), else to the child with more training
    alerts, left on a tie (trainer/trees.py ``_flatten`` says why)."""
    dump = clf.booster_.dump_model()
    k = dump["num_tree_per_iteration"]
    raw = np.zeros((len(x), k))

    def count(n: dict) -> int:  # type: ignore[type-arg]
        return int(n["leaf_count"] if "leaf_value" in n else n["internal_count"])

    for i, tree in enumerate(dump["tree_info"]):
        for r, row in enumerate(x):
            n = tree["tree_structure"]
            while "leaf_value" not in n:
                v = float(row[n["split_feature"]])
                if not np.isnan(v):
                    go_left = v <= n["threshold"]
                elif n["missing_type"] == "NaN":
                    go_left = bool(n["default_left"])
                else:
                    go_left = count(n["left_child"]) >= count(n["right_child"])
                n = n["left_child"] if go_left else n["right_child"]
            raw[r, i % k] += n["leaf_value"]
    e = np.exp(raw - raw.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([3, 5]), st.floats(0.0, 0.3))
def test_tree_ensemble_equals_lightgbm(seed: int, n_classes: int, nan_rate: float) -> None:
    """Equal to LightGBM's predict_proba wherever LightGBM learnt where a NaN goes (every NaN of
    the row in a feature that had NaNs in training), and to the dump walked node by node on every
    row, also where a feature had no NaN in training and the test has NaN there (column 6 is never
    NaN in training; nor is any column when nan_rate is 0). The CPU loop, its GPU form and the
    ``TreeBag`` the cross-validation scores with all agree."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 7)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int) + (n_classes == 5) * (x[:, 2] > 1).astype(int) * 2
    y = np.minimum(y, n_classes - 1) + (x[:, 6] > 1.5)
    y = np.minimum(y, n_classes - 1)
    y[:n_classes] = np.arange(n_classes)
    x[:, :6][rng.random((400, 6)) < nan_rate] = np.nan
    bag = TreeBag([_lgbm(seed)]).fit(x, y)  # what the cross-validation scores with
    clf = bag.members[0]
    trees = TreeEnsemble.from_arrays(tree_arrays(clf))
    test = rng.normal(size=(300, 7)).astype(np.float32)
    test[rng.random(test.shape) < nan_rate + 0.05] = np.nan
    test[:20] = x[:20]  # values exactly at thresholds
    test[20:40, 6] = np.nan  # never NaN in training
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(test)), 1).numpy()  # the compiled CPU loop
        tensors = torch.softmax(trees.forward_tensors(torch.from_numpy(test)), 1).numpy()  # the GPU form
    walked = _walk(clf, test)
    np.testing.assert_allclose(ours, walked, atol=1e-5)
    np.testing.assert_allclose(tensors, walked, atol=1e-5)
    np.testing.assert_allclose(bag.predict_proba(test), walked, atol=1e-5)
    learnt = ~(np.isnan(test) & ~np.isnan(x).any(0)).any(1)  # rows whose NaNs LightGBM has a rule for
    assert learnt.sum() > 100 and (~learnt).sum() >= 20
    np.testing.assert_allclose(ours[learnt], clf.predict_proba(test[learnt]), atol=1e-5)


def test_nan_where_training_had_none_goes_to_the_child_with_more_alerts() -> None:
    """A split on a feature without NaN in training sends NaN to the child that more training
    alerts reached, not where 0 goes (LightGBM's predict). Built so that the two disagree: every
    value is below 0, so 0 goes with the few alerts above the last split (class 2) and NaN with the
    85 % below the first (class 0). Fails with LightGBM's rule (missing_left = 0 <= threshold)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-3.0, -1.0, size=(600, 1)).astype(np.float32)  # never NaN, all below 0
    y = np.digitize(x[:, 0], [-1.3, -1.15])
    clf = _lgbm(0, subsample=1.0, colsample_bytree=1.0).fit(x, y)
    trees = TreeEnsemble.from_arrays(tree_arrays(clf))
    probe = np.array([[np.nan], [0.0], [-2.9]], np.float32)
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(probe)), 1).numpy()
    np.testing.assert_allclose(ours[1:], clf.predict_proba(probe[1:]), atol=1e-5)
    np.testing.assert_allclose(ours, _walk(clf, probe), atol=1e-5)
    assert ours[0].argmax() == 0 and ours[1].argmax() == 2 and ours[2].argmax() == 0
    assert clf.predict_proba(probe[:1])[0].argmax() == 2  # LightGBM's own reading: NaN as 0


def test_binary_is_refused() -> None:
    x = np.random.default_rng(0).normal(size=(50, 2))
    clf = _lgbm(0, n_estimators=3).fit(x, (x[:, 0] > 0).astype(int))
    with pytest.raises(ValueError):
        tree_arrays(clf)


def test_bag_is_one_ensemble_equal_to_its_mean_raw_score() -> None:
    """A bag of three models becomes one set of trees (leaves / 3) whose softmax is the bag's
    predict_proba, on the compiled loop and the GPU form alike; and it differs from each member
    (else averaging would be a no-op and this test could not fail)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    y = np.digitize(x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=500), [-0.8, 0.0, 0.8])
    x[rng.random(x.shape) < 0.1] = np.nan
    members = [_lgbm(s, n_estimators=20, max_depth=4, colsample_bytree=0.5) for s in range(3)]
    bag = TreeBag(members).fit(x, y)
    trees = TreeEnsemble.from_arrays(tree_arrays(bag))
    test = rng.normal(size=(300, 6)).astype(np.float32)
    test[rng.random(test.shape) < 0.1] = np.nan
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(test)), 1).numpy()
        tensors = torch.softmax(trees.forward_tensors(torch.from_numpy(test)), 1).numpy()
    raw = np.mean([m.predict(test, raw_score=True) for m in members], axis=0)  # every column had NaNs in training
    want = np.exp(raw) / np.exp(raw).sum(1, keepdims=True)
    np.testing.assert_allclose(ours, want, atol=1e-5)
    np.testing.assert_allclose(tensors, want, atol=1e-5)
    np.testing.assert_allclose(bag.predict_proba(test), want, atol=1e-5)
    assert min(np.abs(m.predict_proba(test) - want).max() for m in members) > 1e-3


def test_bag_of_one_is_the_model() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = np.digitize(x[:, 0], [-0.5, 0.5])
    bag = TreeBag([_lgbm(0, n_estimators=10)]).fit(x, y)
    lone = _lgbm(0, n_estimators=10).fit(x, y)
    np.testing.assert_allclose(bag.predict_proba(x), lone.predict_proba(x), atol=1e-5)  # float32 tables


def _scores_as_it_does(gated: GatedTrees, trees: TreeEnsemble, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's probabilities, by its compiled loop and by its tensor gathers, equal the
    ``GatedTrees``' own -> (theirs, the loop's)."""
    expected = gated.predict_proba(test)
    with torch.no_grad():
        ours = torch.softmax(trees(torch.from_numpy(test)), 1).numpy()
        tensors = torch.softmax(trees.forward_tensors(torch.from_numpy(test)), 1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(tensors, expected, atol=1e-5)
    return expected, ours


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([0, 1, 2]))
def test_gated_trees_become_one_ensemble_that_scores_as_they_do(seed: int, early_lacks_a_class: bool, exception: int) -> None:
    """``tree_arrays`` of a GatedTrees (the gate's splits above every root) equals its
    ``decision_function``: the early trees where the gate's column is <= its value, the main trees
    elsewhere and where that column is NaN; with the gate's exception, the main trees also where
    the empty column is 0 (or NaN) and the count above its maximum (NaN: not above), and (the
    exception's second form) the present column has a value; also when the early trees never saw
    a class (their baseline then differs from the main trees')."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(500, 7)).astype(np.float32)
    x[:, 4] = rng.integers(1, 6, size=500)  # the gate's column: a count, as all_n_det
    x[:, 5] = rng.integers(0, 3, size=500)  # the empty column: as all_n_nondet, 0 for a third
    x[:, 6] = rng.choice([1, 3, 50, 500], size=500)  # the count: as ndethist
    y = np.digitize(x[:, 0] + (x[:, 4] <= 1) * x[:, 1], [-0.8, 0.0, 0.8])
    x[:, :4][rng.random((500, 4)) < 0.1] = np.nan
    gate = Gate(4, 1.5, 5, 6, 100.5, present_column=3 if exception == 2 else None) if exception else Gate(4, 1.5)
    few = gate.rows(x)
    main = TreeBag([_lgbm(seed)]).fit(x, y)
    early_y = np.where(y[few] == 3, 2, y[few]) if early_lacks_a_class else y[few]
    early = TreeBag([_lgbm(seed + 1), _lgbm(seed + 2)]).fit(x[few], early_y)
    gated = GatedTrees(main, early, gate, n_classes=4)
    trees = TreeEnsemble.from_arrays(tree_arrays(gated))
    test = rng.normal(size=(600, 7)).astype(np.float32)
    test[:, 4] = rng.integers(0, 4, size=600)
    test[:, 5] = rng.integers(0, 3, size=600)
    test[:, 6] = rng.choice([1, 100, 101, 500], size=600)
    test[rng.random(test.shape) < 0.1] = np.nan  # the gate's columns too
    expected, ours = _scores_as_it_does(gated, trees, test)
    rows = gated.gate.rows(test)
    assert rows.any() and (~rows).any() and not rows[np.isnan(test[:, 4])].any()
    known = (test[:, 4] <= 1) & ~(test[:, 5] > 0) & (test[:, 6] > 100)  # no history, ndethist > 100
    shape = ~np.isnan(test[:, 3])  # the present column has a value
    assert known.any() and rows[known & shape].any() != bool(exception)
    assert rows[known & ~shape].all() == (exception != 1)  # no value there: early, unless the plain exception
    assert rows[(test[:, 4] <= 1) & ~(test[:, 5] > 0) & ~(test[:, 6] > 100)].all()  # NaN or <= 100: early
    np.testing.assert_allclose(expected[rows], early_only := _softmax_full(early, test[rows], 4), atol=1e-6)
    np.testing.assert_allclose(expected[~rows], _softmax_full(main, test[~rows], 4), atol=1e-6)
    assert not np.allclose(early_only, _softmax_full(main, test[rows], 4), atol=1e-3)  # the gate matters
    if early_lacks_a_class:
        assert ours[rows, 3].max() < 1e-6


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_a_null_gate_nested_in_the_early_side_becomes_one_ensemble_that_scores_as_it_does(seed: int, export_lacks_a_class: bool) -> None:
    """The head's three sets of trees (trainer/classify.py ``fit_trees``): a ``NullGate`` inside the
    early side of a ``Gate``. The tables score a row by the export trees where the outer gate picks
    it and every column of the null gate is NaN, by the early trees where only the outer gate picks
    it, by the main trees elsewhere, as the nested ``GatedTrees`` do; also when the export trees
    never saw a class (one more baseline difference)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, 7)).astype(np.float32)
    x[:, 4] = rng.integers(1, 4, size=600)  # the outer gate's column, as all_n_det
    y = np.digitize(x[:, 0] + x[:, 1], [-0.8, 0.0, 0.8])
    null = NullGate((2, 3))
    outer = Gate(4, 1.5)
    few = outer.rows(x)
    sparse = x[few].copy()
    sparse[:, [2, 3]] = np.nan  # what the export trees are fitted on: the gate's columns null
    sparse_y = np.where(y[few] == 3, 2, y[few]) if export_lacks_a_class else y[few]
    main = TreeBag([_lgbm(seed)]).fit(x, y)
    early = TreeBag([_lgbm(seed + 1)]).fit(x[few], y[few])
    export = TreeBag([_lgbm(seed + 2, n_estimators=10)]).fit(sparse, sparse_y)
    gated = GatedTrees(main, GatedTrees(early, export, null, n_classes=4), outer, n_classes=4)
    trees = TreeEnsemble.from_arrays(tree_arrays(gated))
    test = rng.normal(size=(900, 7)).astype(np.float32)
    test[:, 4] = rng.integers(0, 4, size=900)
    kind = rng.integers(0, 3, size=900)  # 0: both null, 1: one of the two null, 2: both present
    test[kind == 0, 2:4] = np.nan
    test[kind == 1, 2 + rng.integers(0, 2, size=int((kind == 1).sum()))] = np.nan
    expected, ours = _scores_as_it_does(gated, trees, test)
    picked, empty = outer.rows(test), null.rows(test)
    assert np.array_equal(empty, kind == 0)
    for sel, bag in ((picked & empty, export), (picked & ~empty, early), (~picked, main)):
        assert sel.any()
        np.testing.assert_allclose(expected[sel], _softmax_full(bag, test[sel], 4), atol=1e-6)
    assert not np.allclose(expected[picked & empty], _softmax_full(early, test[picked & empty], 4), atol=1e-3)
    if export_lacks_a_class:
        assert ours[picked & empty, 3].max() < 1e-6


def test_a_null_gate_needs_a_column() -> None:
    with pytest.raises(ValueError, match="at least one column"):
        NullGate(())


def test_a_gate_exception_needs_all_three_fields() -> None:
    with pytest.raises(ValueError, match="together"):
        Gate(4, 1.5, 5, None, 100.5)
    with pytest.raises(ValueError, match="needs count_column"):
        Gate(4, 1.5, present_column=3)


def _softmax_full(bag: TreeBag, x: np.ndarray, n_classes: int) -> np.ndarray:
    raw = np.full((len(x), n_classes), -30.0)
    raw[:, bag.classes_] = bag.decision_function(x)
    e = np.exp(raw - raw.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)  # type: ignore[no-any-return]
