"""The Kafka sink: output and dead-letter messages of a batch, produced and flushed until the
broker has acknowledged every one (acks=all, idempotent producer). A retry of a whole batch is
harmless: messages are keyed by candid (at-least-once: a retry may duplicate a message in the
output topic, never lose one).

A *permanent* produce error (the broker or the client refuses the message itself: too large,
invalid) is not retried, since it would fail forever and stall the partition: the message goes to
the dead-letter topic instead (value cut to ``dead_letter_max_bytes``, reason ``produce_rejected``),
and a dead letter that is itself refused is logged and counted, then dropped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from consumer.clients import produce
from consumer.retry import SinkError

log = logging.getLogger("stampstream.consumer")

PERMANENT_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError._INVALID_ARG,
})  # fmt: skip


@dataclass
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]] | None = None


class KafkaSink:
    """Produce a batch and wait until the broker has acknowledged all of it."""

    def __init__(
        self, producer: Producer, dead_letter_topic: str = "", dead_letter_max_bytes: int = 900_000,
        on_rejected: Callable[[str], None] = lambda _where: None,
    ) -> None:  # fmt: skip
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.on_rejected = on_rejected  # counts a permanently refused message ("output" / "dead_letter")

    def send(self, messages: Sequence[Outgoing], flush_timeout_s: float) -> None:
        """Raises SinkError with the failed messages (only those are retried by the caller)."""
        failed: list[Outgoing] = []
        rejected: list[tuple[Outgoing, str]] = []
        errors: list[str] = []

        def on_delivery(index: int) -> Callable[[KafkaError | None, Any], None]:
            def cb(err: KafkaError | None, _msg: Any) -> None:
                if err is None:
                    return
                if err.code() in PERMANENT_ERRORS:
                    rejected.append((messages[index], str(err)))
                else:
                    failed.append(messages[index])
                    errors.append(str(err))

            return cb

        for i, m in enumerate(messages):
            try:
                produce(self.producer, m.topic, m.value, m.key, m.headers, on_delivery(i))
            except KafkaException as e:  # refused by the client at once (e.g. larger than message.max.bytes)
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is None or err.code() not in PERMANENT_ERRORS:
                    raise SinkError(f"produce failed: {e}") from e
                rejected.append((m, str(err)))
        remaining = self.producer.flush(flush_timeout_s)
        if remaining:
            raise SinkError(f"{remaining} message(s) not acknowledged within {flush_timeout_s}s")
        if rejected:
            self._dead_letter(rejected, flush_timeout_s)
        if failed:
            raise SinkError(f"{len(failed)} message(s) failed: {errors[0]}", failed=failed)

    def _dead_letter(self, rejected: list[tuple[Outgoing, str]], flush_timeout_s: float) -> None:
        again: list[Outgoing] = []
        for m, why in rejected:
            log.error("message to %s refused for good (%s): key=%s size=%d", m.topic, why, m.key[:64], len(m.value))
            if m.topic == self.dead_letter_topic or not self.dead_letter_topic:
                self.on_rejected("dead_letter")  # nothing left to try: counted and dropped
                continue
            self.on_rejected("output")
            headers: list[tuple[str, str | bytes | None]] = [
                ("reason", b"produce_rejected"), ("error", why[:1000].encode()), ("source_topic", m.topic.encode()),
                ("original_size", str(len(m.value)).encode()),
            ]  # fmt: skip
            value = m.value
            if len(value) > self.dead_letter_max_bytes:
                headers.append(("truncated", b"1"))
                value = value[: self.dead_letter_max_bytes]
            again.append(Outgoing(self.dead_letter_topic, m.key, value, headers))
        if again:
            self.send(again, flush_timeout_s)
