"""The consumer daemon's main loop:

    consume -> decode -> cutouts + features -> batch -> infer -> publish (Kafka, Redis) -> flush -> commit

Pipelining, explained once. Three batches can be in hand at a time, each at its own stage:

* batch N+1 is consumed and decoded on the main thread, then queued to the model worker;
* batch N is inferring on the worker thread (torch releases the GIL), queued before N+1;
* batch N-1 has been acknowledged by Kafka and sent to Redis; its Redis answer is outstanding.

One turn of ``run`` does, in this order: gather N+1 and decode it, queue it for inference,
**confirm** N-1 (read Redis' answer, commit its offsets), **publish** N (wait for its inference,
send it to Redis, produce it to Kafka and flush). So Redis works while the next batch is decoded,
the model works while the previous batch is published, and commits stay in offset order. When
the stream is quiet, everything in hand is finished at once; with ``batching.pipeline: false``
each batch goes through all stages before the next is consumed.

Surveys: each message is decoded by its own survey's decoder (ZTF's Avro container or Rubin's
0x00 wire form, told apart by its first bytes: ``alerts.message.decode_any``), and in
``start_inference`` each survey's rows go to its own bundle; results keep the messages' order.

Python-level work stays on the main thread: split across threads it only queues for the GIL
(measured: cutouts on the worker cost 1.6x their CPU time in waiting).

Offsets are committed only after the producer has flushed the batch (output and dead-letter
messages acknowledged) and Redis has acknowledged it. While a sink fails, the partitions are
paused and the write is retried with backoff (``consumer/retry.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.message import is_rubin
from alerts.rubin import SURVEY as RUBIN
from alerts.rubin import RubinSchemaCache, SchemaLookup
from alerts.rubin_schemas import wire_schema_id
from config import ConsumerConfig
from consumer.batches import (
    DecodedBatch,
    GoodAlert,
    InFlight,
    ModelMeta,
    Outputs,
    Published,
    Source,
    build_results,
    dead_letter,
)
from consumer.decoding import DecodePool, Outcome, decode_one, hang_guard
from consumer.inference import ModelRunner
from consumer.kafka_sink import KafkaSink, Outgoing
from consumer.metrics import Metrics
from consumer.redis_sink import RedisSink
from consumer.results import ResultEncoder
from consumer.retry import AbortRequested, RetryWithPause
from consumer.stats import Counters, RunStats

__all__ = ["AbortRequested", "StreamProcessor"]

log = logging.getLogger("stampstream.consumer")


class NoModelForSurvey(BadAlertError):
    """A good alert of a survey this consumer has no bundle for (``rubin.bundle_path`` unset): a
    dead letter, to be replayed once one is configured."""

    reason = "no_model_for_survey"


class NeverAssigned(RuntimeError):
    """No partition was assigned within the join timeout: a run that reads nothing must not
    report success (``consumer run`` exits 2)."""


class StreamProcessor:
    JOIN_TIMEOUT_S = 60.0

    def __init__(
        self,
        cfg: ConsumerConfig,
        consumer: Consumer,
        kafka_sink: KafkaSink,
        redis_sink: RedisSink,
        runner: ModelRunner,
        metrics: Metrics,
        sleep: Callable[[float], None] = time.sleep,
        rubin_runner: ModelRunner | None = None,
        rubin_schemas: SchemaLookup | None = None,
        isolate_batches: int = 0,
    ) -> None:
        """``runner``: ZTF's bundle; ``rubin_runner``: Rubin's (None: Rubin alerts are dead
        letters); ``rubin_schemas``: Rubin schema id -> schema (the registry with its fallback;
        default: the packaged schemas); ``isolate_batches``: decode the first batches in a worker
        process (after a predecessor's hard death, consumer/crash_marker.py)."""
        self.cfg = cfg
        self.consumer = consumer
        self.kafka_sink = kafka_sink
        self.redis_sink = redis_sink
        self.runner = runner
        self.rubin_runner = rubin_runner
        self.metrics = metrics
        self.counters = Counters(metrics)
        self.schemas = SchemaCache(cfg.decoding)
        self.rubin_schemas = RubinSchemaCache(cfg.decoding, rubin_schemas)
        self.encoder = ResultEncoder()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self.retry = RetryWithPause(
            consumer, cfg.batching.retry_initial_s, cfg.batching.retry_max_s, self._abort, sleep,
            on_retry=self.counters.sink_retry, on_paused=self.counters.paused,
        )  # fmt: skip
        self._revoked: set[tuple[str, int]] = set()
        self._assigned_at: float | None = None
        self._last_progress = time.monotonic()
        self._last_lag = 0.0
        self._progress_mark = (time.monotonic(), 0)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        workers = cfg.batching.decode_workers
        timeout = cfg.batching.decode_timeout_s
        self.decode_pool = DecodePool(workers, cfg.decoding, timeout_s=timeout) if workers > 0 else None
        self._isolate_left = isolate_batches if self.decode_pool is None else 0
        self._isolation: DecodePool | None = None

    @property
    def stats(self) -> RunStats:
        return self.counters.stats

    # -- control -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """First call: finish the batches in hand, commit, exit. Second call: abort sink retries."""
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
        """Until stopped, ``max_alerts`` messages were read, or (``idle_exit_s``) the consumer is
        caught up: every assigned partition at its high watermark and no message for
        ``idle_exit_s`` seconds. Raises NeverAssigned if no partition came within
        JOIN_TIMEOUT_S. See the module docstring for the order of the stages."""
        start = last_message = time.monotonic()
        self._model_info()
        inferring: InFlight | None = None  # batch N
        awaiting_redis: Published | None = None  # batch N-1
        while not self._stop.is_set():
            self.metrics.beat()
            remaining = None if max_alerts is None else max_alerts - self.stats.alerts_in
            if remaining is not None and remaining <= 0:
                break
            with self.counters.timed("consume"):
                messages = self.gather(remaining)
            now = time.monotonic()
            if messages:
                last_message = now
                self.counters.arrived()
                queued = self.start_inference(self.decode_batch(messages))  # batch N+1
                if awaiting_redis is not None:
                    self.confirm(awaiting_redis)
                awaiting_redis = self.publish(inferring) if inferring is not None else None
                inferring = queued
                if not self.cfg.batching.pipeline:
                    self.finish(inferring, awaiting_redis)
                    inferring = awaiting_redis = None
            else:  # never hold results back while the stream is quiet
                self.finish(inferring, awaiting_redis)
                inferring = awaiting_redis = None
                if idle_exit_s is not None:
                    if self._assigned_at is None and now - start > self.JOIN_TIMEOUT_S:
                        raise NeverAssigned(f"no partition assigned within {self.JOIN_TIMEOUT_S:.0f}s")
                    if self._idle_for(now, last_message) >= idle_exit_s and self._caught_up():
                        log.info("caught up and idle for %.1fs: exiting", self._idle_for(now, last_message))
                        break
            self._housekeeping(now)
        self.finish(inferring, awaiting_redis)
        self._worker.shutdown(wait=True)
        for pool in (self.decode_pool, self._isolation):
            if pool is not None:
                pool.close()
        self.stats.elapsed_s = time.monotonic() - start
        self._log_progress(force=True)
        return self.stats

    def gather(self, remaining: int | None) -> list[Message]:
        """Up to max_batch messages, closing max_wait_ms after the first one arrived. Messages of
        partitions revoked meanwhile are dropped unprocessed and uncommitted: their new owner reads
        them from the last committed offset."""
        b = self.cfg.batching
        limit = b.max_batch if remaining is None else min(b.max_batch, remaining)
        batch: list[Message] = []
        deadline = None
        while len(batch) < limit and not self._stop.is_set():
            # librdkafka's consume() waits for num_messages or the timeout: the first call asks for
            # one message, so the batch's clock starts when the first one arrives, not up to 0.5 s
            # later with hundreds already waiting (measured: at 500 alerts/s batches of ~410 and a
            # p50 latency of 1.5 s instead of ~0.5, bench/latency.py).
            if deadline is None:
                got = self.consumer.consume(num_messages=1, timeout=0.5)
            else:
                got = self.consumer.consume(num_messages=limit - len(batch), timeout=max(0.0, deadline - time.monotonic()))
            if got:
                batch.extend(got)
                if deadline is None:
                    deadline = time.monotonic() + b.max_wait_ms / 1000.0
            if deadline is None or time.monotonic() >= deadline:
                break
        if self._revoked:
            batch = [m for m in batch if (m.topic(), m.partition()) not in self._revoked]
        return batch

    def decode_batch(self, messages: Sequence[Message]) -> DecodedBatch:
        """decode + cutouts + features; a bad message becomes a dead letter right here."""
        out = DecodedBatch(size=len(messages))
        items: list[tuple[Source, bytes | None]] = []
        with self.counters.timed("decode"):
            for m in messages:
                if m.error() is not None:
                    self.counters.kafka_error()
                    log.warning("kafka error event on %s[%s]: %s", m.topic(), m.partition(), m.error())
                    continue
                src = Source(m.topic() or "", m.partition() or 0, m.offset() or 0)
                key = (src.topic, src.partition)
                out.offsets[key] = max(out.offsets.get(key, -1), src.offset)
                items.append((src, m.value()))
            for (src, value), o in zip(items, self._decode_values([v for _, v in items]), strict=True):
                if not isinstance(o, BadAlertError) and o[0].survey == RUBIN and self.rubin_runner is None:
                    o = NoModelForSurvey("a Rubin alert, and no Rubin bundle is configured", candid=o[0].candid)
                if isinstance(o, BadAlertError):
                    out.outgoing.append(self._dead(value, src, o))
                else:
                    out.good.append(GoodAlert(*o, src))
        self.counters.messages_in(len(items))
        self.counters.batch_gathered(len(messages))
        return out

    def _decode_values(self, values: list[bytes | None]) -> list[Outcome]:
        """In this process, or in the decode workers (consumer/decoding.py): always with
        ``decode_workers``, for the first batches after a predecessor died mid-run. A Rubin
        message goes to the workers with its writer schema, looked up here; one refused by its
        header or its schema alone is refused here."""
        pool = self.decode_pool or self._isolation_pool()
        if pool is None:
            return self._decode_here(values)
        there, schemas, here = [], [], []
        for i, v in enumerate(values):
            schema = None
            if is_rubin(v):
                try:
                    schema = self._rubin_schema(v)
                except BadAlertError:  # refused by its header or schema alone: as safe to refuse here
                    here.append(i)
                    continue
            there.append(i)
            schemas.append(schema)
        got: list[Outcome] = [None] * len(values)  # type: ignore[list-item]  # every row is set below
        try:
            pooled = pool.decode([values[i] for i in there], self.metrics.beat, schemas)
        except OSError as e:  # no room in /dev/shm for this batch's messages: decode them here
            log.warning("decode workers unavailable for this batch (%s): decoding in the main process", e)
            pooled = self._decode_here([values[i] for i in there])
        for i, o in zip(there, pooled, strict=True):
            got[i] = o
        for i, o in zip(here, self._decode_here([values[i] for i in here]), strict=True):
            got[i] = o
        return got

    def _rubin_schema(self, value: bytes | None) -> tuple[int, bytes]:
        """A Rubin message's schema id and writer schema, from the registry or the package: I/O
        with its own timeout and rate limit (consumer/schema_registry.py), cached once compiled.
        Its header only, never its body. BadAlertError where the header or the schema is refused."""
        schema_id = wire_schema_id(value or b"")
        return schema_id, self.rubin_schemas.plan(schema_id).schema_json

    def _decode_here(self, values: list[bytes | None]) -> list[Outcome]:
        """Decode in this process, under ``hang_guard``: a message that hangs the decoder ends the
        process after ``batching.decode_timeout_s``, and the restart decodes it in a worker. Rubin
        schemas are looked up first, outside the guard: a slow registry is not a hung decoder."""
        for v in values:
            if is_rubin(v):
                with suppress(BadAlertError):  # refused again below, without a second request
                    self._rubin_schema(v)
        outcomes = []
        with hang_guard(self.cfg.batching.decode_timeout_s):
            for v in values:
                self.metrics.beat()  # per message: a slow message must not look like a dead loop
                outcomes.append(decode_one(v, self.schemas, self.rubin_schemas))
        return outcomes

    def _isolation_pool(self) -> DecodePool | None:
        """The worker for the first ``isolate_batches`` batches (then closed), or None."""
        if self._isolate_left <= 0:
            if self._isolation is not None:
                self._isolation.close()
                self._isolation = None
                log.info("decoding in the main process again")
            return None
        if self._isolation is None:
            log.warning("decoding the next %d batches in a worker process: a message that kills or hangs it becomes a dead letter",
                        self._isolate_left)  # fmt: skip
            self._isolation = DecodePool(1, self.cfg.decoding, timeout_s=self.cfg.batching.decode_timeout_s)
        self._isolate_left -= 1
        return self._isolation

    def start_inference(self, decoded: DecodedBatch) -> InFlight:
        """Queue the batch to the model worker: each survey's alerts to its own bundle. The models
        are taken once here, so a hot reload never mixes two models (or two class lists) within
        one batch."""
        good = decoded.good
        runners = [(self.runner, [i for i, g in enumerate(good) if g.alert.survey != RUBIN])]
        if self.rubin_runner is not None:
            runners.append((self.rubin_runner, [i for i, g in enumerate(good) if g.alert.survey == RUBIN]))
        jobs = []
        metas: list[ModelMeta] = [None] * len(good)  # type: ignore[list-item]  # every row is set below
        for runner, rows in runners:
            if not rows:
                continue
            model, meta = runner.snapshot()
            for i in rows:
                metas[i] = meta
            pixels = np.stack([good[i].stamp.pixels for i in rows])
            features = np.stack([good[i].features for i in rows])
            jobs.append((runner, model, rows, pixels, features))
        if not jobs:
            return InFlight(decoded, metas, None)

        def infer() -> Outputs:
            with self.counters.timed("infer"):
                if len(jobs) == 1 and len(jobs[0][2]) == len(good):  # one survey: the arrays as they come
                    runner, model, _rows, pixels, features = jobs[0]
                    zz, ss, pp = runner.predict(pixels, features, model)
                    return zz, ss, pp  # arrays: row i is good[i]
                z: list[np.ndarray] = [np.zeros(0, np.float32)] * len(good)
                sp, p = list(z), list(z)
                for runner, model, rows, pixels, features in jobs:
                    zz, ss, pp = runner.predict(pixels, features, model)
                    for k, i in enumerate(rows):
                        z[i], sp[i], p[i] = zz[k], ss[k], pp[k]
                return z, sp, p

        if self.cfg.batching.pipeline:
            return InFlight(decoded, metas, self._worker.submit(infer))
        done: Future[Outputs] = Future()
        done.set_result(infer())
        return InFlight(decoded, metas, done)

    def publish(self, job: InFlight) -> Published:
        """(wait for inference) -> send the batch to Redis -> produce to Kafka and flush. Redis'
        answer is read later by ``confirm``; a Kafka failure is retried here, partitions paused."""
        decoded = job.decoded
        results = []
        if job.future is not None:
            with self.counters.timed("infer_wait"):
                z, stamp_probs, probs = job.future.result()
            results = build_results(decoded.good, z, stamp_probs, probs, job.metas, int(time.time() * 1000))
        cfg = self.cfg.kafka
        with self.counters.timed("encode"):
            outgoing = decoded.outgoing + [
                Outgoing(cfg.output_topic, str(r.candid).encode(), self.encoder.encode(r)) for r in results
            ]
        with self.counters.timed("publish_redis"):
            request = self.redis_sink.send(results)
        try:
            with self.counters.timed("publish_kafka"):
                self.retry("kafka", lambda pending: self.kafka_sink.send(pending, cfg.flush_timeout_s), outgoing)
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

        with self.counters.timed("publish_redis"):
            self.retry("redis", write_redis, [None])
        with self.counters.timed("commit"):
            self.commit(pub.offsets)
        by_survey: dict[str, int] = {}
        for r in pub.results:
            by_survey[r.survey] = by_survey.get(r.survey, 0) + 1
        self.counters.batch_done(len(pub.results), by_survey)

    def finish(self, inferring: InFlight | None, awaiting_redis: Published | None) -> None:
        """Everything in hand through to the commit, oldest first."""
        if awaiting_redis is not None:
            self.confirm(awaiting_redis)
        if inferring is not None:
            self.confirm(self.publish(inferring))

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit the next offset of each partition, synchronously. Partitions revoked since the
        batch was read are left out: their new owner starts from their last commit
        (at-least-once; Redis writes are idempotent)."""
        tps = [TopicPartition(t, p, o + 1) for (t, p), o in offsets.items() if (t, p) not in self._revoked]
        if not tps:
            return
        try:
            self.consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as e:
            self.counters.commit_failed()
            log.warning("offset commit failed (messages will be redelivered): %s", e)
            return
        self.counters.committed()

    # -- helpers -------------------------------------------------------------------------------
    def _dead(self, value: bytes | None, src: Source, err: BadAlertError) -> Outgoing:
        self.counters.dead_letter(err.reason)
        log.warning(
            "dead letter: %s reason=%s topic=%s partition=%d offset=%d candid=%s: %s",
            type(err).__name__, err.reason, src.topic, src.partition, src.offset, err.candid, err,
        )  # fmt: skip
        return dead_letter(value, src, err, self.cfg.kafka.dead_letter_max_bytes, self.cfg.kafka.dead_letter_topic)

    def _idle_for(self, now: float, last_message: float) -> float:
        """Seconds without a message since the later of the last message and the last assignment
        (0 before any assignment)."""
        if self._assigned_at is None:
            return 0.0
        return now - max(last_message, self._assigned_at)

    def _caught_up(self) -> bool:
        """Every assigned partition read to its high watermark (asked of the broker). Where this
        run has read nothing yet (no position), the group's committed offset says how far it is:
        a run started on a topic its group had already drained (a restart after the last batch, a
        backfill run again) is caught up at once, where it used to wait for messages that never
        come (found by bench/night.py --kill-at)."""
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return False
            positions = self.consumer.position(assignment)
            unread = [tp for tp in positions if tp.offset < 0]
            if unread:
                done = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(unread, timeout=5.0)}
                positions = [tp if tp.offset >= 0 else TopicPartition(tp.topic, tp.partition, done[(tp.topic, tp.partition)])
                             for tp in positions]  # fmt: skip
            for tp in positions:
                lo, hi = self.consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
                if hi > lo and tp.offset < hi:  # a negative offset: neither read nor committed yet
                    return False
            return True
        except KafkaException as e:
            log.info("could not check the high watermarks: %s", e)
            return False

    def _housekeeping(self, now: float) -> None:
        if self.rubin_runner is not None:
            self._reload(self.rubin_runner)
        self._reload(self.runner)
        if now - self._last_lag >= self.cfg.metrics.lag_interval_s:
            self._last_lag = now
            self._update_lag()
        self._log_progress()

    def _reload(self, runner: ModelRunner) -> None:
        outcome = runner.maybe_reload()
        if outcome.changed:
            if outcome.ok:
                self.metrics.model_info.clear()
                self._model_info()
            else:
                self.metrics.model_reload_failures.inc()

    def _model_info(self) -> None:
        for runner in (self.runner, self.rubin_runner):
            if runner is not None:
                self.metrics.model_info.labels(runner.name, runner.version, runner.device.type).set(1)

    def _update_lag(self) -> None:
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            for tp in self.consumer.position(assignment):
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
        s = self.stats
        rate = (s.alerts_in - n0) / max(now - t0, 1e-9)
        self._last_progress = now
        self._progress_mark = (now, s.alerts_in)
        log.info(
            "progress: in=%d out=%d dead=%d batches=%d rate=%.0f/s model=%s:%s",
            s.alerts_in, s.alerts_out, s.dead_letters, s.batches, rate, self.runner.name, self.runner.version,
        )  # fmt: skip

