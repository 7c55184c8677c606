"""The consumer daemon's main loop:

    consume -> decode -> cutouts -> batch -> infer -> publish (Kafka, Redis) -> flush -> commit

The model runs on a worker thread (torch releases the GIL): while it infers batch N+1, the main
thread publishes batch N, then consumes and decodes batch N+2. Python-level work stays on the main
thread: split across threads, it only queues for the GIL (measured: cutouts on the worker cost
1.6x their CPU time in waiting).

Offsets of a batch are committed only after the producer has flushed (output and dead-letter
messages acknowledged by the broker) and Redis has acknowledged the batch. Redis' answer is read
one iteration later, after the next batch is decoded, so the main thread never idles while Redis
runs the batch; at most three batches are in hand (one decoding, one inferring, one awaiting
Redis). While a sink fails, the partitions are paused and the write is retried with backoff, so
nothing is committed that is not in both sinks, and nothing piles up in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from config import Config
from consumer.alert_decoder import Alert, SchemaCache, decode_alert
from consumer.cutouts import StampPixels, stamp_pixels
from consumer.errors import BadAlertError
from consumer.inference import ModelRunner
from consumer.metrics import Metrics
from consumer.results import Result, ResultEncoder
from consumer.sinks import KafkaSink, Outgoing, RedisRequest, RedisSink, SinkError

log = logging.getLogger("stampstream.consumer")


@dataclass(frozen=True, slots=True)
class Source:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class GoodAlert:
    alert: Alert
    stamp: StampPixels
    source: Source


@dataclass
class RunStats:
    alerts_in: int = 0
    alerts_out: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_message_at: float | None = None  # wall clock, for throughput measurements
    last_batch_at: float | None = None
    # CPU seconds of the whole process (all threads) from the first message to the last batch
    cpu_s: float = 0.0
    dead_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def decode_message(value: bytes | None, schemas: SchemaCache) -> tuple[Alert, StampPixels]:
    """bytes -> (alert, raw crops); raises BadAlertError (named, with a reason) on bad input."""
    value = value or b""
    alert = decode_alert(value, schemas)
    try:
        return alert, stamp_pixels(alert.science, alert.difference, alert.xpos, alert.ypos)
    except BadAlertError as e:
        e.candid = alert.candid
        # The fast path found these stamps by their position; let the general path have the last word.
        full = decode_alert(value, schemas, fast=False)
        if full == alert:
            raise
    try:
        return full, stamp_pixels(full.science, full.difference, full.xpos, full.ypos)
    except BadAlertError as e:
        e.candid = full.candid
        raise


def dead_letter(value: bytes | None, src: Source, err: BadAlertError, max_bytes: int, topic: str) -> Outgoing:
    """The dead-letter message: the raw bytes (cut to max_bytes) and the reason in headers."""
    raw = value or b""
    headers = [
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


def build_results(
    good: Sequence[GoodAlert], z: np.ndarray, probs: np.ndarray, runner_meta: tuple[str, str, tuple[str, ...]], now_ms: int
) -> list[Result]:
    name, version, class_names = runner_meta
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
            class_names=class_names,
            model_name=name,
            model_version=version,
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


@dataclass
class DecodedBatch:
    size: int
    good: list[GoodAlert] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)  # dead letters so far
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset per partition


@dataclass
class InFlight:
    decoded: DecodedBatch
    meta: tuple[str, str, tuple[str, ...]]  # model name, version, classes at submission
    future: Future[tuple[np.ndarray, np.ndarray]] | None  # (embeddings, probabilities) of good


@dataclass
class Published:
    """A batch acknowledged by Kafka whose Redis write is sent but not yet acknowledged; its
    offsets are committed by ``confirm``. Holds only the results, not the messages."""

    results: list[Result]
    request: RedisRequest
    offsets: dict[tuple[str, int], int]


class AbortRequested(RuntimeError):
    """A second stop signal arrived while a sink was still failing: exit without committing."""


class StreamProcessor:
    def __init__(
        self,
        cfg: Config,
        consumer: Consumer,
        kafka_sink: KafkaSink,
        redis_sink: RedisSink,
        runner: ModelRunner,
        metrics: Metrics,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.kafka_sink = kafka_sink
        self.redis_sink = redis_sink
        self.runner = runner
        self.metrics = metrics
        self.sleep = sleep
        self.schemas = SchemaCache()
        self.encoder = ResultEncoder()
        self.stats = RunStats()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._revoked: set[tuple[str, int]] = set()
        self._assigned_at: float | None = None
        self._last_progress = time.monotonic()
        self._last_lag = 0.0
        self._progress_mark = (time.monotonic(), 0)
        self._cpu_at_first = 0.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    # -- control -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """First call: finish the batch in hand, commit, exit. Second call: abort sink retries."""
        if self._stop.is_set():
            self._abort.set()
        self._stop.set()

    def subscribe(self) -> None:
        def on_revoke(_c: Consumer, parts: list[TopicPartition]) -> None:
            self._revoked.update((p.topic, p.partition) for p in parts)

        def on_assign(_c: Consumer, parts: list[TopicPartition]) -> None:
            self._revoked.difference_update((p.topic, p.partition) for p in parts)
            self._assigned_at = time.monotonic()
            self.metrics.ready = True

        self.consumer.subscribe(list(self.cfg.kafka.input_topics), on_assign=on_assign, on_revoke=on_revoke)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, max_alerts: int | None = None, idle_exit_s: float | None = None) -> RunStats:
        """The loop. With ``batching.pipeline`` the inference of a batch runs on a worker thread:
        batch N+1 is queued to the worker before batch N is published, so the worker never waits
        for the sinks; the batch before (N-1) is confirmed (Redis' answer read, offsets
        committed) before N is published, so commits stay in order."""
        start = last_message = time.monotonic()
        self.metrics.model_info.labels(self.runner.name, self.runner.version, self.runner.device.type).set(1)
        in_flight: InFlight | None = None
        unconfirmed: Published | None = None
        while not self._stop.is_set():
            self.metrics.beat()
            remaining = None if max_alerts is None else max_alerts - self.stats.alerts_in
            if remaining is not None and remaining <= 0:
                break
            with self._timed("consume"):
                batch = self._gather(remaining)
            now = time.monotonic()
            if batch:
                last_message = now
                if self.stats.first_message_at is None:
                    self.stats.first_message_at = time.time()
                    self._cpu_at_first = time.process_time()
                job = self.start_inference(self.decode_batch(batch))  # queued behind in_flight
                if unconfirmed is not None:
                    self.confirm(unconfirmed)
                    unconfirmed = None
                if in_flight is not None:
                    unconfirmed = self.publish(in_flight)
                in_flight = job
                if not self.cfg.batching.pipeline:
                    self.finish_batch(in_flight)
                    in_flight = None
            else:  # never hold results back while the stream is quiet
                self._finish_all(in_flight, unconfirmed)
                in_flight = unconfirmed = None
                if idle_exit_s is not None and self._idle_for(now, last_message) >= idle_exit_s:
                    log.info("idle for %.1fs: exiting", self._idle_for(now, last_message))
                    break
            self._housekeeping(now)
        self._finish_all(in_flight, unconfirmed)
        self.stats.elapsed_s = time.monotonic() - start
        self._log_progress(force=True)
        return self.stats

    def _finish_all(self, in_flight: InFlight | None, unconfirmed: Published | None) -> None:
        if unconfirmed is not None:
            self.confirm(unconfirmed)
        if in_flight is not None:
            self.finish_batch(in_flight)

    def decode_batch(self, batch: Sequence[Message]) -> DecodedBatch:
        """consume -> decode -> cutouts; bad messages become dead letters right here."""
        out = DecodedBatch(size=len(batch))
        with self._timed("decode"):
            for m in batch:
                if m.error() is not None:
                    log.warning("kafka message error on %s[%s]: %s", m.topic(), m.partition(), m.error())
                    continue
                src = Source(m.topic(), m.partition(), m.offset())
                key = (src.topic, src.partition)
                out.offsets[key] = max(out.offsets.get(key, -1), src.offset)
                self.stats.alerts_in += 1
                value = m.value()
                try:
                    alert, stamp = decode_message(value, self.schemas)
                except BadAlertError as e:
                    out.outgoing.append(self._dead(value, src, e))
                    continue
                except Exception as e:  # a bug on odd input must not stop the stream either
                    err = BadAlertError(f"unexpected {type(e).__name__}: {e}", reason="unexpected")
                    out.outgoing.append(self._dead(value, src, err))
                    continue
                out.good.append(GoodAlert(alert, stamp, src))
        self.metrics.alerts_in.inc(len(batch))
        self.metrics.batch_size.observe(len(batch))
        return out

    def start_inference(self, decoded: DecodedBatch) -> InFlight:
        """Queue the batch to the inference worker, or infer it here without pipelining."""
        meta = (self.runner.name, self.runner.version, self.runner.class_names)
        if not decoded.good:
            return InFlight(decoded, meta, None)
        pixels = np.stack([g.stamp.pixels for g in decoded.good])
        if self.cfg.batching.pipeline:
            return InFlight(decoded, meta, self._worker.submit(self._predict, pixels))
        done: Future[tuple[np.ndarray, np.ndarray]] = Future()
        done.set_result(self._predict(pixels))
        return InFlight(decoded, meta, done)

    def _predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._timed("infer"):
            return self.runner.predict(pixels)

    def finish_batch(self, job: InFlight) -> None:
        """(wait for infer) -> publish Kafka and Redis -> commit, once both have acknowledged."""
        self.confirm(self.publish(job))

    def publish(self, job: InFlight) -> Published:
        """(wait for infer) -> send the Redis batch -> produce to Kafka and flush. The Redis batch
        is sent first so that Redis stores it while Kafka is flushed; its answer is read by
        ``confirm``. A Kafka failure is retried here, with the partitions paused."""
        decoded = job.decoded
        results: list[Result] = []
        if job.future is not None:
            with self._timed("infer_wait"):
                z, probs = job.future.result()
            results = build_results(decoded.good, z, probs, job.meta, int(time.time() * 1000))
        cfg = self.cfg.kafka
        with self._timed("encode"):
            outgoing = decoded.outgoing + [Outgoing(cfg.output_topic, str(r.candid).encode(), self.encoder.encode(r)) for r in results]
        with self._timed("publish_redis"):
            request = self.redis_sink.send(results)
        try:
            with self._timed("publish_kafka"):
                self._retry("kafka", lambda pending: self.kafka_sink.send(pending, cfg.flush_timeout_s), outgoing)
        except BaseException:
            self.redis_sink.abandon(request)
            raise
        return Published(results, request, decoded.offsets)

    def confirm(self, pub: Published) -> None:
        """Read Redis' answer (retrying the write while it fails), then commit the offsets."""
        sent = [pub.request]

        def write_redis(_pending: list[None]) -> None:  # the sent request first, then fresh writes
            if sent:
                self.redis_sink.wait(sent.pop())
            else:
                self.redis_sink.write(pub.results)

        with self._timed("publish_redis"):
            self._retry("redis", write_redis, [None])
        with self._timed("commit"):
            self._commit(pub.offsets)
        self.stats.alerts_out += len(pub.results)
        self.stats.batches += 1
        self.metrics.alerts_out.inc(len(pub.results))
        self.metrics.last_batch_time.set(time.time())
        self.stats.last_batch_at = time.time()
        self.stats.cpu_s = time.process_time() - self._cpu_at_first

    JOIN_GRACE_S = 30.0

    def _idle_for(self, now: float, last_message: float) -> float:
        """Seconds without a message since the later of the last message and the last assignment;
        joining the group (before any assignment) gets a grace of JOIN_GRACE_S."""
        if self._assigned_at is None:
            return now - last_message - self.JOIN_GRACE_S
        return now - max(last_message, self._assigned_at)

    def _gather(self, remaining: int | None) -> list[Message]:
        """Up to max_batch messages, closing max_wait_ms after the first one arrived."""
        b = self.cfg.batching
        limit = b.max_batch if remaining is None else min(b.max_batch, remaining)
        batch: list[Message] = []
        deadline = None
        while len(batch) < limit and not self._stop.is_set():
            timeout = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            got = self.consumer.consume(num_messages=limit - len(batch), timeout=timeout)
            if got:
                batch.extend(got)
                if deadline is None:
                    deadline = time.monotonic() + b.max_wait_ms / 1000.0
            if deadline is None or time.monotonic() >= deadline:
                break
        if self._revoked:
            # Partitions taken away during the gather: drop their messages unprocessed and
            # uncommitted; their new owner reads them from the last committed offset.
            batch = [m for m in batch if (m.topic(), m.partition()) not in self._revoked]
        return batch

    # -- helpers -------------------------------------------------------------------------------
    def _dead(self, value: bytes | None, src: Source, err: BadAlertError) -> Outgoing:
        self.stats.dead_letters += 1
        self.stats.dead_reasons[err.reason] += 1
        self.metrics.dead_letters.labels(err.reason).inc()
        log.warning(
            "dead letter: %s reason=%s topic=%s partition=%d offset=%d candid=%s: %s",
            type(err).__name__, err.reason, src.topic, src.partition, src.offset, err.candid, err,
        )  # fmt: skip
        return dead_letter(value, src, err, self.cfg.kafka.dead_letter_max_bytes, self.cfg.kafka.dead_letter_topic)

    def _retry(self, sink: str, write: Callable[[list[Any]], None], items: list[Any]) -> None:
        """Write until the sink acknowledges; pause the partitions while it does not."""
        pending = list(items)
        delay = self.cfg.batching.retry_initial_s
        paused: list[TopicPartition] = []
        try:
            while pending:
                try:
                    write(pending)
                    return
                except SinkError as e:
                    pending = list(getattr(e, "failed", pending))
                    self.metrics.sink_retries.labels(sink).inc()
                    if self._abort.is_set():
                        raise AbortRequested(f"{sink} still failing at shutdown: {e}") from e
                    if not paused:
                        paused = self.consumer.assignment()
                        self.consumer.pause(paused)
                        self.metrics.paused.set(1)
                    log.warning("%s sink failed (%s); retrying in %.1fs, partitions paused", sink, e, delay)
                    self.metrics.beat()
                    self.sleep(delay)
                    delay = min(delay * 2, self.cfg.batching.retry_max_s)
        finally:
            if paused:
                try:
                    self.consumer.resume(paused)
                except KafkaException as e:  # partitions may have been revoked meanwhile
                    log.info("resume after retry: %s", e)
                self.metrics.paused.set(0)

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets:
            return
        tps = [TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()]
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            # E.g. partitions revoked while a sink was retried: the results are in both sinks, the
            # new owner will process these messages again (at-least-once; Redis is idempotent).
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (messages will be redelivered): %s", e)
            return
        self.stats.commits += 1
        self.metrics.commits.inc()

    def _timed(self, stage: str) -> _StageTimer:
        return _StageTimer(self, stage)

    def _housekeeping(self, now: float) -> None:
        outcome = self.runner.maybe_reload()
        if outcome.changed:
            if outcome.ok:
                self.metrics.model_info.clear()
                self.metrics.model_info.labels(self.runner.name, self.runner.version, self.runner.device.type).set(1)
            else:
                self.metrics.model_reload_failures.inc()
        if now - self._last_lag >= self.cfg.metrics.lag_interval_s:
            self._last_lag = now
            self._update_lag()
        self._log_progress()

    def _update_lag(self) -> None:
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            positions = self.consumer.position(assignment)
            for tp in positions:
                _lo, hi = self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
                if tp.offset >= 0:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, hi - tp.offset))
        except KafkaException as e:
            log.debug("lag update failed: %s", e)

    def _log_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.cfg.metrics.progress_interval_s:
            return
        t0, n0 = self._progress_mark
        rate = (self.stats.alerts_in - n0) / max(now - t0, 1e-9)
        self._last_progress = now
        self._progress_mark = (now, self.stats.alerts_in)
        log.info(
            "progress: in=%d out=%d dead=%d batches=%d rate=%.0f/s model=%s:%s",
            self.stats.alerts_in, self.stats.alerts_out, self.stats.dead_letters, self.stats.batches,
            rate, self.runner.name, self.runner.version,
        )  # fmt: skip


class _StageTimer:
    __slots__ = ("proc", "stage", "t0")

    def __init__(self, proc: StreamProcessor, stage: str) -> None:
        self.proc = proc
        self.stage = stage
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        dt = time.perf_counter() - self.t0
        self.proc.stats.stage_s[self.stage] += dt  # float += under the GIL: safe from the worker
        self.proc.metrics.stage_seconds.labels(self.stage).observe(dt)
