"""trainer/unlabelled.py: which alerts count as nobody's, how they are grouped, and the counts."""

from __future__ import annotations

import numpy as np
import pytest

from alerts.features import FEATURE_NAMES
from trainer.unlabelled import GROUPS, SHORT, alert_group, unlabelled_calls, unlabelled_of_other_objects

NAMES = ("AGN", "SN", "VS", "asteroid", "bogus")


def _features(all_n_det: list[float], ndethist: list[float]) -> np.ndarray:
    x = np.full((len(all_n_det), len(FEATURE_NAMES)), np.nan, np.float32)
    x[:, FEATURE_NAMES.index("all_n_det")] = all_n_det
    x[:, FEATURE_NAMES.index("ndethist")] = ndethist
    return x


def test_only_the_unlabelled_alerts_of_objects_without_a_label_count() -> None:
    y = np.array([0, -1, -1, 3, -1])
    obj = np.array(["a", "a", "b", "c", "b"])  # a's second alert is unlabelled but its object is not
    assert unlabelled_of_other_objects(y, obj).tolist() == [False, False, True, False, True]


def test_groups_read_the_window_and_ndethist() -> None:
    # alone in its window with ndethist 1; alone (or a NaN count: no history) with ndethist above 1 or
    # unknown; earlier detections in the window whatever ndethist says
    x = _features([1, 1, np.nan, np.nan, 1, 3, 2], [1, 4, 1, 7, np.nan, 1, 200])
    assert alert_group(x).tolist() == [0, 1, 0, 1, 1, 2, 2]


def test_calls_count_the_top_class_per_group() -> None:
    x = _features([1, 1, 5, 5, 5], [1, 1, 9, 9, 9])
    p = np.array([
        [0.1, 0.1, 0.1, 0.6, 0.1], [0.1, 0.5, 0.2, 0.1, 0.1],  # first detections: asteroid, SN
        [0.7, 0.1, 0.1, 0.05, 0.05], [0.6, 0.2, 0.1, 0.05, 0.05], [0.1, 0.1, 0.8, 0.0, 0.0],
    ])  # fmt: skip
    out = unlabelled_calls(p, x, NAMES)
    assert out["alerts"] == 5 and [g["group"] for g in out["groups"]] == list(GROUPS)
    first, missing, seen = out["groups"]
    assert first["alerts"] == 2 and first["called"] == {"AGN": 0, "SN": 1, "VS": 0, "asteroid": 1, "bogus": 0}
    assert first["mean_top_probability"] == pytest.approx(0.55)
    assert missing == {"group": GROUPS[1], "short": SHORT[1], "alerts": 0, "called": dict.fromkeys(NAMES, 0), "mean_top_probability": None}
    assert seen["called"] == {"AGN": 2, "SN": 0, "VS": 1, "asteroid": 0, "bogus": 0}
