"""The alerts every benchmark runs on, in one place: ../shared/ztf/alerts when it is beside the
checkout (the 2,134 real alerts), else 500 generated ones; and, for the benchmarks that time the
model alone, their raw stamps and features as the consumer computes them (its own message step).
Imported by the scripts beside it (``from corpus import ...``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.features import alert_features
from alerts.files import iter_messages
from alerts.message import decode_message

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "ztf" / "alerts"
GENERATED = 500


RUBIN = ROOT.parent / "shared" / "rubin" / "wire"


def rubin_messages() -> tuple[list[bytes], str]:
    """Rubin wire messages: the real ones of ../shared/rubin/wire, else 100 generated ones
    (schema 10.0, histories of 0 to 99 entries)."""
    if RUBIN.is_dir():
        return list(iter_messages([RUBIN])), "shared/rubin/wire (real)"
    from alerts.synthetic_rubin import make_rubin_message

    return [make_rubin_message(1000, 1 + i, seed=i, n_prv=i) for i in range(100)], "generated"


def corpus_messages() -> tuple[list[bytes], str]:
    """(wire messages, where they come from)."""
    if SHARED.is_dir():
        return list(iter_messages([SHARED])), f"{SHARED.name} (real)"
    from alerts.synthetic import make_alerts

    return [a.message for a in make_alerts(GENERATED)], "generated"


@dataclass(frozen=True)
class Decoded:
    raw: np.ndarray  # (N, 2, 21, 21) float32, raw crops (model.preprocess.normalise gives the model input)
    features: np.ndarray  # (N, F) float32
    candid: np.ndarray  # (N,) int64
    object_id: np.ndarray  # (N,) str


def decode_corpus(messages: Iterable[bytes], limit: int | None = None) -> Decoded:
    """Decoded as the consumer decodes them; bad alerts skipped, each candid once."""
    cache = SchemaCache()
    raws, feats, cands, objs, seen = [], [], [], [], set()
    for value in messages:
        try:
            alert, px = decode_message(value, cache)
        except BadAlertError:
            continue
        if alert.candid in seen:
            continue
        seen.add(alert.candid)
        raws.append(px.pixels.astype(np.float32))
        feats.append(alert_features(alert))
        cands.append(alert.candid)
        objs.append(alert.object_id)
        if limit and len(cands) >= limit:
            break
    return Decoded(np.stack(raws), np.stack(feats).astype(np.float32), np.array(cands, dtype=np.int64), np.array(objs))
