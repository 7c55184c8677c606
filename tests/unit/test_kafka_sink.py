"""The Kafka sink with a stand-in producer: transient errors are retried by the caller, permanent
ones go to the dead-letter topic once and never stall the partition."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer.kafka_sink import KafkaSink, Outgoing
from consumer.retry import SinkError


class StandInProducer:
    """Delivers every message, except by the rules given: topic -> error code at delivery, or a
    synchronous refusal for values over ``max_bytes``."""

    def __init__(self, refuse: dict[str, int] | None = None, max_bytes: int = 10**9) -> None:
        self.refuse = refuse or {}
        self.max_bytes = max_bytes
        self.delivered: list[tuple[str, bytes, dict[str, bytes]]] = []
        self._pending: list[tuple[Any, KafkaError | None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        if len(value) > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        code = self.refuse.get(topic)
        err = KafkaError(code) if code is not None else None
        if err is None:
            self.delivered.append((topic, value, dict(headers or [])))
        self._pending.append((on_delivery, err))

    def poll(self, _timeout: float) -> int:
        return self.flush(0)

    def flush(self, _timeout: float) -> int:
        pending, self._pending = self._pending, []
        for cb, err in pending:
            cb(err, None)
        return 0


def test_a_message_refused_for_good_becomes_a_dead_letter() -> None:
    producer = StandInProducer(refuse={"out": KafkaError.MSG_SIZE_TOO_LARGE})
    counted: list[str] = []
    sink = KafkaSink(producer, "dlq", dead_letter_max_bytes=10, on_rejected=counted.append)  # type: ignore[arg-type]
    sink.send([Outgoing("out", b"k", b"x" * 50), Outgoing("other", b"k2", b"fine")], 1.0)
    topics = [t for t, _, _ in producer.delivered]
    assert topics == ["other", "dlq"] and counted == ["output"]
    _, value, headers = producer.delivered[1]
    assert value == b"x" * 10 and headers["reason"] == b"produce_rejected" and headers["truncated"] == b"1"


def test_a_synchronous_refusal_is_handled_the_same_way() -> None:
    producer = StandInProducer(max_bytes=20)
    sink = KafkaSink(producer, "dlq", dead_letter_max_bytes=10)  # type: ignore[arg-type]
    sink.send([Outgoing("out", b"k", b"y" * 50)], 1.0)
    assert [t for t, _, _ in producer.delivered] == ["dlq"]


def test_a_refused_dead_letter_is_dropped_not_retried() -> None:
    producer = StandInProducer(refuse={"out": KafkaError.INVALID_MSG, "dlq": KafkaError.INVALID_MSG})
    counted: list[str] = []
    sink = KafkaSink(producer, "dlq", on_rejected=counted.append)  # type: ignore[arg-type]
    sink.send([Outgoing("out", b"k", b"v")], 1.0)  # returns: nothing is retried forever
    assert counted == ["output", "dead_letter"] and producer.delivered == []


def test_transient_errors_are_left_to_the_caller_to_retry() -> None:
    producer = StandInProducer(refuse={"out": KafkaError._MSG_TIMED_OUT})
    sink = KafkaSink(producer, "dlq")  # type: ignore[arg-type]
    with pytest.raises(SinkError) as e:
        sink.send([Outgoing("out", b"k", b"v")], 1.0)
    assert e.value.failed and e.value.failed[0].topic == "out"
