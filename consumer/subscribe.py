"""Following the output topic as a downstream user: ``consumer subscribe`` and its Python iterator.

What fink-client offers for Fink's topics, for ours: a consumer group of its own on the output
topic (so it never takes partitions from the daemon or from another subscriber), records decoded
from their Avro containers (the schema travels in each message: no registry), filtered by class,
probability, survey and detections so far, as dicts of the output schema (consumer/output_schema.avsc)::

    from config import load_consumer_config
    from consumer.subscribe import ResultFilter, subscribe

    for rec in subscribe(load_consumer_config("config/local.yaml"), ResultFilter(("SN",), 0.8)):
        print(rec["objectId"], rec["predicted_probability"])

Delivery is at least once for a named group (``group_id``; offsets committed as records are
handed out); without one, each call is a fresh group that starts at the end of the topic (or at
its beginning with ``from_beginning``) and leaves no offsets behind worth keeping.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from config.consumer import ConsumerConfig
from consumer.clients import kafka_common
from consumer.results import decode_result


@dataclass(frozen=True)
class ResultFilter:
    """Which records a subscriber wants: predicted class among ``classes`` (empty: any) with
    at least ``min_probability``, of the ``surveys`` named (empty: any; ztf, lsst), of objects
    detected at least ``min_detections`` times (``ndethist``; a record that does not say, from
    schema < 3.1 or an alert without it, passes). The classes of young objects are not to be
    trusted (docs/model.md, "New objects"): ``min_detections`` 5 keeps the ones that are."""

    classes: tuple[str, ...] = ()
    min_probability: float = 0.0
    surveys: tuple[str, ...] = ()
    min_detections: int = 0

    def matches(self, record: dict[str, Any]) -> bool:
        if self.surveys and record.get("survey", "ztf") not in self.surveys:
            return False
        ndet = record.get("ndethist")
        if self.min_detections and ndet is not None and ndet < self.min_detections:
            return False
        if self.classes and record.get("predicted_class") not in self.classes:
            return False
        return float(record.get("predicted_probability", 0.0)) >= self.min_probability


def subscriber_settings(cfg: ConsumerConfig, group_id: str | None, from_beginning: bool) -> dict[str, Any]:
    """librdkafka settings of a subscriber: the daemon's connection and security settings, its
    own group, offsets committed automatically (what it has handed out)."""
    return kafka_common(cfg.kafka) | {
        "group.id": group_id or f"{cfg.kafka.group_id}-subscriber-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
    }


def subscribe(
    cfg: ConsumerConfig,
    flt: ResultFilter = ResultFilter(),
    *,
    from_beginning: bool = False,
    group_id: str | None = None,
    idle_timeout_s: float | None = None,
    stop: Callable[[], bool] | None = None,
    on_bad: Callable[[Exception], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of the output topic that pass ``flt``, as they come. Ends after ``idle_timeout_s``
    without a message (None: never), or when ``stop()`` is true. A message that is not a valid
    output record is skipped (and passed to ``on_bad``): a subscriber must not die of one."""
    from confluent_kafka import Consumer, KafkaException

    consumer = Consumer(subscriber_settings(cfg, group_id, from_beginning))
    consumer.subscribe([cfg.kafka.output_topic])
    last = time.monotonic()
    try:
        while not (stop is not None and stop()):
            msg = consumer.poll(0.5)
            if msg is None:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                continue
            try:
                record = decode_result(msg.value() or b"")
            except Exception as e:  # not ours, or damaged: skip it
                if on_bad is not None:
                    on_bad(e)
                consumer.store_offsets(msg)
                continue
            consumer.store_offsets(msg)
            if flt.matches(record):
                yield record
    finally:
        consumer.close()


COLUMNS = (("processed", 23), ("candid", 20), ("objectId", 13), ("class", 9), ("p", 6), ("ndet", 5), ("jd", 15),
           ("model", 26))  # fmt: skip


def table_header() -> str:
    return "  ".join(name.ljust(w) for name, w in COLUMNS)


def json_ready(rec: dict[str, Any]) -> dict[str, Any]:
    """A record for JSON lines: timestamps (Avro timestamp-millis, read as datetime) in ISO 8601."""
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in rec.items()}


def table_row(rec: dict[str, Any]) -> str:
    """One record as a fixed-width line of the live table."""
    at = rec["processed_at"]
    if not isinstance(at, dt.datetime):  # a plain long (ms) from another reader
        at = dt.datetime.fromtimestamp(at / 1000, dt.UTC)
    processed = at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    values = (
        processed, str(rec["candid"]), rec["objectId"], rec["predicted_class"],
        f"{rec['predicted_probability']:.3f}", "-" if rec.get("ndethist") is None else str(rec["ndethist"]),
        f"{rec['jd']:.5f}", f"{rec['model_name']}:{rec['model_version']}",
    )  # fmt: skip
    return "  ".join(v.ljust(w) for v, (_, w) in zip(values, COLUMNS, strict=True))
