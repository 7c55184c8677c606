"""Faults against the real broker and Redis: a stream is fed while the consumer runs, a fault is
injected mid-stream, and afterwards every good alert is in Redis exactly once (by candid) and in
the output topic at least once, every bad one is in the dead-letter topic, and the committed
offsets reach the end of the input. Figures are printed and appended to the report file named by
STAMPSTREAM_FAULT_REPORT (docs/faults.md quotes them)."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import Producer
from conftest import Stack

from alerts.decoder import SchemaCache, decode_alert
from alerts.synthetic import make_alert
from model.bundle import save_bundle, seed_bundle

from .helpers import consumer_process, create_topic, outcome

pytestmark = [pytest.mark.integration, pytest.mark.faults]


class Feeder(threading.Thread):
    """Produces the messages at a steady rate, like a live stream, retrying through broker outages."""

    def __init__(self, bootstrap: str, topic: str, values: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.values, self.rate, self.topic = values, rate, topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.timeout.ms": 300000,
                                  "message.max.bytes": 16 * 1024 * 1024, "log_level": 2})  # fmt: skip
        self.sent = 0
        self.failed: list[str] = []

    def run(self) -> None:
        for i, v in enumerate(self.values):
            self.producer.produce(self.topic, v, partition=i % 2,
                                  on_delivery=lambda e, _m: self.failed.append(str(e)) if e else None)  # fmt: skip
            self.producer.poll(0)
            self.sent += 1
            time.sleep(1.0 / self.rate)
        assert self.producer.flush(300) == 0


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def good_and_bad(corpus: list[bytes], n_good: int) -> tuple[list[bytes], list[bytes], set[int]]:
    step = max(1, len(corpus) // n_good)
    good = corpus[::step][:n_good]
    cache = SchemaCache()
    candids = {decode_alert(m, cache).candid for m in good}
    return good, poison_messages(), candids


def poison_messages() -> list[bytes]:
    """A poison batch: truncated Avro, non-Avro, Rubin's framing with garbage, unknown schema,
    non-gzip cutout, FITS with a wrong header, empty, and a 10 MB message."""
    base = make_alert(2_400_000_000_000_007_000).message
    other = io.BytesIO()
    fastavro.writer(other, {"type": "record", "name": "not_ztf", "fields": [{"name": "x", "type": "int"}]}, [{"x": 1}])
    bad_fits = gzip.compress(b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  = banana" + b" " * 4000)
    big = make_alert(2_400_000_000_000_007_004, science=gzip.compress(os.urandom(10 * 1024 * 1024))).message
    return [
        base[: len(base) // 3],
        b"\x01\x02 definitely not avro",
        b"\x00\x01 Rubin's framing, then garbage",  # 0x00: read as Rubin's wire form (schema id out of range)
        other.getvalue(),
        make_alert(2_400_000_000_000_007_002, science=b"plain bytes, not gzip").message,
        make_alert(2_400_000_000_000_007_003, difference=bad_fits).message,
        b"",
        big,
    ]


def interleave(good: list[bytes], bad: list[bytes]) -> list[bytes]:
    out = list(good)
    for i, b in enumerate(bad):
        out.insert((i + 1) * len(good) // (len(bad) + 1), b)
    return out


def redis_count(stack: Stack, prefix: str) -> int:
    import redis

    try:
        return sum(1 for _ in redis.Redis.from_url(stack.redis_url).scan_iter(f"{prefix}:cand:*", count=1000))
    except redis.RedisError:
        return -1


def report(name: str, figures: dict[str, object]) -> None:
    line = json.dumps({"fault": name, **figures})
    print(f"\nFAULT {line}")
    path = os.environ.get("STAMPSTREAM_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def check(cfg_path: Path, good: set[int], bad: list[bytes]) -> dict[str, int]:
    o = outcome(cfg_path)
    assert good <= set(o.output_candids), f"lost in output topic: {len(good - set(o.output_candids))}"
    assert o.redis_candids == good, "Redis holds exactly the good candids (once each, by key)"
    assert {v for v, _ in o.dead_letters} == {v[:900_000] for v in bad}, "dead letters are exactly the bad messages"
    assert o.committed == o.end_offsets, f"committed {o.committed} != end {o.end_offsets}"
    figures = o.summary(good, len(bad))
    figures["dead_letter_duplicates"] = len(o.dead_letters) - len(bad)
    assert figures["lost"] == 0
    return figures


def setup_stream(stack: Stack, tmp_path: Path, corpus: list[bytes], n_good: int, **overrides):
    cfg_path, data = stack.config(tmp_path, **overrides)
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    good, bad, candids = good_and_bad(corpus, n_good)
    return cfg_path, data, topic, interleave(good, bad), bad, candids


def finish(proc, cfg_path: Path, stack: Stack, data: dict, candids: set[int], feeder: Feeder, timeout: float = 240) -> None:
    feeder.join(timeout=timeout)
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= len(candids), timeout, "all good alerts in Redis")
    time.sleep(2)  # let the last commit land
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "SIGTERM finishes the batch in hand, commits and exits 0"


def test_kill_9_mid_batch_then_restart(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    cfg_path, data, topic, values, bad, candids = setup_stream(
        stack, tmp_path, corpus, 200, batching={"max_batch": 16, "max_wait_ms": 50})
    feeder = Feeder(stack.bootstrap, topic, values, rate=40)
    feeder.start()
    proc = consumer_process(cfg_path, log_path=tmp_path / "c1.log")
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= 60, 120, "first results")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = redis_count(stack, prefix)
    proc = consumer_process(cfg_path, log_path=tmp_path / "c2.log")
    finish(proc, cfg_path, stack, data, candids, feeder)
    figures = check(cfg_path, candids, bad)
    report("kill -9 mid-batch, restart", figures | {"results_before_kill": killed_at})


def test_restart_after_kill_9_with_and_without_static_membership(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    """Restart-to-first-result after kill -9: with dynamic membership the group waits for the dead
    member's session timeout (10 s in the tests, 45 s by default) before it assigns the partitions
    again; a static member (kafka.group_instance_id) gets them back at once."""
    took = {}
    for mode in ("dynamic", "static"):
        (tmp_path / mode).mkdir()
        cfg_path, data, topic, values, bad, candids = setup_stream(
            stack, tmp_path / mode, corpus, 120, batching={"max_batch": 16, "max_wait_ms": 50})
        if mode == "static":
            data["kafka"]["group_instance_id"] = f"consumer-{uuid.uuid4().hex[:6]}"
            cfg_path.write_text(__import__("yaml").safe_dump(data))
        feeder = Feeder(stack.bootstrap, topic, values, rate=20)
        feeder.start()
        proc = consumer_process(cfg_path, log_path=tmp_path / mode / "c1.log")
        prefix = data["redis"]["key_prefix"]
        wait_until(lambda p=prefix: redis_count(stack, p) >= 30, 120, "first results")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before = redis_count(stack, prefix)
        t0 = time.monotonic()
        proc = consumer_process(cfg_path, log_path=tmp_path / mode / "c2.log")
        wait_until(lambda p=prefix, b=before: redis_count(stack, p) > b, 120, "a result after the restart")
        took[mode] = time.monotonic() - t0
        finish(proc, cfg_path, stack, data, candids, feeder)
        check(cfg_path, candids, bad)
    report("restart after kill -9 (s to the first new result)", {k: round(v, 1) for k, v in took.items()})
    assert took["static"] < took["dynamic"], took


def test_broker_down_30s(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    cfg_path, data, topic, values, bad, candids = setup_stream(stack, tmp_path, corpus, 200)
    feeder = Feeder(stack.bootstrap, topic, values, rate=5)
    feeder.start()
    proc = consumer_process(cfg_path, log_path=tmp_path / "c.log")
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= 30, 120, "first results")
    stack.ctl("stop", "kafka")
    time.sleep(30)
    assert proc.poll() is None, "the consumer survives a broker outage"
    stack.ctl("start", "kafka")
    finish(proc, cfg_path, stack, data, candids, feeder, timeout=300)
    # librdkafka's reconnect errors are rate-limited: a line and a summary, not one per try
    client_lines = [line for line in (tmp_path / "c.log").read_text().splitlines() if "stampstream.kafka" in line]
    assert len(client_lines) < 60, f"{len(client_lines)} client log lines during a 30 s outage"
    report("Kafka broker stopped 30 s", check(cfg_path, candids, bad) | {"client_log_lines": len(client_lines)})


def test_redis_down_30s(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    cfg_path, data, topic, values, bad, candids = setup_stream(stack, tmp_path, corpus, 200)
    feeder = Feeder(stack.bootstrap, topic, values, rate=5)
    feeder.start()
    port = _free_port()
    data["metrics"]["port"] = port
    cfg_path.write_text(__import__("yaml").safe_dump(data))
    proc = consumer_process(cfg_path, log_path=tmp_path / "c.log")
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= 30, 120, "first results")
    stack.ctl("stop", "redis")
    time.sleep(10)
    paused = _metric(port, "stampstream_paused")
    retries = _metric(port, 'stampstream_sink_retries_total{sink="redis"}')
    committed_during = _metric(port, "stampstream_commits_total")
    time.sleep(5)
    assert _metric(port, "stampstream_commits_total") == committed_during, "no commit while Redis is down"
    time.sleep(15)
    assert proc.poll() is None, "no crash loop: the consumer backs off and retries"
    stack.ctl("start", "redis")
    finish(proc, cfg_path, stack, data, candids, feeder)
    assert paused == 1.0 and retries >= 2
    report("Redis stopped 30 s", check(cfg_path, candids, bad) | {"redis_retries_during_outage": int(retries)})


def test_rebalance_second_consumer_joins_then_leaves(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    cfg_path, data, topic, values, bad, candids = setup_stream(
        stack, tmp_path, corpus, 240, batching={"max_batch": 16, "max_wait_ms": 50})
    feeder = Feeder(stack.bootstrap, topic, values, rate=12)
    feeder.start()
    first = consumer_process(cfg_path, log_path=tmp_path / "c1.log")
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= 30, 120, "first results")
    second = consumer_process(cfg_path, log_path=tmp_path / "c2.log")
    wait_until(lambda: "progress: in=" in (tmp_path / "c2.log").read_text() and
               _processed(tmp_path / "c2.log") > 0, 90, "the second consumer to take a partition")  # fmt: skip
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0
    finish(first, cfg_path, stack, data, candids, feeder)
    report("rebalance: 2nd consumer joins, then leaves", check(cfg_path, candids, bad) | {"second_consumer_processed": _processed(tmp_path / "c2.log")})


def test_poison_batch(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    cfg_path, data, topic, values, bad, candids = setup_stream(stack, tmp_path, corpus, 60)
    bad_batch = poison_messages()
    values = values[:30] + bad_batch + values[30:]  # the poison arrives as one burst
    bad = bad + bad_batch
    feeder = Feeder(stack.bootstrap, topic, values, rate=200)
    feeder.start()
    proc = consumer_process(cfg_path, log_path=tmp_path / "c.log")
    finish(proc, cfg_path, stack, data, candids, feeder)
    figures = check(cfg_path, candids, bad)
    o = outcome(cfg_path)
    reasons = sorted({h["reason"].decode() for _, h in o.dead_letters})
    assert {"truncated", "not_avro", "unknown_schema", "cutout_not_gzip", "cutout_bad_fits", "empty"} <= set(reasons)
    big = [h for v, h in o.dead_letters if h.get("truncated") == b"1"]
    assert big and int(big[0]["original_size"]) > 10_000_000
    report("poison batch", figures | {"reasons": reasons})


def test_broken_bundle_keeps_old_model(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    bundle = tmp_path / "live.pt"
    b = seed_bundle(seed=5)
    save_bundle(type(b)(**{**b.__dict__, "name": "old-model", "version": "7"}), bundle)
    port = _free_port()
    cfg_path, data, topic, values, bad, candids = setup_stream(
        stack, tmp_path, corpus, 120, model={"bundle_path": str(bundle), "reload_check_s": 0.5, "device": "cpu"},
        metrics={"port": port})
    feeder = Feeder(stack.bootstrap, topic, values, rate=10)
    feeder.start()
    proc = consumer_process(cfg_path, log_path=tmp_path / "c.log")
    prefix = data["redis"]["key_prefix"]
    wait_until(lambda: redis_count(stack, prefix) >= 20, 120, "first results")
    bundle.write_bytes(b"this is not a model bundle")
    wait_until(lambda: _metric(port, "stampstream_model_reload_failures_total") >= 1, 60, "the reload failure metric")
    finish(proc, cfg_path, stack, data, candids, feeder)
    figures = check(cfg_path, candids, bad)
    from config import load_consumer_config
    from consumer.peek import read_output_topic
    from consumer.results import decode_result

    cfg = load_consumer_config(cfg_path, env={})
    models = {(r["model_name"], r["model_version"]) for r in map(decode_result, read_output_topic(cfg, cfg.kafka.output_topic))}
    assert models == {("old-model", "7")}
    assert "model reload failed, keeping old-model:7" in (tmp_path / "c.log").read_text()
    report("model bundle replaced by a broken file", figures | {"models_in_output": sorted(models)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(port: int, name: str) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return -1.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series == name or ("{" not in name and series.split("{")[0] == name):
            total += float(value)  # a name without labels sums all its labelled series
    return total


def _processed(log: Path) -> int:
    import re

    counts = [int(m) for m in re.findall(r"progress: in=(\d+)", log.read_text())]
    return max(counts, default=0)



def test_slow_redis_applies_back_pressure(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    """Redis paused (CLIENT PAUSE) while a fast stream arrives: the consumer pauses its partitions
    instead of buffering; alerts read but not yet acknowledged by both sinks never exceed the three
    batches in hand (one decoding, one inferring, one awaiting Redis)."""
    import redis

    port = _free_port()
    max_batch = 16
    cfg_path, data, topic, values, bad, candids = setup_stream(
        stack, tmp_path, corpus, 240, batching={"max_batch": max_batch, "max_wait_ms": 50}, metrics={"port": port})
    feeder = Feeder(stack.bootstrap, topic, values, rate=100)
    proc = consumer_process(cfg_path, log_path=tmp_path / "c.log")
    wait_until(lambda: _metric(port, "stampstream_alerts_in_total") >= 0, 60, "the consumer to start")
    feeder.start()
    r = redis.Redis.from_url(stack.redis_url)
    in_flight_max, paused_seen = 0, False
    for _ in range(2):
        time.sleep(1.0)
        r.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            a_in = _metric(port, "stampstream_alerts_in_total")
            a_out = _metric(port, "stampstream_alerts_out_total") + _metric(port, "stampstream_dead_letters_total")
            in_flight_max = max(in_flight_max, int(a_in - a_out))
            paused_seen |= _metric(port, "stampstream_paused") == 1.0
            time.sleep(0.2)
    finish(proc, cfg_path, stack, data, candids, feeder)
    figures = check(cfg_path, candids, bad)
    assert paused_seen, "partitions were paused while Redis was slow"
    assert in_flight_max <= 3 * max_batch, f"{in_flight_max} alerts in hand > three batches"
    report("Redis slowed (CLIENT PAUSE 5 s, twice)", figures | {"max_alerts_in_hand": in_flight_max})
