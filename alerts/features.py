"""alert -> features: what the classifier reads besides the stamps, from the alert's own candidate
fields (allowlist.py) and its 30-day history. Pure and typed; the trainer and the consumer call
the same function, so a model sees in the stream exactly what it was trained on.

Decisions (docs/model.md, "Features"):

* Missing on purpose: a null field, a field absent from an old schema, ZTF's -999 sentinels, no
  history, or a band without detections all give NaN. The trees take NaN as is; the torch head
  reads a standardised value (NaN -> 0) and a missing flag per feature (model/fused.py).
* The history is cleaned first: only entries in the 30 days *before* the alert count (ZTF's
  window), and entries that share their jd with another entry are dropped. Why: some public
  copies of alerts carry a history whose jd was overwritten with one constant (later than the
  alert for 62 of the 177 asteroid labels of ../shared/ztf): "history after the alert" would
  identify the copy, and with it the label, not the object.
* The current detection counts as the latest point of the light curve in its band.
* Position enters only as galactic and ecliptic latitude (the trainer reports an ablation
  without them: ``POSITION_FEATURES``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from alerts.alert import Alert, sign_of
from alerts.allowlist import CANDIDATE_FIELDS

FEATURES_VERSION = 1
HISTORY_WINDOW_DAYS = 30.0

# Candidate fields that enter as they are (after the sentinel cleaning).
_RAW = (
    "magpsf", "sigmapsf", "diffmaglim", "magfromlim", "fwhm", "elong", "classtar", "chipsf", "scorr",
    "magap", "sigmagap", "magapbig", "sigmagapbig", "magdiff", "sumrat", "nbad", "nneg", "seeratio",
    "mindtoedge", "aimage", "bimage", "aimagerat", "bimagerat", "distnr", "magnr", "sigmagnr", "chinr",
    "sharpnr", "ndethist", "ncovhist", "sgscore1", "distpsnr1", "sgmag1", "srmag1", "simag1", "szmag1",
    "sgscore2", "distpsnr2", "sgscore3", "distpsnr3",
)  # fmt: skip
_DERIVED = (
    "isdiffpos", "fid_g", "fid_r", "age_days", "hist_span_days", "nondet_hist", "mag_minus_magnr",
    "ps1_g_minus_r", "log_scorr",
)  # fmt: skip
POSITION_FEATURES = ("gal_lat", "ecl_lat")
_BAND_STATS = (
    "n_det", "n_nondet", "span", "amplitude", "slope", "last_minus_first", "std", "mean",
    "frac_negative", "dt_last_nondet", "lim_minus_mag", "dmag_prev", "dt_prev",
)  # fmt: skip
_ALL_STATS = ("n_det", "n_nondet", "dt_first_det", "dt_last_det", "dt_last_nondet", "g_minus_r", "g_minus_r_last")
HISTORY_FEATURES = tuple(f"{b}_{s}" for b in ("g", "r") for s in _BAND_STATS) + tuple(f"all_{s}" for s in _ALL_STATS)
METADATA_FEATURES = _RAW + _DERIVED + POSITION_FEATURES
FEATURE_NAMES: tuple[str, ...] = METADATA_FEATURES + HISTORY_FEATURES

_CAND = {n: i for i, n in enumerate(CANDIDATE_FIELDS)}
_RAW_INDEX = np.array([_CAND[n] for n in _RAW if n != "magfromlim"], dtype=np.int64)
SENTINEL_BELOW = -99.0  # ZTF writes -999 (and -99) for "no value" in several catalogue fields


def _equatorial_to(rot: np.ndarray, ra_deg: float, dec_deg: float) -> float:
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    v = np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])
    return math.degrees(math.asin(max(-1.0, min(1.0, float(rot[2] @ v)))))


# ICRS -> galactic (Hipparcos/IAU rotation matrix) and -> ecliptic (J2000 mean obliquity).
_GAL = np.array([
    [-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
    [+0.4941094278755837, -0.4448296299600112, +0.7469822444972189],
    [-0.8676661490190047, -0.1980763734312015, +0.4559837761750669],
])  # fmt: skip
_EPS = math.radians(23.4392911)
_ECL = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(_EPS), math.sin(_EPS)], [0.0, -math.sin(_EPS), math.cos(_EPS)]])


def galactic_latitude(ra_deg: float, dec_deg: float) -> float:
    return _equatorial_to(_GAL, ra_deg, dec_deg)


def ecliptic_latitude(ra_deg: float, dec_deg: float) -> float:
    return _equatorial_to(_ECL, ra_deg, dec_deg)


@numba.njit(cache=True, nogil=True)
def history_mask(jd: np.ndarray, jd0: float, window: float) -> np.ndarray:
    """The history entries that count (the cleaning rule of the module docstring, shared by the
    statistics and the sequence): in (jd0 - window, jd0), and no other entry with the same jd."""
    n = jd.shape[0]
    order = np.argsort(jd)
    keep = np.zeros(n, dtype=np.bool_)
    for k in range(n):
        i = order[k]
        if not (jd[i] < jd0 and jd[i] > jd0 - window):
            continue
        same_before = k > 0 and jd[order[k - 1]] == jd[i]
        same_after = k + 1 < n and jd[order[k + 1]] == jd[i]
        keep[i] = not (same_before or same_after)
    return keep


@numba.njit(cache=True, nogil=True)
def _history_stats(jd0, fid0, mag0, pos0, jd, fid, mag, diffmaglim, positive, window, out):  # type: ignore[no-untyped-def]
    """The history features into ``out`` (NaN where undefined). The current detection (jd0, fid0,
    mag0, pos0) is the latest point; only the entries of ``history_mask`` count."""
    n = jd.shape[0]
    keep = history_mask(jd, jd0, window)
    nb = 13
    all_n_det = 0
    all_n_nondet = 0
    first_det = jd0
    last_prior_det = -np.inf
    last_nondet_any = -np.inf
    means = np.full(2, np.nan)
    lasts = np.full(2, np.nan)
    last_t = np.full(2, -np.inf)
    for b in range(2):
        band = b + 1
        # detections of the band, current one included
        nd = 0
        s_t = 0.0
        s_m = 0.0
        s_tt = 0.0
        s_tm = 0.0
        s_mm = 0.0
        t_first = np.inf
        t_last = -np.inf
        m_first = np.nan
        m_last = np.nan
        m_min = np.inf
        m_max = -np.inf
        n_neg = 0
        n_nondet = 0
        t_nondet = -np.inf
        lim_nondet = np.nan
        prev_t = -np.inf
        prev_m = np.nan
        for i in range(n + 1):
            if i < n:
                if not keep[i] or fid[i] != band:
                    continue
                t, m, p = jd[i], mag[i], positive[i]
                if np.isnan(m):
                    n_nondet += 1
                    if t > t_nondet:
                        t_nondet = t
                        lim_nondet = diffmaglim[i]
                    continue
                if t > prev_t:
                    prev_t = t
                    prev_m = m
            else:
                if fid0 != band or np.isnan(mag0):
                    continue
                t, m, p = jd0, mag0, pos0
            nd += 1
            dt = t - jd0
            s_t += dt
            s_m += m
            s_tt += dt * dt
            s_tm += dt * m
            s_mm += m * m
            if p == 0:
                n_neg += 1
            if t < t_first:
                t_first = t
                m_first = m
            if t > t_last:
                t_last = t
                m_last = m
            m_min = min(m_min, m)
            m_max = max(m_max, m)
        o = b * nb
        out[o + 0] = nd
        out[o + 1] = n_nondet
        if nd > 0:
            mean = s_m / nd
            out[o + 2] = t_last - t_first
            out[o + 3] = m_max - m_min
            var = s_tt / nd - (s_t / nd) ** 2
            out[o + 4] = (s_tm / nd - (s_t / nd) * mean) / var if nd >= 2 and var > 1e-12 else np.nan
            out[o + 5] = m_last - m_first
            out[o + 6] = math.sqrt(max(s_mm / nd - mean * mean, 0.0))
            out[o + 7] = mean
            out[o + 8] = n_neg / nd
            means[b] = mean
            lasts[b] = m_last
            last_t[b] = t_last
            first_det = min(first_det, t_first)
        else:
            for k in range(2, 9):
                out[o + k] = np.nan
        out[o + 9] = jd0 - t_nondet if n_nondet > 0 else np.nan
        out[o + 10] = lim_nondet - mag0 if n_nondet > 0 and fid0 == band and not np.isnan(mag0) else np.nan
        has_prev = prev_t > -np.inf and fid0 == band and not np.isnan(mag0)
        out[o + 11] = mag0 - prev_m if has_prev else np.nan
        out[o + 12] = jd0 - prev_t if has_prev else np.nan
        all_n_det += nd
        all_n_nondet += n_nondet
        if prev_t > last_prior_det:
            last_prior_det = prev_t
        if t_nondet > last_nondet_any:
            last_nondet_any = t_nondet
    o = 2 * nb
    out[o + 0] = all_n_det
    out[o + 1] = all_n_nondet
    out[o + 2] = jd0 - first_det
    out[o + 3] = jd0 - last_prior_det if last_prior_det > -np.inf else np.nan
    out[o + 4] = jd0 - last_nondet_any if last_nondet_any > -np.inf else np.nan
    out[o + 5] = means[0] - means[1]
    out[o + 6] = lasts[0] - lasts[1] if abs(last_t[0] - last_t[1]) < 1.0 else np.nan
    return out


def metadata_features(alert: Alert) -> np.ndarray:
    """The candidate part of the feature vector (METADATA_FEATURES), float64, NaN where missing."""
    c = alert.candidate
    raw = c[_RAW_INDEX]
    raw = np.where(raw <= SENTINEL_BELOW, np.nan, raw)
    v = dict(zip((n for n in _RAW if n != "magfromlim"), raw.tolist(), strict=True))
    v["magfromlim"] = v["diffmaglim"] - v["magpsf"]
    sign = sign_of(alert.isdiffpos)
    fid = alert.fid
    jd = alert.jd
    jdstart, jdend = c[_CAND["jdstarthist"]], c[_CAND["jdendhist"]]
    derived = (
        np.nan if sign < 0 else float(sign),
        float(fid == 1),
        float(fid == 2),
        jd - jdstart if jdstart > 0 else np.nan,
        jdend - jdstart if jdstart > 0 and jdend > 0 else np.nan,
        v["ncovhist"] - v["ndethist"],
        v["magpsf"] - v["magnr"],
        v["sgmag1"] - v["srmag1"],
        math.log10(v["scorr"]) if v["scorr"] > 0 else np.nan,
    )
    position = (galactic_latitude(alert.ra, alert.dec), ecliptic_latitude(alert.ra, alert.dec))
    return np.array([v[n] for n in _RAW] + list(derived) + list(position), dtype=np.float64)


def history_features(alert: Alert) -> np.ndarray:
    """The history part of the feature vector (HISTORY_FEATURES), float64, NaN where undefined."""
    h = alert.history
    out = np.empty(len(HISTORY_FEATURES), dtype=np.float64)
    mag0 = alert.magpsf
    return _history_stats(  # type: ignore[no-any-return]
        alert.jd, float(alert.fid), np.nan if mag0 is None else mag0, sign_of(alert.isdiffpos),
        h.jd, h.fid, h.magpsf, h.diffmaglim, h.positive, HISTORY_WINDOW_DAYS, out,
    )  # fmt: skip


# Every feature is at most this in magnitude, or NaN (``as_float32_features``): the gate's test for
# "has a value" (trainer/trees.py ``gated_arrays``) is a split at it.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32_features(values: np.ndarray | list[float]) -> np.ndarray:
    """Features computed in float64 -> float32, with +-inf and values past float32's range as NaN
    (missing): a crafted field (a flux of 1e300, an infinite FWHM) must reach the model as "no
    value", the same as a null, not as an infinity, and must not make numpy warn on every alert."""
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.abs(a) <= FLOAT32_MAX, a, np.nan).astype(np.float32)


def alert_features(alert: Alert) -> np.ndarray:
    """alert -> (len(FEATURE_NAMES),) float32, NaN where missing."""
    return as_float32_features(np.concatenate([metadata_features(alert), history_features(alert)]))


SEQUENCE_LENGTH = 64
SEQUENCE_CHANNELS = ("days_before", "mag_minus_current", "sigma", "band_g", "band_r", "detected")


def history_sequence(alert: Alert, length: int = SEQUENCE_LENGTH) -> np.ndarray:
    """The cleaned history (same rules as the features: the 30 days before the alert, no shared
    jd) plus the current detection, most recent last, as (length, 6) float32 rows of
    SEQUENCE_CHANNELS, zero-padded at the front: the input of a learned sequence encoder.
    Non-detections carry their limit in place of the magnitude, and detected = 0."""
    h = alert.history
    jd0 = alert.jd
    mag0 = alert.magpsf if alert.magpsf is not None else np.nan
    keep = np.flatnonzero(history_mask(h.jd, jd0, HISTORY_WINDOW_DAYS))
    keep = keep[np.argsort(h.jd[keep], kind="stable")]
    detected = np.isfinite(h.magpsf[keep])
    mag = np.where(detected, h.magpsf[keep], h.diffmaglim[keep])
    rows = np.stack([
        (jd0 - h.jd[keep]) / HISTORY_WINDOW_DAYS,
        np.nan_to_num(mag - mag0),
        np.where(detected, np.nan_to_num(h.sigmapsf[keep]), 0.0),
        (h.fid[keep] == 1).astype(float),
        (h.fid[keep] == 2).astype(float),
        detected.astype(float),
    ], axis=1) if len(keep) else np.zeros((0, 6))  # fmt: skip
    current = np.array([[0.0, 0.0, alert.value("sigmapsf") if np.isfinite(alert.value("sigmapsf")) else 0.0,
                         float(alert.fid == 1), float(alert.fid == 2), 1.0]])  # fmt: skip
    seq = np.concatenate([rows, current])[-length:]
    out = np.zeros((length, len(SEQUENCE_CHANNELS)), np.float32)
    out[length - len(seq) :] = seq
    return out
