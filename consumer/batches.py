"""The batch as it moves through the loop, and the two things a batch turns into: results (for
the good alerts) and dead letters (for the bad messages).

    DecodedBatch (consume + decode + cutouts) -> InFlight (queued to the model)
        -> Published (Kafka acknowledged, Redis sent) -> committed
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from alerts.cutouts import StampPixels
from alerts.decoder import Alert
from alerts.errors import BadAlertError
from consumer.kafka_sink import Outgoing
from consumer.redis_sink import RedisRequest
from consumer.results import Result


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message came from."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class GoodAlert:
    alert: Alert
    stamp: StampPixels
    features: np.ndarray  # alerts.features.alert_features
    source: Source


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """The model a batch was inferred with (taken once per batch, so a hot reload never mixes)."""

    name: str
    version: str
    class_names: tuple[str, ...]
    classifier: str = "stamp-probe"  # what gave the probabilities: "fused" or "stamp-probe"
    features_version: int = 0


@dataclass
class DecodedBatch:
    size: int
    good: list[GoodAlert] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)  # dead letters so far
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset per partition


@dataclass
class InFlight:
    decoded: DecodedBatch
    meta: ModelMeta
    future: Future[tuple[np.ndarray, np.ndarray, np.ndarray]] | None  # (z, stamp probs, probs) of good


@dataclass
class Published:
    """A batch acknowledged by Kafka whose Redis write is sent but not yet acknowledged; its
    offsets are committed once Redis answers. Holds only the results, not the messages."""

    results: list[Result]
    request: RedisRequest
    offsets: dict[tuple[str, int], int]


def build_results(
    good: Sequence[GoodAlert], z: np.ndarray, stamp_probs: np.ndarray, probs: np.ndarray, meta: ModelMeta, now_ms: int
) -> list[Result]:
    """Good alerts + model outputs (row i belongs to good[i]) -> result records."""
    return [
        Result(
            candid=g.alert.candid,
            object_id=g.alert.object_id,
            jd=g.alert.jd,
            fid=g.alert.fid,
            ra=g.alert.ra,
            dec=g.alert.dec,
            embedding=z[i],
            probabilities=probs[i],
            stamp_probabilities=stamp_probs[i],
            classifier=meta.classifier,
            features_version=meta.features_version,
            class_names=meta.class_names,
            model_name=meta.name,
            model_version=meta.version,
            cutout_padded=g.stamp.padded,
            nan_fraction=g.stamp.nan_fraction,
            alert_schema_version=g.alert.schema_version,
            processed_at_ms=now_ms,
            source_topic=g.source.topic,
            source_partition=g.source.partition,
            source_offset=g.source.offset,
        )
        for i, g in enumerate(good)
    ]


def dead_letter(value: bytes | None, src: Source, err: BadAlertError, max_bytes: int, topic: str) -> Outgoing:
    """The dead-letter message: the raw bytes (cut to max_bytes) and the reason in headers."""
    raw = value or b""
    headers: list[tuple[str, str | bytes | None]] = [
        ("reason", err.reason.encode()),
        ("error", str(err)[:1000].encode("utf-8", "replace")),
        ("error_class", type(err).__name__.encode()),
        ("source_topic", src.topic.encode()),
        ("source_partition", str(src.partition).encode()),
        ("source_offset", str(src.offset).encode()),
        ("candid", b"" if err.candid is None else str(err.candid).encode()),
        ("original_size", str(len(raw)).encode()),
    ]
    if len(raw) > max_bytes:
        headers.append(("truncated", b"1"))
        raw = raw[:max_bytes]
    key = str(err.candid).encode() if err.candid is not None else f"{src.topic}/{src.partition}/{src.offset}".encode()
    return Outgoing(topic, key, raw, headers)
