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
from alerts.errors import BadAlertError
from alerts.message import AnyAlert
from alerts.rubin import RubinAlert
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
    alert: AnyAlert
    stamp: StampPixels
    features: np.ndarray  # alerts.message.features_of: the survey's features
    source: Source


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """The model a batch was inferred with (taken once per batch, so a hot reload never mixes)."""

    name: str
    version: str
    class_names: tuple[str, ...]
    classifier: str = "stamp-probe"  # what gave the probabilities: "fused", "stamp-probe" or "none"
    features_version: int = 0

    @staticmethod
    def of(name: str, version: str, class_names: tuple[str, ...], has_head: bool, features_version: int) -> ModelMeta:
        classifier = "none" if not class_names else "fused" if has_head else "stamp-probe"
        return ModelMeta(name, version, class_names, classifier, features_version)


@dataclass
class DecodedBatch:
    size: int
    good: list[GoodAlert] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)  # dead letters so far
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset per partition


# (z, stamp probs, probs), row i for good[i]: three arrays (one survey), or three lists of rows
# (surveys whose models differ in latent size or classes)
OutputRows = np.ndarray | Sequence[np.ndarray]
Outputs = tuple[OutputRows, OutputRows, OutputRows]


@dataclass
class InFlight:
    decoded: DecodedBatch
    metas: Sequence[ModelMeta]  # row i of good was inferred with metas[i]
    future: Future[Outputs] | None


@dataclass
class Published:
    """A batch acknowledged by Kafka whose Redis write is sent but not yet acknowledged; its
    offsets are committed once Redis answers. Holds only the results, not the messages."""

    results: list[Result]
    request: RedisRequest
    offsets: dict[tuple[str, int], int]


_ZTF_BANDS = {1: "g", 2: "r", 3: "i"}


def build_results(
    good: Sequence[GoodAlert], z: OutputRows, stamp_probs: OutputRows, probs: OutputRows,
    metas: Sequence[ModelMeta], now_ms: int,
) -> list[Result]:
    """Good alerts + model outputs (row i belongs to good[i], inferred with metas[i]) -> result records."""
    return [_result(g, z[i], stamp_probs[i], probs[i], metas[i], now_ms) for i, g in enumerate(good)]


def _result(g: GoodAlert, z: np.ndarray, stamp_probs: np.ndarray, probs: np.ndarray, meta: ModelMeta, now_ms: int) -> Result:
    a = g.alert
    r = a if isinstance(a, RubinAlert) else None
    return Result(
        candid=a.candid,
        object_id=a.object_id,
        jd=a.jd,
        fid=a.fid,
        ra=a.ra,
        dec=a.dec,
        embedding=z,
        probabilities=probs,
        stamp_probabilities=stamp_probs,
        classifier=meta.classifier,
        features_version=meta.features_version,
        class_names=meta.class_names,
        model_name=meta.name,
        model_version=meta.version,
        cutout_padded=g.stamp.padded,
        nan_fraction=g.stamp.nan_fraction,
        alert_schema_version=a.schema_version,
        processed_at_ms=now_ms,
        source_topic=g.source.topic,
        source_partition=g.source.partition,
        source_offset=g.source.offset,
        survey=a.survey,
        band=r.band if r else _ZTF_BANDS.get(a.fid, ""),
        dia_source_id=r.dia_source_id if r else None,
        dia_object_id=r.dia_object_id if r else None,
        ndethist=a.ndethist,
        jdstarthist=a.jdstarthist,
    )


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
