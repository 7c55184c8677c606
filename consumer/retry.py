"""Retry-with-pause: write to a sink until it acknowledges, with the input partitions paused
meanwhile, so that nothing is committed that is not in both sinks and nothing piles up in memory.

Retries go on forever (exponential backoff between configured bounds): giving up would mean either
losing results or committing unprocessed offsets. A second stop signal ends the retries
(``AbortRequested``): the process exits without committing, and the batch is redelivered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaException, TopicPartition

log = logging.getLogger("stampstream.consumer")


class SinkError(RuntimeError):
    """A sink did not acknowledge every write of a batch; the batch is retried, offsets not
    committed. ``failed`` holds the items still to write when only some failed (else None)."""

    def __init__(self, message: str, failed: Sequence[Any] | None = None) -> None:
        super().__init__(message)
        self.failed = failed


class AbortRequested(RuntimeError):
    """A second stop signal arrived while a sink was still failing: exit without committing."""


class Pausable(Protocol):
    def assignment(self) -> list[TopicPartition]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...


class RetryWithPause:
    def __init__(
        self,
        consumer: Pausable,
        initial_s: float,
        max_s: float,
        abort: threading.Event,
        sleep: Callable[[float], None],
        on_retry: Callable[[str], None],
        on_paused: Callable[[bool], None],
    ) -> None:
        self.consumer = consumer
        self.initial_s = initial_s
        self.max_s = max_s
        self.abort = abort
        self.sleep = sleep
        self.on_retry = on_retry  # counts a retry of the named sink (and beats the health check)
        self.on_paused = on_paused

    def __call__(self, sink: str, write: Callable[[list[Any]], None], items: Sequence[Any]) -> None:
        """``write(pending)`` until it returns; on SinkError retry what is still pending."""
        pending = list(items)
        delay = self.initial_s
        paused: list[TopicPartition] = []
        try:
            while pending:
                try:
                    write(pending)
                    return
                except SinkError as e:
                    if e.failed is not None:
                        pending = list(e.failed)
                    self.on_retry(sink)
                    if self.abort.is_set():
                        raise AbortRequested(f"{sink} still failing at shutdown: {e}") from e
                    if not paused:
                        paused = self.consumer.assignment()
                        self.consumer.pause(paused)
                        self.on_paused(True)
                    log.warning("%s sink failed (%s); retrying in %.1fs, partitions paused", sink, e, delay)
                    self.sleep(delay)
                    delay = min(delay * 2, self.max_s)
        finally:
            if paused:
                try:
                    self.consumer.resume(paused)
                except KafkaException as e:  # partitions may have been revoked meanwhile
                    log.info("resume after retry: %s", e)
                self.on_paused(False)
