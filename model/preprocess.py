"""Raw (N, 2, 21, 21) crops -> network input. The normalisation is part of the model contract and
is recorded in every bundle (``NORMALISATION``), so training and the consumer cannot drift apart.

Per alert and per channel, the finite pixels are scaled to [0, 1] by min-max (a stamp's absolute
flux varies over orders of magnitude, its shape is what the classes differ by; this is also what
the study and the ALeRCE stamp classifier do). NaN/inf pixels (masked, or padding at a CCD edge)
become 0 after scaling. A channel with a single value becomes all 0.
"""

from __future__ import annotations

import numpy as np

NORMALISATION: dict[str, object] = {
    "method": "minmax_per_channel",
    "nan_fill": 0.0,
    "crop": 21,
    "channels": ["science", "difference"],
}


def normalise(raw: np.ndarray) -> np.ndarray:
    """(N, 2, H, W) float -> (N, 2, H, W) float32 in [0, 1], NaN -> 0. Pure and vectorised."""
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {x.shape}")
    finite = np.isfinite(x)
    lo = np.where(finite, x, np.inf).min(axis=(2, 3), keepdims=True)
    hi = np.where(finite, x, -np.inf).max(axis=(2, 3), keepdims=True)
    span = hi - lo
    ok = np.isfinite(span) & (span > 0)
    scale = np.where(ok, 1.0 / np.where(ok, span, 1.0), 0.0).astype(np.float32)
    lo = np.where(np.isfinite(lo), lo, 0.0).astype(np.float32)
    with np.errstate(invalid="ignore"):
        out = (x - lo) * scale
    out[~finite] = 0.0
    result: np.ndarray = out.astype(np.float32, copy=False)
    return result
