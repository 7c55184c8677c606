"""alert -> features: missing values on purpose, the history cleaning, the allowlist, and the same
features from both decoding paths on every alert."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from alerts.alert import Alert, History
from alerts.allowlist import CANDIDATE_FIELDS, FORBIDDEN
from alerts.decoder import SchemaCache, decode_alert
from alerts.features import (
    FEATURE_NAMES,
    HISTORY_FEATURES,
    HISTORY_WINDOW_DAYS,
    METADATA_FEATURES,
    POSITION_FEATURES,
    SEQUENCE_CHANNELS,
    alert_features,
    as_float32_features,
    ecliptic_latitude,
    galactic_latitude,
    history_features,
    history_sequence,
)
from alerts.synthetic import make_alert

H = {n: i for i, n in enumerate(HISTORY_FEATURES)}
F = {n: i for i, n in enumerate(FEATURE_NAMES)}


def _alert(history: History, mag: float = 18.0, fid: int = 1) -> Alert:
    a = decode_alert(make_alert(2_400_000_000_000_000_900, n_prv=0).message, SchemaCache())
    cand = a.candidate.copy()
    cand[CANDIDATE_FIELDS.index("magpsf")] = mag
    cand[CANDIDATE_FIELDS.index("fid")] = fid
    return dataclasses.replace(a, candidate=cand, history=history)


def _history(rows: list[tuple[float, int, float, float]]) -> History:
    """(days before the alert, fid, magpsf or NaN, diffmaglim)."""
    a = decode_alert(make_alert(2_400_000_000_000_000_900, n_prv=0).message, SchemaCache())
    if not rows:
        return History.empty()
    arr = np.array(rows, dtype=np.float64)
    return History(a.jd - arr[:, 0], arr[:, 1], arr[:, 2], np.full(len(arr), 0.1), arr[:, 3], np.ones(len(arr), np.int8))


def test_names_are_unique_and_no_feature_reads_a_label_field() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == len(METADATA_FEATURES) + len(HISTORY_FEATURES)
    assert not {n for n in FEATURE_NAMES if any(f in n for f in FORBIDDEN)}
    assert set(POSITION_FEATURES) <= set(FEATURE_NAMES)


def test_first_detection_has_counts_and_nan_statistics() -> None:
    f = history_features(_alert(History.empty()))
    assert f[H["g_n_det"]] == 1 and f[H["g_n_nondet"]] == 0 and f[H["r_n_det"]] == 0
    for name in ("g_slope", "g_dmag_prev", "g_dt_last_nondet", "r_mean", "all_dt_last_det", "all_g_minus_r"):
        assert np.isnan(f[H[name]]), name
    assert f[H["g_amplitude"]] == 0 and f[H["all_dt_first_det"]] == 0


def test_history_statistics() -> None:
    hist = _history([(10, 1, 19.0, 20.5), (5, 1, 18.5, 20.5), (3, 1, np.nan, 19.0), (4, 2, 18.2, 20.0)])
    f = history_features(_alert(hist, mag=18.0, fid=1))
    assert f[H["g_n_det"]] == 3 and f[H["g_n_nondet"]] == 1 and f[H["r_n_det"]] == 1
    assert f[H["g_amplitude"]] == pytest.approx(1.0) and f[H["g_last_minus_first"]] == pytest.approx(-1.0)
    assert f[H["g_slope"]] < 0  # brightening: magnitudes fall with time
    assert f[H["g_dt_last_nondet"]] == pytest.approx(3) and f[H["g_lim_minus_mag"]] == pytest.approx(1.0)
    assert f[H["g_dmag_prev"]] == pytest.approx(-0.5) and f[H["g_dt_prev"]] == pytest.approx(5)
    assert f[H["all_dt_first_det"]] == pytest.approx(10) and f[H["all_dt_last_det"]] == pytest.approx(4)
    assert f[H["all_g_minus_r"]] == pytest.approx(np.mean([19.0, 18.5, 18.0]) - 18.2)


def test_entries_after_the_alert_outside_the_window_or_sharing_a_jd_are_ignored() -> None:
    clean = history_features(_alert(_history([(5, 1, 18.5, 20.5)])))
    corrupt = _history([(5, 1, 18.5, 20.5), (-0.4, 1, 17.0, 20.0), (HISTORY_WINDOW_DAYS + 1, 1, 15.0, 20.0),
                        (2, 2, 18.0, 20.0), (2, 1, 18.1, 20.0)])  # fmt: skip
    np.testing.assert_array_equal(history_features(_alert(corrupt)), clean)


def test_missing_candidate_fields_are_nan_not_sentinels() -> None:
    a = decode_alert(make_alert(2_400_000_000_000_000_901).message, SchemaCache())
    f = alert_features(a)
    assert f.dtype == np.float32 and f.shape == (len(FEATURE_NAMES),)
    # the generated schema has no PS1 or reference-source fields: missing on purpose
    assert np.isnan(f[F["sgscore1"]]) and np.isnan(f[F["distnr"]]) and np.isnan(f[F["age_days"]])
    cand = a.candidate.copy()
    cand[:] = np.where(np.isnan(cand), -999.0, cand)  # ZTF's sentinel for "no value"
    g = alert_features(dataclasses.replace(a, candidate=cand))
    assert np.isnan(g[F["sgscore1"]]) and np.isnan(g[F["distnr"]])


def test_values_past_float32_are_missing_not_infinite() -> None:
    """An infinite FWHM, or a history whose slope overflows float32, reach the model as NaN."""
    import warnings

    a = decode_alert(make_alert(2_400_000_000_000_000_902).message, SchemaCache())
    cand = a.candidate.copy()
    cand[CANDIDATE_FIELDS.index("fwhm")] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = alert_features(dataclasses.replace(a, candidate=cand))
    assert np.isnan(f[F["fwhm"]]) and not np.isinf(f).any()
    assert np.array_equal(as_float32_features([1.0, -np.inf, 1e300, -1e39, np.nan, 3e38]),
                          np.array([1.0, np.nan, np.nan, np.nan, np.nan, 3e38], np.float32), equal_nan=True)  # fmt: skip


def test_latitudes() -> None:
    assert galactic_latitude(266.40499, -28.93617) == pytest.approx(0.0, abs=0.1)  # the galactic centre
    assert galactic_latitude(192.85948, 27.12825) == pytest.approx(90.0, abs=0.01)  # the north galactic pole
    assert ecliptic_latitude(270.0, 66.56071) == pytest.approx(90.0, abs=0.01)  # the north ecliptic pole


def test_both_decoding_paths_give_the_same_features(corpus: list[bytes]) -> None:
    cache = SchemaCache()
    for msg in corpus:
        fast = alert_features(decode_alert(msg, cache))
        general = alert_features(decode_alert(msg, cache, fast=False))
        np.testing.assert_array_equal(fast, general)


def test_history_sequence_is_the_cleaned_light_curve_most_recent_last() -> None:
    hist = _history([(10, 1, 19.0, 20.5), (3, 2, np.nan, 19.5), (-1, 1, 17.0, 20.0), (5, 2, 18.4, 20.0)])
    seq = history_sequence(_alert(hist, mag=18.0, fid=1), length=6)
    assert seq.shape == (6, len(SEQUENCE_CHANNELS)) and seq.dtype == np.float32
    assert np.all(seq[:2] == 0), "zero padding in front"
    days = seq[2:, 0] * HISTORY_WINDOW_DAYS
    np.testing.assert_allclose(days, [10, 5, 3, 0], atol=1e-4)  # the entry after the alert is gone
    np.testing.assert_allclose(seq[2:, 1], [1.0, 0.4, 1.5, 0.0], atol=1e-5)  # limit in place of a magnitude
    np.testing.assert_array_equal(seq[2:, 5], [1, 1, 0, 1])
    long = history_sequence(_alert(_history([(i / 2 + 0.5, 1, 18.0, 20.0) for i in range(50)])), length=8)
    assert long[-1, 0] == 0 and np.all(long[:, 5] == 1), "the most recent points are kept"
