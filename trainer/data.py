"""Training data: alerts from Avro files/folders -> normalised (N, 2, 21, 21) stamps and the
feature vectors of ``alerts.features``, with labels from a CSV (candid -> label) and
train/val/test splits by objectId.

The same decode, cutout and feature functions as the consumer are used, so the models are trained
on exactly what they will see in the stream. The features read only the allowlisted fields
(``alerts/allowlist.py``): the asteroid and bogus labels were made from ``ssdistnr`` and ``drb``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alerts.cutouts import stamp_pixels
from alerts.decoder import SchemaCache, decode_alerts, decode_records
from alerts.errors import BadAlertError
from alerts.features import FEATURE_NAMES, alert_features, history_sequence
from alerts.files import iter_messages
from model.classifier import CLASS_NAMES
from model.preprocess import normalise
from trainer.stages import (
    STAGES,
    earlier_view,
    earliest_detection_alert,
    exported_first_alert,
    first_detection_view,
)

log = logging.getLogger("stampstream.trainer")
UNLABELLED = -1


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (N, 2, 21, 21) float32, normalised
    candid: np.ndarray  # (N,) int64
    object_id: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) int64, class index or UNLABELLED
    class_names: tuple[str, ...]
    features: np.ndarray  # (N, len(FEATURE_NAMES)) float32, NaN where missing
    sequences: np.ndarray  # (N, SEQUENCE_LENGTH, 6) float32: the cleaned history (features.history_sequence)
    stages: np.ndarray  # (len(STAGES), N, len(FEATURE_NAMES)) float32: features of trainer.stages' earlier views
    earliest: np.ndarray  # (N, len(FEATURE_NAMES)) float32: trainer.stages.earliest_detection_alert's features, NaN rows where none
    # (2, N, len(FEATURE_NAMES)) float32: trainer.stages.exported_first_alert of the alert and of its
    # earliest detection (NaN rows where none)
    exported: np.ndarray
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.candid)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.candid[idx], self.object_id[idx], self.y[idx], self.class_names,
                       self.features[idx], self.sequences[idx], self.stages[:, idx], self.earliest[idx],
                       self.exported[:, idx])  # fmt: skip

    def summary(self) -> dict[str, object]:
        counts = Counter(int(v) for v in self.y)
        return {
            "alerts": len(self),
            "objects": len(set(self.object_id.tolist())),
            "labelled": int((self.y >= 0).sum()),
            "per_class": {name: counts.get(i, 0) for i, name in enumerate(self.class_names)},
            "unlabelled": counts.get(UNLABELLED, 0),
            "skipped_bad_alerts": self.skipped,
        }


def read_labels(path: str | Path, class_names: Sequence[str] = CLASS_NAMES) -> dict[int, int]:
    """candid -> class index, from a CSV with columns candid, label (others ignored)."""
    index = {name: i for i, name in enumerate(class_names)}
    out: dict[int, int] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            label = (row.get("label") or "").strip()
            if label in index:
                out[int(row["candid"])] = index[label]
    return out


def find_labels_csv(paths: Sequence[str | Path]) -> Path | None:
    """labels.csv beside (or in) the first data folder, as in ../shared/ztf."""
    for p in map(Path, paths):
        for cand in (p / "labels.csv", p.parent / "labels.csv"):
            if cand.is_file():
                return cand
    return None


def load_dataset(paths: Sequence[str | Path], labels: dict[int, int], limit: int | None = None) -> Dataset:
    """Decode every alert of the paths; bad alerts are skipped and counted, duplicates kept once."""
    cache = SchemaCache()
    raws: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    seqs: list[np.ndarray] = []
    views: list[np.ndarray] = []
    earliest: list[np.ndarray] = []
    exported: list[np.ndarray] = []
    candids: list[int] = []
    objects: list[str] = []
    seen: set[int] = set()
    skipped = 0
    for msg in iter_messages(paths):
        try:
            alerts = decode_alerts(msg, cache)
            for alert, prv in zip(alerts, _histories(msg, len(alerts)), strict=True):
                if alert.candid in seen:
                    continue
                stamp = stamp_pixels(alert.science, alert.difference, alert.xpos, alert.ypos)
                seen.add(alert.candid)
                raws.append(stamp.pixels)
                feats.append(alert_features(alert))
                seqs.append(history_sequence(alert))
                views.append(np.stack([
                    alert_features(first_detection_view(alert, prv) if k == 1 else earlier_view(alert, k))
                    for k in STAGES
                ]))  # fmt: skip
                first = earliest_detection_alert(alert, prv)
                none = np.full(len(FEATURE_NAMES), np.nan, np.float32)
                earliest.append(alert_features(first) if first is not None else none)
                exported.append(np.stack([alert_features(exported_first_alert(alert)),
                                          alert_features(exported_first_alert(first)) if first is not None else none]))  # fmt: skip
                candids.append(alert.candid)
                objects.append(alert.object_id)
        except BadAlertError as e:
            skipped += 1
            log.info("skipping bad alert (%s): %s", e.reason, e)
        if limit and len(candids) >= limit:
            break
    if not raws:
        raise ValueError(f"no usable alert in {list(map(str, paths))}")
    cand = np.array(candids, dtype=np.int64)
    y = np.array([labels.get(int(c), UNLABELLED) for c in cand], dtype=np.int64)
    features = np.stack(feats) if feats else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    return Dataset(normalise(np.stack(raws)), cand, np.array(objects), y, CLASS_NAMES, features, np.stack(seqs),
                   np.stack(views, axis=1), np.stack(earliest), np.stack(exported, axis=1), skipped)  # fmt: skip


def _histories(message: bytes, n_alerts: int) -> list[list[dict[str, Any]] | None]:
    """Each record's ``prv_candidates`` entries, in the order ``decode_alerts`` returned the
    message's alerts, for the first-detection views (their per-epoch fields are not in the decoded
    ``Alert``: the consumer never needs them). None where there is nothing to read."""
    try:
        records = decode_records(message)[1]
    except BadAlertError as e:  # a codec only the fast path reads: the plain view, not a lost alert
        log.info("first-detection views without the history's own fields: %s", e)
        return [None] * n_alerts
    if len(records) != n_alerts:
        return [None] * n_alerts
    return [prv if isinstance(prv := rec.get("prv_candidates"), list) else None for rec in records]


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_by_object(ds: Dataset, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Indices of alerts in train/val/test; no objectId is in two splits. Objects are stratified by
    their label (unlabelled objects form a stratum of their own), so every class is in every split."""
    rng = np.random.default_rng(seed)
    obj_label: dict[str, int] = {}
    for o, y in zip(ds.object_id.tolist(), ds.y.tolist(), strict=True):
        obj_label[o] = max(obj_label.get(o, UNLABELLED), y)
    by_label: dict[int, list[str]] = {}
    for o, y in sorted(obj_label.items()):
        by_label.setdefault(y, []).append(o)
    part: dict[str, int] = {}
    for objs in by_label.values():
        order = rng.permutation(len(objs))
        n_test = max(1, round(len(objs) * test_fraction)) if len(objs) >= 3 else 0
        n_val = max(1, round(len(objs) * val_fraction)) if len(objs) >= 3 else 0
        for rank, i in enumerate(order):
            part[objs[i]] = 2 if rank < n_test else (1 if rank < n_test + n_val else 0)
    which = np.array([part[o] for o in ds.object_id.tolist()])
    return Splits(np.flatnonzero(which == 0), np.flatnonzero(which == 1), np.flatnonzero(which == 2))
