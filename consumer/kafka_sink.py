"""The Kafka sink: output and dead-letter messages of a batch, produced and flushed until the
broker has acknowledged every one (acks=all, idempotent producer). A retry of a whole batch is
harmless: messages are keyed by candid (at-least-once: a retry may duplicate a message in the
output topic, never lose one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Producer

from consumer.clients import produce
from consumer.retry import SinkError


@dataclass
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]] | None = None


class KafkaSink:
    """Produce a batch and wait until the broker has acknowledged all of it."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    def send(self, messages: Sequence[Outgoing], flush_timeout_s: float) -> None:
        """Raises SinkError with the failed messages (only those are retried by the caller)."""
        failed: list[Outgoing] = []
        errors: list[str] = []

        def on_delivery(index: int) -> Callable[[KafkaError | None, Any], None]:
            def cb(err: KafkaError | None, _msg: Any) -> None:
                if err is not None:
                    failed.append(messages[index])
                    errors.append(str(err))

            return cb

        for i, m in enumerate(messages):
            produce(self.producer, m.topic, m.value, m.key, m.headers, on_delivery(i))
        remaining = self.producer.flush(flush_timeout_s)
        if remaining:
            raise SinkError(f"{remaining} message(s) not acknowledged within {flush_timeout_s}s")
        if failed:
            raise SinkError(f"{len(failed)} message(s) failed: {errors[0]}", failed=failed)
