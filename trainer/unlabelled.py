"""What the shipped head calls the alerts nobody labelled, by how much of its object it has seen.

The labelled set cannot show the head at work on real first detections of new objects: its SN,
AGN and VS labels come from catalogues, which exist only for objects seen many times, and its
first detections are asteroids and artefacts (docs/model.md, "New objects"). The alerts of
objects without a label are real alerts of every kind, first detections included. They carry no
class to score against, but the share of each class the head calls, next to how sure it is, is
what a subscriber of the stream will see; ``trainer fit`` stores it in the classifier table and
``trainer report`` shows it. The head was never trained on their objects, so the calls are out
of sample. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alerts.features import FEATURE_NAMES

# The groups, read from the alert's own fields only (never a label-source field):
GROUPS = (
    "first detection: no earlier detection in its 30-day history, ndethist 1",
    "no earlier detection in its 30-day history, ndethist 2 or more (sub-threshold or missing history)",
    "earlier detections in its 30-day history",
)
SHORT = ("first detection (ndethist 1)", "no earlier detection, ndethist ≥ 2", "earlier detections")  # figures
_ALL_N_DET = FEATURE_NAMES.index("all_n_det")  # detections in the window, this one included
_NDETHIST = FEATURE_NAMES.index("ndethist")


def unlabelled_of_other_objects(y: np.ndarray, object_id: np.ndarray) -> np.ndarray:
    """Mask of the unlabelled alerts (``y`` < 0) whose object has no labelled alert: an unlabelled
    alert of a labelled object is not out of sample, since its object's other alerts trained the head."""
    return (y < 0) & ~np.isin(object_id, object_id[y >= 0])


def alert_group(features: np.ndarray) -> np.ndarray:
    """Index into ``GROUPS`` per alert (rows of ``features`` in ``FEATURE_NAMES`` order; a NaN
    count is no detection, as the gate reads it)."""
    earlier = features[:, _ALL_N_DET] > 1
    first = ~earlier & (features[:, _NDETHIST] == 1)
    return np.where(earlier, 2, np.where(first, 0, 1))


def unlabelled_calls(proba: np.ndarray, features: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per group of ``GROUPS``: how many alerts, how many the head calls each class (its top
    probability) and the mean top probability."""
    group, called = alert_group(features), proba.argmax(1)
    rows = []
    for g, name in enumerate(GROUPS):
        sel = group == g
        counts = np.bincount(called[sel], minlength=len(class_names))
        rows.append({
            "group": name, "short": SHORT[g], "alerts": int(sel.sum()),
            "called": {c: int(counts[i]) for i, c in enumerate(class_names)},
            "mean_top_probability": float(proba[sel].max(1).mean()) if sel.any() else None,
        })  # fmt: skip
    return {"alerts": len(proba), "groups": rows}
