"""RubinAlert -> features: what a fused head for Rubin will read besides the stamps, from the
allowlisted diaSource and diaObject fields (allowlist.py) and ``prvDiaSources``. Pure and typed,
shared by the consumer and the trainer like ZTF's ``features.py``.

No Rubin classifier exists yet (no labelled Rubin set): the consumer computes these so that the
first trained head reads exactly what the stream gives, and the trainer can fit one the day labels
come. Decisions as for ZTF: missing on purpose is NaN (a null field, a field of a later schema, no
diaObject, no history, a band never seen before); fluxes in nJy enter as ratios or AB magnitudes,
never as identifiers or absolute times; position only as galactic and ecliptic latitude. Only
history entries before the alert count (a copy's odd times must not say where it came from).
"""

from __future__ import annotations

import numpy as np

from alerts.features import as_float32_features, ecliptic_latitude, galactic_latitude
from alerts.rubin import BANDS, RubinAlert

RUBIN_FEATURES_VERSION = 1
AB_ZERO_POINT_NJY = 31.4  # m_AB = 31.4 - 2.5 log10(flux / nJy)

_SOURCE = (
    "snr", "psf_flux_over_err", "log_abs_psf_flux", "negative", "science_mag", "template_mag", "ap_over_psf",
    "extendedness", "psf_chi2_per_point", "is_dipole", "dipole_length", "dipole_diff_over_mean", "trail_length",
    "ixx_over_psf", "iyy_over_psf", "saturated_center", "cr_center", "edge",
)  # fmt: skip
_BANDS = tuple(f"band_{b}" for b in BANDS)
_POSITION = ("gal_lat", "ecl_lat")
_OBJECT = ("days_since_first_source", "n_dia_sources")
_HISTORY = (
    "n_prv", "n_prv_same_band", "n_bands_prv", "days_since_prv_first", "days_since_prv_last",
    "days_since_prv_same_band", "flux_over_prv_max_same_band", "dflux_per_day_same_band",
)  # fmt: skip
RUBIN_FEATURE_NAMES: tuple[str, ...] = _SOURCE + _BANDS + _POSITION + _OBJECT + _HISTORY


def _ratio(a: float, b: float) -> float:
    return a / b if np.isfinite(a) and np.isfinite(b) and b != 0 else np.nan


def _ab_mag(flux: float) -> float:
    return AB_ZERO_POINT_NJY - 2.5 * float(np.log10(flux)) if np.isfinite(flux) and flux > 0 else np.nan


def rubin_features(alert: RubinAlert) -> np.ndarray:
    """(len(RUBIN_FEATURE_NAMES),) float32, NaN where missing."""
    v = alert.value
    flux, err = v("psfFlux"), v("psfFluxErr")
    ndata = v("psfNdata")
    neg = v("isNegative")
    source = [
        v("snr"), _ratio(flux, err), float(np.log10(abs(flux))) if np.isfinite(flux) and flux != 0 else np.nan,
        neg if np.isfinite(neg) else (float(flux < 0) if np.isfinite(flux) else np.nan),
        _ab_mag(v("scienceFlux")), _ab_mag(v("templateFlux")), _ratio(v("apFlux"), flux),
        v("extendedness"), _ratio(v("psfChi2"), ndata if np.isfinite(ndata) and ndata > 0 else np.nan),
        v("isDipole"), v("dipoleLength"), _ratio(v("dipoleFluxDiff"), abs(v("dipoleMeanFlux"))), v("trailLength"),
        _ratio(v("ixx"), v("ixxPSF")), _ratio(v("iyy"), v("iyyPSF")),
        v("pixelFlags_saturatedCenter"), v("pixelFlags_crCenter"), v("pixelFlags_edge"),
    ]  # fmt: skip
    bands = [1.0 if alert.fid == k + 1 else 0.0 for k in range(len(BANDS))]
    position = [galactic_latitude(alert.ra, alert.dec), ecliptic_latitude(alert.ra, alert.dec)]
    mjd = alert.mjd
    first = float(alert.obj[0])
    obj = [mjd - first if np.isfinite(first) and first <= mjd else np.nan, float(alert.obj[1])]
    return as_float32_features(source + bands + position + obj + _history(alert, mjd, flux))


def _history(alert: RubinAlert, mjd: float, flux: float) -> list[float]:
    h = alert.history
    before = np.isfinite(h.mjd) & (h.mjd < mjd)
    t, band, f = h.mjd[before], h.band[before], h.flux[before]
    n = int(t.shape[0])
    if n == 0:
        return [0.0, 0.0, 0.0] + [np.nan] * 5
    same = band == alert.fid
    ts, fs = t[same], f[same]
    ok = np.isfinite(fs)
    last_same = float(mjd - ts.max()) if ts.size else np.nan
    peak = float(np.abs(fs[ok]).max()) if ok.any() else np.nan
    if ok.any():
        i = int(np.argmax(np.where(ok, ts, -np.inf)))
        dt = mjd - float(ts[i])
        slope = (flux - float(fs[i])) / dt if dt > 0 and np.isfinite(flux) else np.nan
    else:
        slope = np.nan
    return [
        float(n), float(same.sum()), float(np.unique(band[band > 0]).size), float(mjd - t.min()), float(mjd - t.max()),
        last_same, _ratio(abs(flux), peak), slope,
    ]  # fmt: skip
