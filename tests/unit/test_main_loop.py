"""The main loop, driven with real ``confluent_kafka.Message`` objects and in-memory sinks: commit
only after both sinks acknowledged, pause/resume while a sink fails, partitions revoked with
batches in flight, a stop signal mid-batch, and counters that agree with the metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import KafkaError, Message, TopicPartition

from alerts.message import warm_up
from alerts.synthetic import make_alert
from config import parse_consumer_config
from consumer.batches import ModelMeta
from consumer.daemon import StreamProcessor
from consumer.inference import ReloadOutcome
from consumer.kafka_sink import Outgoing
from consumer.metrics import Metrics
from consumer.results import decode_result
from consumer.retry import AbortRequested, SinkError

TOPIC = "in"
OUT = "out"
DLQ = "dlq"
START = 2_600_000_000_000_000_000


@pytest.fixture(scope="module")
def alerts() -> list[bytes]:
    # The decoder compiled first, as `consumer run` does before its loop (consumer/cli.py): a first
    # compilation (seconds, more on a busy machine) must not count on the hang guard's clock.
    warm_up()
    return [make_alert(START + i).message for i in range(24)]


class FakeConsumer:
    """The part of confluent_kafka.Consumer the loop uses, over a list of Messages."""

    def __init__(self, messages: list[Message], partitions: list[int]) -> None:
        self.queue = list(messages)
        self.parts = [TopicPartition(TOPIC, p) for p in partitions]
        self.paused: list[list[TopicPartition]] = []
        self.resumed: list[list[TopicPartition]] = []
        self.commits: list[list[TopicPartition]] = []
        self.on_commit: Callable[[list[TopicPartition]], None] = lambda _tps: None
        self.before_consume: Callable[[int], None] = lambda _n: None
        self.consume_calls = 0
        self._on_assign: Any = None
        self._on_revoke: Any = None

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any) -> None:
        assert topics == [TOPIC]
        self._on_assign, self._on_revoke = on_assign, on_revoke
        on_assign(self, self.parts)

    def revoke(self, partition: int) -> None:
        gone = [tp for tp in self.parts if tp.partition == partition]
        self.parts = [tp for tp in self.parts if tp.partition != partition]
        self._on_revoke(self, gone)

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.consume_calls += 1
        self.before_consume(self.consume_calls)
        if not self.queue:
            time.sleep(min(timeout, 0.005))
            return []
        got, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return got

    def assignment(self) -> list[TopicPartition]:
        return list(self.parts)

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused.append(parts)

    def resume(self, parts: list[TopicPartition]) -> None:
        self.resumed.append(parts)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        assert asynchronous is False
        self.on_commit(offsets)
        self.commits.append(offsets)

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return parts

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return parts

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, 0


class FakeKafkaSink:
    def __init__(self) -> None:
        self.acked: list[Outgoing] = []
        self.fail_next = 0
        self.on_send: Callable[[], None] = lambda: None

    def send(self, messages: list[Outgoing], flush_timeout_s: float) -> None:
        self.on_send()
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("broker down")
        self.acked.extend(messages)


@dataclass
class FakeRequest:
    results: list[Any]
    sent: bool = True


@dataclass
class FakeRedisSink:
    stored: dict[int, Any] = field(default_factory=dict)
    fail_next: int = 0
    abandoned: int = 0

    def send(self, results: list[Any]) -> FakeRequest:
        return FakeRequest(list(results))

    def wait(self, request: FakeRequest) -> None:
        if not request.results:
            return
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("redis down")
        for r in request.results:
            self.stored[r.candid] = r

    def write(self, results: list[Any]) -> None:
        self.wait(self.send(results))

    def abandon(self, request: FakeRequest) -> None:
        self.abandoned += 1


class FakeRunner:
    name, version = "fake", "1"
    class_names = ("AGN", "SN", "VS", "asteroid", "bogus")
    device = torch.device("cpu")

    def snapshot(self) -> tuple[None, ModelMeta]:
        return None, ModelMeta(self.name, self.version, self.class_names)

    def predict(self, pixels: np.ndarray, features: np.ndarray, model: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(pixels)
        assert features.shape[0] == n
        return np.zeros((n, 4), np.float32), np.full((n, 5), 0.2, np.float32), np.full((n, 5), 0.2, np.float32)

    def maybe_reload(self) -> ReloadOutcome:
        return ReloadOutcome(False, True)


def messages(values: list[bytes], partitions: int = 2) -> list[Message]:
    """Round-robin over partitions, offsets counting per partition, like a topic would."""
    next_offset = [0] * partitions
    out = []
    for i, v in enumerate(values):
        p = i % partitions
        out.append(Message(topic=TOPIC, partition=p, offset=next_offset[p], value=v))
        next_offset[p] += 1
    return out


@dataclass
class Harness:
    proc: StreamProcessor
    consumer: FakeConsumer
    kafka: FakeKafkaSink
    redis: FakeRedisSink
    sleeps: list[float]
    metrics: Metrics

    def output_candids(self) -> set[int]:
        return {decode_result(o.value)["candid"] for o in self.kafka.acked if o.topic == OUT}

    def dead(self) -> list[Outgoing]:
        return [o for o in self.kafka.acked if o.topic == DLQ]


def harness(msgs: list[Message], pipeline: bool = True, max_batch: int = 4, partitions: int = 2,
            decode_workers: int = 0) -> Harness:  # fmt: skip
    cfg = parse_consumer_config({
        "kafka": {"input_topics": [TOPIC], "output_topic": OUT, "dead_letter_topic": DLQ},
        "batching": {"max_batch": max_batch, "max_wait_ms": 0, "pipeline": pipeline, "retry_initial_s": 0.01,
                     "decode_workers": decode_workers},
        "metrics": {"port": 0, "lag_interval_s": 3600},
    })  # fmt: skip
    consumer = FakeConsumer(msgs, list(range(partitions)))
    kafka, redis_sink, sleeps, metrics = FakeKafkaSink(), FakeRedisSink(), [], Metrics()
    proc = StreamProcessor(cfg, consumer, kafka, redis_sink, FakeRunner(), metrics, sleep=sleeps.append)  # type: ignore[arg-type]
    proc.subscribe()
    return Harness(proc, consumer, kafka, redis_sink, sleeps, metrics)


def check_commits_follow_both_sinks(h: Harness, msgs: list[Message], good: dict[tuple[int, int], int]) -> None:
    """At every commit, each message below the committed offset is in both sinks (its result in
    the output topic and Redis, or its dead letter in the dead-letter topic)."""

    def on_commit(tps: list[TopicPartition]) -> None:
        out, dead = h.output_candids(), {(int(dict(o.headers or [])["source_partition"]), int(dict(o.headers or [])["source_offset"])) for o in h.dead()}
        for tp in tps:
            for m in msgs:
                if m.partition() == tp.partition and m.offset() < tp.offset:
                    key = (m.partition(), m.offset())
                    if key in good:
                        assert good[key] in out and good[key] in h.redis.stored, f"committed {key} before both sinks had it"
                    else:
                        assert key in dead, f"committed {key} before its dead letter was acknowledged"

    h.consumer.on_commit = on_commit


def corpus(alerts: list[bytes], bad_every: int = 5) -> tuple[list[Message], dict[tuple[int, int], int]]:
    values = [b"garbage" if i % bad_every == 3 else a for i, a in enumerate(alerts)]
    msgs = messages(values)
    good = {(m.partition(), m.offset()): START + i for i, m in enumerate(msgs) if values[i] != b"garbage"}
    return msgs, good


@pytest.mark.parametrize(("pipeline", "decode_workers"), [(True, 0), (False, 0), (True, 2)])
def test_every_message_lands_once_and_commits_follow_both_sinks(alerts: list[bytes], pipeline: bool,
                                                                 decode_workers: int) -> None:  # fmt: skip
    msgs, good = corpus(alerts)
    h = harness(msgs, pipeline=pipeline, decode_workers=decode_workers)
    check_commits_follow_both_sinks(h, msgs, good)
    stats = h.proc.run(idle_exit_s=0.05)
    assert h.output_candids() == set(good.values()) == set(h.redis.stored)
    assert len(h.dead()) == len(msgs) - len(good)
    assert {dict(o.headers or [])["reason"] for o in h.dead()} == {b"not_avro"}
    last = {tp.partition: tp.offset for c in h.consumer.commits for tp in c}
    assert last == {0: 12, 1: 12}, "every partition committed up to its end"
    assert stats.alerts_in == len(msgs) and stats.alerts_out == len(good)
    assert stats.dead_letters == len(msgs) - len(good) == stats.dead_reasons["not_avro"]


def test_counters_and_metrics_agree_and_kafka_errors_are_not_alerts(alerts: list[bytes]) -> None:
    msgs = messages(alerts[:6])
    msgs.insert(2, Message(topic=TOPIC, partition=0, offset=-1, error=KafkaError(KafkaError._TRANSPORT)))
    h = harness(msgs)
    stats = h.proc.run(idle_exit_s=0.05)
    sample = h.metrics.registry.get_sample_value
    assert stats.alerts_in == 6 == sample("stampstream_alerts_in_total")
    assert stats.kafka_errors == 1 == sample("stampstream_kafka_errors_total")
    assert stats.alerts_out == 6 == sample("stampstream_alerts_out_total")
    assert stats.commits == sample("stampstream_commits_total") > 0


@pytest.mark.parametrize("sink", ["kafka", "redis"])
def test_a_failing_sink_pauses_retries_then_resumes(alerts: list[bytes], sink: str) -> None:
    msgs, good = corpus(alerts[:12])
    h = harness(msgs)
    check_commits_follow_both_sinks(h, msgs, good)
    (h.kafka if sink == "kafka" else h.redis).fail_next = 3
    h.proc.run(idle_exit_s=0.05)
    assert h.consumer.paused and h.consumer.paused == h.consumer.resumed, "paused once, resumed once"
    assert h.sleeps == [0.01, 0.02, 0.04], "exponential backoff"
    assert h.output_candids() == set(good.values()) == set(h.redis.stored)
    assert h.metrics.registry.get_sample_value("stampstream_sink_retries_total", {"sink": sink}) == 3
    assert h.proc.stats.sink_retries[sink] == 3


def test_partitions_revoked_with_batches_in_flight(alerts: list[bytes]) -> None:
    """Partition 1 is taken away after two batches were read: those batches still reach both
    sinks, but no offset of partition 1 is committed after the revocation, and its messages read
    later are dropped unprocessed (the new owner reads them from the last commit)."""
    msgs = messages(alerts)
    h = harness(msgs)
    revoked_at: list[int] = []

    def before(n: int) -> None:  # once two batches (8 messages) have been handed out
        if not revoked_at and len(msgs) - len(h.consumer.queue) == 8:
            h.consumer.revoke(1)
            revoked_at.append(len(h.consumer.commits))

    h.consumer.before_consume = before
    h.proc.run(idle_exit_s=0.05)
    assert revoked_at
    after = [tp for c in h.consumer.commits[revoked_at[0] :] for tp in c]
    assert after and all(tp.partition == 0 for tp in after)
    # the two batches read before the revocation (8 messages, 4 of partition 1) are in both sinks
    early = {START + i for i in range(8)}
    assert early <= h.output_candids() and early <= set(h.redis.stored)
    # later messages of partition 1 were dropped, all of partition 0 processed
    later_p1 = {START + i for i in range(8, 24) if i % 2 == 1}
    assert not later_p1 & h.output_candids()
    assert {START + i for i in range(24) if i % 2 == 0} <= h.output_candids()


def test_stop_mid_batch_finishes_what_is_in_hand(alerts: list[bytes]) -> None:
    msgs, good = corpus(alerts)
    h = harness(msgs)
    check_commits_follow_both_sinks(h, msgs, good)
    sends = []

    def on_send() -> None:
        sends.append(1)
        if len(sends) == 2:
            h.proc.request_stop()  # SIGTERM while batch 1 is being published

    h.kafka.on_send = on_send
    stats = h.proc.run()
    consumed = [m for m in msgs if m not in h.consumer.queue]
    assert h.consumer.queue, "stopped before the end of the topic"
    assert stats.alerts_in == len(consumed)
    done = {good[(m.partition(), m.offset())] for m in consumed if (m.partition(), m.offset()) in good}
    assert h.output_candids() == done == set(h.redis.stored)
    last = {tp.partition: tp.offset for c in h.consumer.commits for tp in c}
    for p in (0, 1):
        assert last[p] == 1 + max(m.offset() for m in consumed if m.partition() == p)


def test_idle_exit_waits_for_the_high_watermarks_and_a_run_never_assigned_fails(alerts: list[bytes]) -> None:
    from consumer.daemon import NeverAssigned

    h = harness(messages(alerts[:4]))
    lag = [3]  # the broker says 3 more messages are on partition 0 for a while

    def watermarks(tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        lag[0] = max(0, lag[0] - 1)
        return (0, 100) if lag[0] and tp.partition == 0 else (0, 0)

    h.consumer.get_watermark_offsets = watermarks  # type: ignore[method-assign]
    h.proc.run(idle_exit_s=0.01)
    assert lag[0] == 0, "did not exit while a partition was behind its high watermark"

    lonely = harness(messages(alerts[:2]))
    lonely.consumer.subscribe = lambda topics, on_assign, on_revoke: None  # type: ignore[method-assign]
    lonely.proc._assigned_at = None
    lonely.proc.JOIN_TIMEOUT_S = 0.05
    with pytest.raises(NeverAssigned):
        lonely.proc.run(idle_exit_s=0.01)


def test_idle_exit_on_a_topic_the_group_had_already_drained() -> None:
    """A run that reads nothing (its group committed every offset before it started: a restart
    after the last batch, a backfill run again) has no position; the committed offsets say it is
    caught up. It waits while they are behind the high watermark."""
    h = harness([])
    calls = [0]

    def committed(parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        calls[0] += 1
        return [TopicPartition(tp.topic, tp.partition, 50 if calls[0] <= 3 else 100) for tp in parts]

    h.consumer.get_watermark_offsets = lambda tp, timeout, cached: (0, 100)  # type: ignore[method-assign,assignment]
    h.consumer.committed = committed  # type: ignore[method-assign]
    stats = h.proc.run(idle_exit_s=0.01)
    assert calls[0] == 4 and stats.alerts_in == 0


def test_second_stop_during_an_outage_aborts_without_commit(alerts: list[bytes]) -> None:
    h = harness(messages(alerts[:4]), pipeline=False)
    h.redis.fail_next = 10**6

    def sleep(_s: float) -> None:
        h.proc.request_stop()
        h.proc.request_stop()

    h.proc.retry.sleep = sleep
    with pytest.raises(AbortRequested):
        h.proc.run()
    assert h.consumer.commits == []


class TricklingConsumer(FakeConsumer):
    """librdkafka's consume() semantics: it returns once ``num_messages`` have arrived or at the
    timeout; messages arrive one every ``gap_s``."""

    def __init__(self, messages: list[Message], partitions: list[int], gap_s: float) -> None:
        super().__init__(messages, partitions)
        self.gap_s = gap_s
        self.start = time.monotonic()
        self.handed = 0

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            arrived = min(len(self.queue) + self.handed, int((time.monotonic() - self.start) / self.gap_s))
            ready = arrived - self.handed
            if ready >= num_messages or time.monotonic() >= deadline:
                got, self.queue = self.queue[: min(ready, num_messages)], self.queue[min(ready, num_messages) :]
                self.handed += len(got)
                return got
            time.sleep(0.001)


def test_a_batch_closes_max_wait_after_its_first_message(alerts: list[bytes]) -> None:
    """At a trickle (one message per 10 ms), batches close max_wait_ms (50 ms) after their first
    message, so ~5 messages each, not the hundreds a long first wait would gather."""
    msgs = messages(alerts[:40])
    cfg = parse_consumer_config({
        "kafka": {"input_topics": [TOPIC], "output_topic": OUT, "dead_letter_topic": DLQ},
        "batching": {"max_batch": 512, "max_wait_ms": 50},
        "metrics": {"port": 0, "lag_interval_s": 3600},
    })  # fmt: skip
    consumer = TricklingConsumer(msgs, [0, 1], gap_s=0.01)
    proc = StreamProcessor(cfg, consumer, FakeKafkaSink(), FakeRedisSink(), FakeRunner(), Metrics(), sleep=lambda _s: None)  # type: ignore[arg-type]
    proc.subscribe()
    sizes: list[int] = []
    gather = proc.gather

    def counting(remaining: int | None) -> list[Message]:
        batch = gather(remaining)
        if batch:
            sizes.append(len(batch))
        return batch

    proc.gather = counting  # type: ignore[method-assign]
    proc.run(max_alerts=len(msgs))
    assert sum(sizes) == len(msgs)
    assert max(sizes) <= 9, sizes  # 50 ms / 10 ms + timing slack; a 0.5 s first wait gave ~50


class FakeRubinRunner(FakeRunner):
    """Rubin's bundle: an encoder without classes, of another latent size than ZTF's."""

    name, version = "rubin", "1"
    class_names = ()

    def snapshot(self) -> tuple[None, ModelMeta]:
        return None, ModelMeta.of(self.name, self.version, (), False, 0)

    def predict(self, pixels: np.ndarray, features: np.ndarray, model: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from alerts.rubin_features import RUBIN_FEATURE_NAMES

        n = len(pixels)
        assert features.shape == (n, len(RUBIN_FEATURE_NAMES)), "Rubin rows get Rubin's features"
        return np.ones((n, 6), np.float32), np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32)


@pytest.mark.parametrize(("pipeline", "decode_workers"), [(True, 0), (False, 0), (True, 1)])
def test_a_mixed_topic_goes_to_each_surveys_bundle(alerts: list[bytes], pipeline: bool, decode_workers: int) -> None:
    """(With decode_workers, both surveys in the workers, Rubin's schemas sent along; results in
    the order of the topic.)"""
    from alerts.synthetic_rubin import make_rubin_message

    rubin = [make_rubin_message(900 if i % 2 else 1100, 7_000 + i, seed=i) for i in range(9)]
    values = [v for pair in zip(alerts[:9], rubin, strict=True) for v in pair] + alerts[9:12]
    msgs = messages(values)
    h = harness(msgs, pipeline=pipeline, max_batch=5, decode_workers=decode_workers)
    h.proc.rubin_runner = FakeRubinRunner()  # type: ignore[assignment]
    h.proc.run(max_alerts=len(values))
    out = [decode_result(o.value) for o in h.kafka.acked if o.topic == OUT]
    assert len(out) == len(values) and not h.dead()
    by_survey = {s: [r for r in out if r["survey"] == s] for s in ("ztf", "lsst")}
    assert len(by_survey["lsst"]) == 9 and len(by_survey["ztf"]) == 12
    for r in by_survey["lsst"]:
        assert r["classifier"] == "none" and r["class_names"] == [] and r["predicted_class"] == ""
        assert r["diaSourceId"] == r["candid"] and len(r["embedding"]) == 6 and r["model_name"] == "rubin"
        assert r["band"] in "ugrizy" and r["alert_schema_version"] in ("9.0", "11.0")
    for r in by_survey["ztf"]:
        assert r["predicted_class"] in FakeRunner.class_names and len(r["embedding"]) == 4 and r["diaSourceId"] is None
        assert r["ndethist"] is None, "the synthetic ZTF schema has no ndethist: null, not a number made up"
    # detections so far travel from the alert to the result (schema 3.1)
    from alerts.rubin import RubinSchemaCache, decode_rubin

    cache = RubinSchemaCache()
    truth = {a.candid: a for a in (decode_rubin(v, cache) for v in rubin)}
    for r in by_survey["lsst"]:
        a = truth[r["candid"]]
        assert (r["ndethist"], r["jdstarthist"]) == (a.ndethist, a.jdstarthist)
    assert any(r["jdstarthist"] is not None for r in by_survey["lsst"]), "some synthetic alerts have a diaObject"
    assert set(h.redis.stored) == {r["candid"] for r in out}
    assert dict(h.proc.stats.survey_out) == {"ztf": 12, "lsst": 9}
    assert h.metrics.survey_alerts_out.labels("lsst")._value.get() == 9
    last = {p: max(m.offset() for m in msgs if m.partition() == p) for p in (0, 1)}
    assert {tp.partition: tp.offset for c in h.consumer.commits for tp in c} == {p: o + 1 for p, o in last.items()}


def test_rubin_alerts_without_a_rubin_bundle_are_dead_letters(alerts: list[bytes]) -> None:
    from alerts.synthetic_rubin import make_rubin_message

    values = [alerts[0], make_rubin_message(1000, 8_001), alerts[1]]
    h = harness(messages(values))
    h.proc.run(max_alerts=3)
    (dead,) = h.dead()
    headers = dict(dead.headers or [])
    assert headers["reason"] == b"no_model_for_survey" and headers["candid"] == b"8001"
    assert len(h.output_candids()) == 2


def test_a_batch_the_decode_workers_cannot_take_is_decoded_in_process(alerts: list[bytes]) -> None:
    """No room in /dev/shm for a batch (a container's 64 MB tmpfs): that batch decodes in the main
    process, nothing is lost, and the workers take the next one."""
    import errno

    msgs, good = corpus(alerts[:12])
    h = harness(msgs, decode_workers=1, max_batch=6)
    pool = h.proc.decode_pool
    assert pool is not None
    real_load, calls = pool._load, []

    def full_once(values: Any) -> Any:
        calls.append(len(values))
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_load(values)

    pool._load = full_once  # type: ignore[method-assign]
    h.proc.run(idle_exit_s=0.05)
    assert h.output_candids() == set(good.values()) == set(h.redis.stored)
    assert len(calls) >= 2  # the workers were asked again after the refusal


@pytest.mark.parametrize("survey", ["ztf", "lsst"])
def test_after_a_predecessor_died_a_message_that_kills_the_decoder_becomes_a_dead_letter(alerts: list[bytes], survey: str,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The restart after a hard death (consumer/crash_marker.py): the first batches decode in a
    worker; the message that kills it, of either survey, is dead-lettered (worker_crashed) and
    committed past, every good alert comes out, and later batches decode in the main process again."""
    from attacks import KILL_WORKER, decode_or_die

    import consumer.daemon as daemon_module
    from consumer.decoding import DecodePool

    made: list[DecodePool] = []

    def pool(workers: int, limits: Any, timeout_s: float | None = None) -> DecodePool:
        made.append(DecodePool(workers, limits, task=decode_or_die, timeout_s=timeout_s))
        return made[-1]

    monkeypatch.setattr(daemon_module, "DecodePool", pool)
    values = alerts[:5] + [KILL_WORKER] + alerts[5:12]
    if survey == "lsst":  # Rubin's wire form, a packaged schema id, then the killer as its body
        values[5] = b"\x00" + (1000).to_bytes(4, "big") + KILL_WORKER
    msgs = messages(values)
    h = harness(msgs, max_batch=6, partitions=2)  # max_wait_ms 0: batches of one message here
    h.proc._isolate_left = 8  # as StreamProcessor(isolate_batches=8) after a death
    h.proc.run(idle_exit_s=0.05)
    assert [dict(o.headers or [])["reason"] for o in h.dead()] == [b"worker_crashed"]
    assert h.output_candids() == {START + i for i in range(12)} == set(h.redis.stored)
    assert {tp.partition: tp.offset for c in h.consumer.commits for tp in c} == {0: 7, 1: 6}
    assert len(made) == 1 and h.proc._isolation is None  # one worker, closed after its batches



def test_after_a_predecessor_died_a_message_that_hangs_the_decoder_becomes_a_dead_letter(alerts: list[bytes],
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The same with a message that hangs the worker (no death): past batching.decode_timeout_s the
    worker is killed, the message dead-lettered (decode_timeout) and committed past, every good
    alert comes out."""
    from attacks import HANG_WORKER, decode_or_die

    import consumer.daemon as daemon_module
    from consumer.decoding import DecodePool

    timeouts: list[float | None] = []

    def pool(workers: int, limits: Any, timeout_s: float | None = None) -> DecodePool:
        timeouts.append(timeout_s)
        return DecodePool(workers, limits, task=decode_or_die, timeout_s=2.0)

    monkeypatch.setattr(daemon_module, "DecodePool", pool)
    values = alerts[:5] + [HANG_WORKER] + alerts[5:12]
    h = harness(messages(values), max_batch=6, partitions=2)
    h.proc._isolate_left = 8
    h.proc.run(idle_exit_s=0.05)
    assert [dict(o.headers or [])["reason"] for o in h.dead()] == [b"decode_timeout"]
    assert h.output_candids() == {START + i for i in range(12)} == set(h.redis.stored)
    assert {tp.partition: tp.offset for c in h.consumer.commits for tp in c} == {0: 7, 1: 6}
    assert timeouts == [h.proc.cfg.batching.decode_timeout_s]  # the config's bound reaches the pool


def test_decoding_in_the_daemons_own_process_is_under_the_hang_guard(alerts: list[bytes],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every decode in the daemon's own process runs under hang_guard, with
    batching.decode_timeout_s (the guard itself: test_decoding.py); Rubin's schema lookups, which
    may wait on the registry, run before it."""
    from contextlib import contextmanager

    import consumer.daemon as daemon_module
    from alerts.rubin_schemas import packaged_schema
    from alerts.synthetic_rubin import make_rubin_message

    guarded: list[float] = []
    inside = [False]

    @contextmanager
    def guard(timeout_s: float):  # type: ignore[no-untyped-def]
        guarded.append(timeout_s)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    real_decode_one = daemon_module.decode_one

    def decode_one(*args: Any) -> Any:
        assert inside[0], "decoded outside the guard"
        return real_decode_one(*args)

    def lookup(schema_id: int) -> bytes | None:
        assert not inside[0], "a schema lookup inside the guard"
        lookups.append(schema_id)
        return packaged_schema(schema_id)

    lookups: list[int] = []
    monkeypatch.setattr(daemon_module, "hang_guard", guard)
    monkeypatch.setattr(daemon_module, "decode_one", decode_one)
    rubin = [make_rubin_message(1100, 7_100 + i, seed=i) for i in range(4)]
    h = harness(messages(alerts[:10] + rubin), max_batch=4, partitions=2)
    h.proc.rubin_runner = FakeRubinRunner()  # type: ignore[assignment]
    h.proc.rubin_schemas.lookup = lookup
    h.proc.run(idle_exit_s=0.05)
    assert h.output_candids() == {START + i for i in range(10)} | {7_100 + i for i in range(4)}
    assert guarded and set(guarded) == {h.proc.cfg.batching.decode_timeout_s}
    assert lookups == [1100]  # once, then compiled and cached
