"""Earlier views of an alert (trainer/stages.py) and their scores in the cross-validation: a view
keeps what the sky and the alert itself say and takes away only what later detections told."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedGroupKFold

from alerts.alert import Alert, History
from alerts.allowlist import CANDIDATE_FIELDS, EPOCH_FIELDS, FORBIDDEN
from alerts.decoder import SchemaCache, decode_alerts
from alerts.features import FEATURE_NAMES, HISTORY_FEATURES, alert_features
from alerts.synthetic import make_alert
from config.trainer import HeadConfig
from trainer.classify import (
    ALWAYS_PRESENT,
    EXPORT_GATE_FEATURES,
    export_gate,
    fit_fused,
    history_gate,
    with_nulls,
)
from trainer.comparison import FUSED_ROW, GATED_ROW, REFERENCE_ROW, Labelled, cross_validate, rows, summarise
from trainer.stages import (
    ALERCE_STAMP_FIELDS,
    STAGES,
    earlier_view,
    earliest_detection_alert,
    exported_first_alert,
    first_detection_view,
)
from trainer.trees import GatedTrees, TreeBag

JD = 2_460_100.5


def alert_with_history(ndethist: float = 40.0) -> Alert:
    """Detections 1, 2, 4, 7 days before the alert (newest last in the packet, as ZTF orders them)
    and upper limits 3 and 10 days before."""
    (a,) = decode_alerts(make_alert(2_400_000_000_000_000_001).message, SchemaCache())
    c = a.candidate.copy()
    i = {n: k for k, n in enumerate(CANDIDATE_FIELDS)}
    c[i["jd"]], c[i["ndethist"]], c[i["jdstarthist"]] = JD, ndethist, JD - 400.0
    days = np.array([10.0, 7.0, 4.0, 3.0, 2.0, 1.0])
    mag = np.array([np.nan, 19.0, 18.8, np.nan, 18.6, 18.5])
    history = History(JD - days, np.array([1.0, 2, 1, 2, 1, 2]), mag, np.where(np.isnan(mag), np.nan, 0.1),
                      np.array([20.1, 20.2, 20.3, 20.4, 20.5, 20.6]), np.where(np.isnan(mag), -1, 1).astype(np.int8))  # fmt: skip
    return dataclasses.replace(a, candidate=c, history=history)


def test_first_detection_view_turns_earlier_detections_into_upper_limits() -> None:
    a = alert_with_history()
    v = earlier_view(a, 1)
    assert v.value("ndethist") == 1 and v.value("jdstarthist") == JD
    assert np.isnan(v.history.magpsf).all() and np.isnan(v.history.sigmapsf).all() and (v.history.positive == -1).all()
    # every epoch is still there, with its own limiting magnitude and band
    assert np.array_equal(v.history.jd, a.history.jd) and np.array_equal(v.history.diffmaglim, a.history.diffmaglim)
    assert np.array_equal(v.history.fid, a.history.fid)
    # the alert's own measurements, the sky around it and its stamps are untouched
    changed = {CANDIDATE_FIELDS[k] for k in np.flatnonzero(~np.isclose(v.candidate, a.candidate, equal_nan=True))}
    assert changed == {"ndethist", "jdstarthist"}
    assert (v.science, v.difference, v.candid, v.object_id) == (a.science, a.difference, a.candid, a.object_id)
    f, fv = alert_features(a), alert_features(v)
    assert f[FEATURE_NAMES.index("all_n_det")] == 5 and fv[FEATURE_NAMES.index("all_n_det")] == 1
    assert fv[FEATURE_NAMES.index("all_n_nondet")] == 6  # 2 upper limits + 4 former detections


def test_a_view_keeps_the_most_recent_detections() -> None:
    a = alert_with_history()
    v = earlier_view(a, 3)  # this alert and the two detections before it (1 and 2 days ago)
    assert v.value("ndethist") == 3 and v.value("jdstarthist") == JD - 2.0
    assert np.array_equal(~np.isnan(v.history.magpsf), [False, False, False, False, True, True])
    assert alert_features(v)[FEATURE_NAMES.index("all_n_det")] == 3


def test_an_object_with_no_more_detections_is_unchanged() -> None:
    a = alert_with_history(ndethist=3.0)
    assert earlier_view(a, 3) is a and earlier_view(a, 10) is a
    assert earlier_view(a, 2) is not a


def test_a_start_before_the_window_stays_where_it_was() -> None:
    """Four detections in the 30-day window, 40 in all: the 6th-detection view keeps all four and
    the first detection is still before the window."""
    a = alert_with_history()
    v = earlier_view(a, 6)
    assert v.value("ndethist") == 6 and v.value("jdstarthist") == JD - 400.0
    assert np.array_equal(v.history.magpsf, a.history.magpsf, equal_nan=True)
    with pytest.raises(ValueError):
        earlier_view(a, 0)


def _prv_entries(a: Alert) -> list[dict[str, object]]:
    """``prv_candidates`` entries matching ``alert_with_history``'s history, each detection with
    measurements of its own (fwhm grows with age), and label fields that must not be read."""
    h = a.history
    out: list[dict[str, object]] = []
    for k in range(len(h)):
        e: dict[str, object] = {"jd": float(h.jd[k]), "fid": int(h.fid[k]), "diffmaglim": float(h.diffmaglim[k]),
                                "rb": 0.01, "drb": 0.01, "ssdistnr": 1.0, "ssmagnr": 18.0, "ssnamenr": "1"}  # fmt: skip
        if not np.isnan(h.magpsf[k]):
            e |= {"magpsf": float(h.magpsf[k]), "sigmapsf": 0.1, "isdiffpos": "f", "fwhm": 2.0 + float(JD - h.jd[k]),
                  "elong": 1.5, "distnr": 0.4, "magnr": 17.0, "scorr": 9.0}  # fmt: skip
        out.append(e)
    return out


def test_first_detection_view_reads_the_earliest_detection_of_the_window() -> None:
    a = alert_with_history()
    v = first_detection_view(a, _prv_entries(a))
    one = earlier_view(a, 1)
    i = {n: k for k, n in enumerate(CANDIDATE_FIELDS)}
    # the earliest detection is 7 days before the alert, in band 2, at 19.0
    assert v.value("magpsf") == 19.0 and v.value("fwhm") == 9.0 and v.fid == 2 and v.isdiffpos == "f"
    assert v.value("distnr") == pytest.approx(0.4) and v.value("magnr") == 17.0
    # fields the entry lacks are missing, not the alert's
    assert np.isnan(v.value("chipsf")) and np.isnan(v.value("sumrat"))
    # time, position, PS1 neighbours, counts, stamps and the upper limits stay those of the plain view
    kept = [k for n, k in i.items() if n not in EPOCH_FIELDS]
    assert np.array_equal(v.candidate[kept], one.candidate[kept], equal_nan=True)
    assert v.history == one.history and (v.science, v.difference) == (a.science, a.difference)
    f = alert_features(v)
    assert f[FEATURE_NAMES.index("all_n_det")] == 1 and f[FEATURE_NAMES.index("all_n_nondet")] == 6
    # nothing the labels were made from is read: changing those fields changes nothing
    assert not set(EPOCH_FIELDS) & FORBIDDEN and set(EPOCH_FIELDS) <= set(CANDIDATE_FIELDS)
    entries = _prv_entries(a)
    for e in entries:
        e |= {"rb": 0.99, "drb": 0.99, "ssdistnr": -999.0, "ssmagnr": -999.0, "ssnamenr": "null"}
    assert np.array_equal(alert_features(first_detection_view(a, entries)), f, equal_nan=True)


def test_first_detection_view_falls_back_to_the_plain_view() -> None:
    a = alert_with_history()
    plain = earlier_view(a, 1)
    assert first_detection_view(a, None) == plain and first_detection_view(a, []) == plain
    assert first_detection_view(a, _prv_entries(a)[:-1]) == plain  # entries that are not the history's
    only_limits = dataclasses.replace(a, history=dataclasses.replace(a.history, magpsf=np.full(6, np.nan)))
    assert first_detection_view(only_limits, _prv_entries(a)) == earlier_view(only_limits, 1)
    seen_once = alert_with_history(ndethist=1.0)
    assert first_detection_view(seen_once, _prv_entries(seen_once)) is seen_once


def test_the_earliest_detection_as_an_alert_of_its_own_time() -> None:
    a = alert_with_history()
    e = earliest_detection_alert(a, _prv_entries(a))
    assert e is not None
    # 7 days before the alert, band 2, at 19.0, seen once: only the upper limit 10 days before is history
    assert e.jd == JD - 7.0 and e.value("magpsf") == 19.0 and e.value("fwhm") == 9.0 and e.fid == 2
    assert e.value("ndethist") == 1 and e.value("jdstarthist") == e.value("jdendhist") == JD - 7.0
    assert np.array_equal(e.history.jd, [JD - 10.0]) and np.isnan(e.history.magpsf).all()
    f = alert_features(e)
    assert f[FEATURE_NAMES.index("all_n_det")] == 1 and f[FEATURE_NAMES.index("all_n_nondet")] == 1
    assert f[FEATURE_NAMES.index("age_days")] == 0.0
    # the PS1 neighbours, position and stamps stay the alert's
    for name in ("sgscore1", "distpsnr1", "ra", "dec", "ncovhist"):
        assert e.value(name) == a.value(name) or (np.isnan(e.value(name)) and np.isnan(a.value(name)))
    assert (e.science, e.difference) == (a.science, a.difference)
    only_limits = dataclasses.replace(a, history=dataclasses.replace(a.history, magpsf=np.full(6, np.nan)))
    assert earliest_detection_alert(only_limits, _prv_entries(a)) is None and earliest_detection_alert(a, None) is None


def test_an_exported_first_alert_keeps_only_the_exported_fields_and_no_history() -> None:
    a = alert_with_history()
    e = exported_first_alert(a)
    assert len(e.history.jd) == 0 and e.value("ndethist") == 1
    for k, name in enumerate(CANDIDATE_FIELDS):
        if name in ALERCE_STAMP_FIELDS and name != "ndethist":
            assert e.candidate[k] == a.candidate[k] or (np.isnan(e.candidate[k]) and np.isnan(a.candidate[k])), name
        elif name != "ndethist":
            assert np.isnan(e.candidate[k]), name
    assert not FORBIDDEN & ALERCE_STAMP_FIELDS
    assert (e.science, e.difference, e.isdiffpos) == (a.science, a.difference, a.isdiffpos)
    # what the head's gates make of it: a first detection, and one the export trees score
    f = alert_features(e)[None]
    assert history_gate(HeadConfig()).rows(f).all() and export_gate().rows(f).all()
    measured = a.candidate.copy()  # a packet of ZTF's own carries these (the generated one does not)
    measured[[CANDIDATE_FIELDS.index(n) for n in EXPORT_GATE_FEATURES]] = (1.2, 3.4, 18.6)
    assert not export_gate().rows(alert_features(dataclasses.replace(a, candidate=measured))[None]).any()
    assert not set(EXPORT_GATE_FEATURES) & ALERCE_STAMP_FIELDS


def test_packets_rebuilt_from_an_export_get_trees_of_their_own() -> None:
    """A first alert null in the measurements every ZTF packet carries is scored by the export
    trees, fitted on the training alerts as exported first alerts. Here complete packets carry the
    class in a field the export drops (``elong``), exported ones in one it keeps (``fwhm``, noise
    in complete packets): only trees fitted on the exported views read it. Complete packets score
    the same with and without the export trees, and the bundle's head scores the exported ones as
    the fitted model does."""
    rng = np.random.default_rng(3)
    nd, hist, elong, fwhm = (FEATURE_NAMES.index(n) for n in ("ndethist", "all_n_det", "elong", "fwhm"))
    gate_columns = [FEATURE_NAMES.index(n) for n in EXPORT_GATE_FEATURES]
    kept = [i for i, n in enumerate(FEATURE_NAMES) if n in ALERCE_STAMP_FIELDS or n in HISTORY_FEATURES]

    def make(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(5), n // 5)
        f = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
        f[:, elong] += 3.0 * y
        f[:, nd], f[:, hist] = np.where(y >= 3, 1.0, 50.0), np.where(y >= 3, 1.0, 20.0)
        first = f.copy()
        first[:, nd], first[:, hist] = 1.0, 1.0
        exported = np.full_like(first, np.nan)
        exported[:, kept] = first[:, kept]
        exported[:, fwhm] += 3.0 * y
        return f, y, np.stack([first] + [f] * (len(STAGES) - 1)), np.stack([exported, np.full_like(first, np.nan)])

    features, y, stages, exported = make(500)
    groups = np.array([f"o{i}" for i in range(len(y))])
    z = rng.normal(0, 1, (len(y), 4))
    cfg = HeadConfig(max_iter=30, max_depth=3, inner_folds=3)
    fitted = {r: fit_fused(features, z, y, groups, 5, dataclasses.replace(cfg, export_rounds=r), seed=0, stages=stages,
                           exported=exported)
              for r in (0, 30)}  # fmt: skip
    _, y_test, test_stages, test_exported = make(500)
    z_test = rng.normal(0, 1, (len(y_test), 4))
    assert np.isnan(test_exported[0][:, gate_columns]).all()
    acc = {r: float((f.predict_proba(test_exported[0], z_test).argmax(1) == y_test).mean()) for r, f in fitted.items()}
    assert acc[30] > acc[0] + 0.3 and acc[30] > 0.8, acc
    np.testing.assert_array_equal(fitted[0].predict_proba(test_stages[0], z_test), fitted[30].predict_proba(test_stages[0], z_test))
    np.testing.assert_array_equal(fitted[0].predict_proba(features, z), fitted[30].predict_proba(features, z))
    with torch.no_grad():
        shipped = fitted[30].head()(torch.from_numpy(z_test).float(), torch.from_numpy(test_exported[0])).numpy()
    np.testing.assert_allclose(shipped, fitted[30].predict_proba(test_exported[0], z_test), atol=1e-4)


def _labelled(stages: np.ndarray | None, rng: np.random.Generator, n: int = 200) -> Labelled:
    y = np.repeat(np.arange(5), n // 5)
    features = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
    features[:, 0] += 3.0 * y  # one column carries the class
    return Labelled(features, rng.normal(0, 1, (n, 4)), y, np.array([f"o{i // 2}" for i in range(n)]),
                    ("AGN", "SN", "VS", "asteroid", "bogus"), stages=stages)  # fmt: skip


def test_views_are_scored_by_the_model_fitted_on_the_alerts_as_they_are() -> None:
    rng = np.random.default_rng(0)
    plain = _labelled(None, rng)
    blind = plain.features.copy()
    blind[:, 0] = 0.0  # a view that has lost the telling column
    stages = np.stack([plain.features] + [blind] * (len(STAGES) - 1))
    viewed = dataclasses.replace(plain, stages=stages)
    # one set of trees: with early_detections the views also train the early trees (the test below)
    cfg = HeadConfig(max_iter=20, max_depth=3, cv_seeds=1, cv_folds=2, inner_folds=2, early_detections=0)
    table = [r for r in rows(cfg, quick=True) if r[0] in (REFERENCE_ROW, FUSED_ROW)]
    without = cross_validate(plain, table, seeds=2, folds=3, show_progress=False)
    got = cross_validate(viewed, table, seeds=2, folds=3, show_progress=False)
    for name in (REFERENCE_ROW, FUSED_ROW):
        row = got["rows"][name]
        # the views do not enter training: the alerts' own scores are those of a run without views
        assert row["macro_f1"] == without["rows"][name]["macro_f1"]
        assert [s["detections"] for s in row["stages"]] == list(STAGES)
        assert row["stages"][0]["macro_f1"] == row["macro_f1"]  # a view equal to the alerts scores the same
        assert max(row["stages"][1]["macro_f1"]) < min(row["macro_f1"]) - 0.3  # the views are what is predicted
        assert "stages" not in without["rows"][name]
    summary = summarise(got, plain.class_names)
    assert [s["detections"] for s in summary["rows"][FUSED_ROW]["stages"]] == list(STAGES)


def test_the_fusion_can_be_fitted_on_the_views_too() -> None:
    """Views that lost the telling column, a z that carries the class: fitted on the alerts only,
    the correction trusts the trees and fails on the views; with ``fusion_views`` it learns to
    lean on z there. Without it, the views change nothing (the shipped default)."""
    rng = np.random.default_rng(1)
    d = _labelled(None, rng, n=300)
    z = d.z + np.eye(5)[d.y][:, :4] * 2.0  # four of the five classes show in z
    blind = d.features.copy()
    blind[:, 0] = 0.0
    stages = np.stack([blind] * len(STAGES))
    cfg = HeadConfig(max_iter=20, max_depth=3, inner_folds=3, early_detections=0)
    plain = fit_fused(d.features, z, d.y, d.groups, 5, cfg, seed=0)
    ignored = fit_fused(d.features, z, d.y, d.groups, 5, cfg, seed=0, stages=stages)
    assert np.array_equal(plain.w, ignored.w) and plain.temperature == ignored.temperature
    viewed = fit_fused(d.features, z, d.y, d.groups, 5, dataclasses.replace(cfg, fusion_views=1.0, fusion_offsets=True), seed=0, stages=stages)
    test = _labelled(None, np.random.default_rng(2), n=300)
    z_test = test.z + np.eye(5)[test.y][:, :4] * 2.0
    blind_test = test.features.copy()
    blind_test[:, 0] = 0.0
    acc = {name: (f.predict_proba(blind_test, z_test).argmax(1) == test.y).mean() for name, f in (("plain", plain), ("viewed", viewed))}
    assert acc["viewed"] > acc["plain"] + 0.1, acc
    # the alerts as they are stay well classified, at some cost (the trade-off of docs/model.md)
    assert (viewed.predict_proba(test.features, z_test).argmax(1) == test.y).mean() > 0.7


def test_first_detections_get_trees_of_their_own() -> None:
    """As in the labelled set: classes 3 and 4 (asteroid, bogus) are first detections (one
    detection in their history, ``ndethist`` 1 to 3: ZTF also counts sub-threshold detections),
    the others objects seen 50 times, and one weak column carries the class. The first-detection
    views of the others keep that column. One set of trees leans on "seen once" and calls most of
    those views 3 or 4; with ``early_detections`` the early trees, fitted on the real first
    detections and the views, read the weak column there, whatever the view's ``ndethist`` (a
    gate on ``ndethist`` sent views with 3 to the main trees; views fitted with ``ndethist`` 1
    taught the early trees that 2 and 3 mean asteroid or bogus). The head the bundle ships scores
    as the fitted model does."""
    rng = np.random.default_rng(3)
    nd, hist = FEATURE_NAMES.index("ndethist"), FEATURE_NAMES.index("all_n_det")

    def make(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(5), n // 5)
        f = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
        f[:, 0] += 1.5 * y
        f[:, nd] = np.where(y >= 3, rng.integers(1, 4, n), 50.0)
        f[:, hist] = np.where(y >= 3, 1.0, 20.0)
        first = f.copy()
        first[:, nd], first[:, hist] = np.where(y >= 3, f[:, nd], 1.0), 1.0
        return f, y, np.stack([first] + [f] * (len(STAGES) - 1))

    features, y, stages = make(400)
    groups = np.array([f"o{i}" for i in range(len(y))])
    z = rng.normal(0, 1, (len(y), 4))
    cfg = HeadConfig(max_iter=30, max_depth=3, inner_folds=3)
    one = fit_fused(features, z, y, groups, 5, dataclasses.replace(cfg, early_detections=0), seed=0, stages=stages)
    gated = fit_fused(features, z, y, groups, 5, cfg, seed=0, stages=stages)
    assert isinstance(gated.trees, GatedTrees) and isinstance(one.trees, TreeBag)
    test, y_test, test_stages = make(400)
    z_test = rng.normal(0, 1, (len(y_test), 4))
    views = test_stages[0]
    later = y_test < 3  # the views of objects seen 50 times
    sub_threshold = views.copy()  # the same first alerts after an earlier raw detection below the alert threshold
    sub_threshold[later, nd] = 3.0
    proba = {(name, seen): f.predict_proba(x, z_test) for name, f in (("one", one), ("gated", gated))
             for seen, x in (("1", views), ("3", sub_threshold))}  # fmt: skip
    acc = {k: float((p.argmax(1) == y_test)[later].mean()) for k, p in proba.items()}
    assert acc["gated", "1"] > acc["one", "1"] + 0.3, acc
    assert acc["gated", "3"] > acc["one", "3"] + 0.3, acc
    # the early trees do not read a view's ndethist as "not a view": the same calls at 1 and 3
    assert (proba["gated", "1"].argmax(1) == proba["gated", "3"].argmax(1))[later].mean() > 0.9
    assert (gated.predict_proba(test, z_test).argmax(1) == y_test).mean() > 0.6
    with torch.no_grad():
        shipped = gated.head()(torch.from_numpy(z_test).float(), torch.from_numpy(views)).numpy()
    np.testing.assert_allclose(shipped, gated.predict_proba(views, z_test), atol=1e-4)


def _two_kinds_of_first_detection(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Classes 3 and 4 seen once, the others 50 times; column 0 carries the class in the alerts
    and their first-detection views (the window's upper limits kept), column 1 in the earliest
    detections as alerts of their own time (no upper limits; NaN rows for the objects seen once)."""
    nd, hist, nondet = (FEATURE_NAMES.index(n) for n in ("ndethist", "all_n_det", "all_n_nondet"))
    y = np.repeat(np.arange(5), n // 5)
    f = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
    f[:, 0] += 2.0 * y
    f[:, nd], f[:, hist], f[:, nondet] = np.where(y >= 3, 1.0, 50.0), np.where(y >= 3, 1.0, 20.0), 10.0
    first = f.copy()
    first[:, nd], first[:, hist] = 1.0, 1.0
    earliest = rng.normal(0, 1, f.shape).astype(np.float32)
    earliest[:, 1] += 2.0 * y
    earliest[:, nd], earliest[:, hist], earliest[:, nondet] = 1.0, 1.0, 0.0
    earliest[y >= 3] = np.nan  # seen once: no earlier detection in the window
    return f, y, np.stack([first] + [f] * (len(STAGES) - 1)), earliest


def test_the_early_trees_also_learn_from_the_earliest_detection_as_an_alert() -> None:
    """The first-detection views (the window's upper limits kept) carry the class in one column,
    the earliest detections as alerts of their own time (no upper limits) in another: early trees
    fitted without the latter call those at chance, fitted with them they read the second column
    where a first alert carries no history."""
    rng = np.random.default_rng(5)
    features, y, stages, earliest = _two_kinds_of_first_detection(rng, 400)
    groups = np.array([f"o{i}" for i in range(len(y))])
    z = rng.normal(0, 1, (len(y), 4))
    cfg = HeadConfig(max_iter=30, max_depth=3, inner_folds=3)
    without = fit_fused(features, z, y, groups, 5, cfg, seed=0, stages=stages)
    with_earliest = fit_fused(features, z, y, groups, 5, cfg, seed=0, stages=stages, earliest=earliest)
    _, y_test, test_stages, test_earliest = _two_kinds_of_first_detection(rng, 400)
    later = y_test < 3
    z_test = rng.normal(0, 1, (len(y_test), 4))
    acc = {name: float((f.predict_proba(test_earliest[later], z_test[later]).argmax(1) == y_test[later]).mean())
           for name, f in (("without", without), ("with", with_earliest))}  # fmt: skip
    assert acc["with"] > acc["without"] + 0.3 and acc["with"] > 0.65, acc
    # the views with the window's upper limits are still read as before
    views = {name: float((f.predict_proba(test_stages[0][later], z_test[later]).argmax(1) == y_test[later]).mean())
             for name, f in (("without", without), ("with", with_earliest))}  # fmt: skip
    assert views["without"] > 0.7 and views["with"] > views["without"] - 0.1, views


def test_the_table_scores_the_recipe_the_bundle_ships() -> None:
    """The cross-validation's fused row fits what ``train_head`` fits, the earliest detections as
    alerts of their own time included (until 20261127d's run ``with_views`` dropped them, and the
    table's fused row was a different model from the shipped one); the fused model's own trees are
    a row of their own, scored on the views: at the first detection they are the early trees, well
    above the reference trees."""
    rng = np.random.default_rng(7)
    n = 200
    f, y, stages, earliest = _two_kinds_of_first_detection(rng, n)
    d = Labelled(f, rng.normal(0, 1, (n, 3)), y, np.array([f"o{i}" for i in range(n)]),
                 ("AGN", "SN", "VS", "asteroid", "bogus"), stages=stages, earliest=earliest)  # fmt: skip
    cfg = HeadConfig(max_iter=15, max_depth=3, inner_folds=2, min_samples_leaf=5)
    table = [r for r in rows(cfg, with_sequences=False) if r[0] in (REFERENCE_ROW, GATED_ROW, FUSED_ROW)]
    got = cross_validate(d, table, seeds=1, folds=2, show_progress=False)
    want, blind = np.zeros((n, 5)), np.zeros((n, 5))
    for tr, te in StratifiedGroupKFold(2, shuffle=True, random_state=0).split(f, y, d.groups):
        for out, e in ((want, earliest[tr]), (blind, None)):
            fitted = fit_fused(f[tr], d.z[tr], y[tr], d.groups[tr], 5, cfg, 0, stages[:, tr], e)
            out[te] = fitted.predict_proba(f[te], d.z[te])
    np.testing.assert_allclose(got["rows"][FUSED_ROW]["oof_probabilities_seed0"], want, atol=1e-6)
    assert np.abs(want - blind).max() > 1e-3  # the earliest detections do change the fit
    first_detection = {name: got["rows"][name]["stages"][0]["macro_f1"][0] for name in (REFERENCE_ROW, GATED_ROW)}
    assert first_detection[GATED_ROW] > first_detection[REFERENCE_ROW] + 0.2, first_detection


def test_an_alert_without_a_history_of_a_known_object_goes_to_the_main_trees() -> None:
    """The gate on the features of real decoded alerts: no earlier detection in the 30-day
    history picks the early trees, unless the alert carries no history at all (no upper limit
    either: an archival copy, a field's first visit of a season) and ``ndethist`` is above
    ``known_object_ndethist`` and ``elong`` has a value (a packet rebuilt without its shape
    measures has nulls only the early trees learnt); with ``null`` the history alone decides. The
    fitted head carries that gate."""
    base = alert_with_history()
    limits_only = History(*(col[[0, 3]] for col in dataclasses.astuple(base.history)))
    nd, el = ({n: k for k, n in enumerate(CANDIDATE_FIELDS)}[f] for f in ("ndethist", "elong"))

    def features(history: History, ndethist: float, elong: float = 1.1) -> np.ndarray:
        c = base.candidate.copy()
        c[nd], c[el] = ndethist, elong
        return alert_features(dataclasses.replace(base, candidate=c, history=history))[None]

    cfg = HeadConfig()
    assert cfg.known_object_ndethist == 100
    cases = {  # (history, ndethist) -> early trees?
        (None, 500.0): False, (None, 100.0): True, (None, np.nan): True, ("limits", 500.0): True,
        ("detections", 5.0): False, ("detections", 1.0): False,
    }  # fmt: skip
    histories = {None: History.empty(), "limits": limits_only, "detections": base.history}
    for (h, ndethist), early in cases.items():
        assert bool(history_gate(cfg).rows(features(histories[h], ndethist))[0]) is early, (h, ndethist)
    assert history_gate(cfg).rows(features(History.empty(), 500.0, elong=np.nan))[0]  # no shape measure: early
    assert not history_gate(cfg).rows(features(base.history, 500.0, elong=np.nan))[0]  # a history decides alone
    assert history_gate(dataclasses.replace(cfg, known_object_ndethist=None)).rows(features(History.empty(), 500.0))[0]
    rng = np.random.default_rng(0)
    f = rng.normal(0, 1, (100, len(FEATURE_NAMES))).astype(np.float32)
    f[:, FEATURE_NAMES.index("all_n_det")] = np.repeat([1.0, 5.0], 50)
    y = np.tile(np.arange(5), 20)
    fitted = fit_fused(f, rng.normal(0, 1, (100, 3)), y, np.arange(100).astype(str), 5,
                       HeadConfig(max_iter=5, inner_folds=2, min_samples_leaf=2), seed=0, stages=np.stack([f] * len(STAGES)))  # fmt: skip
    assert isinstance(fitted.trees, GatedTrees) and fitted.trees.gate == history_gate(cfg)


def test_a_null_where_training_had_none_reaches_a_leaf_learnt_for_it() -> None:
    """A packet re-serialised elsewhere may null fields that ZTF's own packets always fill. Here
    ``elong`` carries the class strongly and ``magpsf`` weakly, and one class makes most of the
    training alerts (as asteroids make most of the real first detections). Early trees that never
    saw a null ``elong`` send it to the child with more training alerts, that class's side, and
    call every such first alert that class; with the masked copy (``early_nulls``) they fall back
    on ``magpsf``. The main trees are the same either way, and the bundle's head scores the nulls
    as the fitted model does."""
    rng = np.random.default_rng(7)
    nd, hist, elong = (FEATURE_NAMES.index(n) for n in ("ndethist", "all_n_det", "elong"))

    def make(n: int, share: list[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(5), n // 5) if share is None else np.sort(rng.choice(5, n, p=share))
        f = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
        f[:, elong] += 3.0 * y
        f[:, 0] += 1.5 * y
        f[:, nd], f[:, hist] = np.where(y >= 3, 1.0, 50.0), np.where(y >= 3, 1.0, 20.0)
        first = f.copy()
        first[:, nd], first[:, hist] = 1.0, 1.0
        return f, y, np.stack([first] + [f] * (len(STAGES) - 1))

    features, y, stages = make(500, [0.1, 0.1, 0.1, 0.1, 0.6])
    groups = np.array([f"o{i}" for i in range(len(y))])
    z = rng.normal(0, 1, (len(y), 4))
    cfg = HeadConfig(max_iter=30, max_depth=3, inner_folds=3)
    fitted = {p: fit_fused(features, z, y, groups, 5, dataclasses.replace(cfg, early_nulls=p), seed=0, stages=stages)
              for p in (0.0, 0.3)}  # fmt: skip
    _, y_test, test_stages = make(500)
    first = test_stages[0].copy()
    first[:, elong] = np.nan
    z_test = rng.normal(0, 1, (len(y_test), 4))
    acc = {p: float((f.predict_proba(first, z_test).argmax(1) == y_test).mean()) for p, f in fitted.items()}
    assert acc[0.3] > acc[0.0] + 0.2 and acc[0.3] > 0.5, acc
    # complete first alerts are still read by elong
    complete = {p: float((f.predict_proba(test_stages[0], z_test).argmax(1) == y_test).mean()) for p, f in fitted.items()}
    assert complete[0.3] > 0.85 and complete[0.0] > 0.85, complete
    trees = {p: f.trees for p, f in fitted.items()}
    assert all(isinstance(t, GatedTrees) for t in trees.values())
    main = [t.main.decision_function(features) for t in trees.values() if isinstance(t, GatedTrees)]
    np.testing.assert_array_equal(main[0], main[1])
    with torch.no_grad():
        shipped = fitted[0.3].head()(torch.from_numpy(z_test).float(), torch.from_numpy(first)).numpy()
    np.testing.assert_allclose(shipped, fitted[0.3].predict_proba(first, z_test), atol=1e-4)


def test_the_masked_copy_keeps_what_every_packet_carries_and_the_history() -> None:
    """``with_nulls`` nulls only candidate fields a packet may lack: the band, the magnitude and
    its error, the sign and the position stay, and so does the history, which the gate reads."""
    x = np.random.default_rng(0).normal(0, 1, (300, len(FEATURE_NAMES))).astype(np.float32)
    masked = with_nulls(x, 0.5, np.random.default_rng(1))
    kept = [FEATURE_NAMES.index(n) for n in (*ALWAYS_PRESENT, *HISTORY_FEATURES)]
    np.testing.assert_array_equal(masked[:, kept], x[:, kept])
    others = np.setdiff1d(np.arange(len(FEATURE_NAMES)), kept)
    assert 0.45 < np.isnan(masked[:, others]).mean() < 0.55
    assert not np.isnan(x).any()  # a copy: the training alerts stay as they are
