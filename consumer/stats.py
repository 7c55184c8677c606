"""The one place where the consumer's counters change: every event updates the run's own
statistics (``RunStats``, written by ``--stats-json``) and the Prometheus metrics together, so the
two can never disagree. Kafka error events (e.g. a partition EOF or a broker error delivered as a
message) are counted apart from input messages."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from consumer.metrics import Metrics


@dataclass
class RunStats:
    alerts_in: int = 0  # input messages (Kafka error events excluded)
    alerts_out: int = 0  # results acknowledged by both sinks
    dead_letters: int = 0
    kafka_errors: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    sink_retries: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_message_at: float | None = None  # wall clock, for throughput measurements
    last_batch_at: float | None = None
    # CPU seconds of the whole process (all threads) from the first message to the last batch
    cpu_s: float = 0.0
    dead_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    survey_out: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # alerts_out by survey


class Counters:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.stats = RunStats()
        self._cpu_at_first = 0.0

    def arrived(self) -> None:
        """A batch of messages arrived: the first one starts the throughput clocks."""
        if self.stats.first_message_at is None:
            self.stats.first_message_at = time.time()
            self._cpu_at_first = time.process_time()

    def messages_in(self, n: int) -> None:
        self.stats.alerts_in += n
        self.metrics.alerts_in.inc(n)

    def kafka_error(self) -> None:
        self.stats.kafka_errors += 1
        self.metrics.kafka_errors.inc()

    def batch_gathered(self, size: int) -> None:
        self.metrics.batch_size.observe(size)

    def dead_letter(self, reason: str) -> None:
        self.stats.dead_letters += 1
        self.stats.dead_reasons[reason] += 1
        self.metrics.dead_letters.labels(reason).inc()

    def batch_done(self, results: int, by_survey: dict[str, int] | None = None) -> None:
        now = time.time()
        self.stats.alerts_out += results
        self.stats.batches += 1
        self.stats.last_batch_at = now
        self.stats.cpu_s = time.process_time() - self._cpu_at_first
        self.metrics.alerts_out.inc(results)
        for survey, n in (by_survey or {}).items():
            self.stats.survey_out[survey] += n
            self.metrics.survey_alerts_out.labels(survey).inc(n)
        self.metrics.last_batch_time.set(now)

    def committed(self) -> None:
        self.stats.commits += 1
        self.metrics.commits.inc()

    def commit_failed(self) -> None:
        self.stats.commit_failures += 1
        self.metrics.commit_failures.inc()

    def sink_retry(self, sink: str) -> None:
        self.stats.sink_retries[sink] += 1
        self.metrics.sink_retries.labels(sink).inc()
        self.metrics.beat()  # a sink outage is not a dead loop

    def paused(self, on: bool) -> None:
        self.metrics.paused.set(1 if on else 0)

    def stage(self, name: str, seconds: float) -> None:
        self.stats.stage_s[name] += seconds  # float += under the GIL: safe from the worker thread
        self.metrics.stage_seconds.labels(name).observe(seconds)

    def timed(self, stage: str) -> StageTimer:
        return StageTimer(self, stage)


class StageTimer:
    __slots__ = ("counters", "stage", "t0")

    def __init__(self, counters: Counters, stage: str) -> None:
        self.counters = counters
        self.stage = stage
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        self.counters.stage(self.stage, time.perf_counter() - self.t0)
