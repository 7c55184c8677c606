"""Helpers for tests against the real broker and Redis: produce, read back, committed offsets,
and the consumer daemon run as a real process (`consumer run`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from config import ConsumerConfig, load_consumer_config
from consumer.peek import read_output_topic
from consumer.results import decode_result

ROOT = Path(__file__).resolve().parents[2]


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(timeout=30)


def produce(bootstrap: str, topic: str, values: Sequence[bytes], partitions: int = 2) -> None:
    """Round-robin over partitions, so both partitions hold good and bad messages."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 16 * 1024 * 1024})
    errors: list[Any] = []
    for i, v in enumerate(values):
        p.produce(topic, v, partition=i % partitions, on_delivery=lambda e, _m: errors.append(e) if e else None)
        p.poll(0)
    assert p.flush(60) == 0 and not errors, errors


def consumer_process(config_path: Path, *args: str, log_path: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed by the process end
    return subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "run", "--config", str(config_path), *args],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


def run_consumer(config_path: Path, *args: str, timeout: float = 300, log_path: Path | None = None) -> int:
    proc = consumer_process(config_path, *args, log_path=log_path)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@dataclass
class Outcome:
    output_candids: Counter[int]
    redis_candids: set[int]
    dead_letters: list[tuple[bytes, dict[str, bytes]]]
    committed: dict[int, int]
    end_offsets: dict[int, int]

    def summary(self, good: set[int], bad: int) -> dict[str, int]:
        return {
            "alerts_in": len(good) + bad,
            "out_unique": len(set(self.output_candids) & good),
            "dead_lettered": len(self.dead_letters),
            "duplicates_in_output": sum(self.output_candids.values()) - len(self.output_candids),
            "lost": len(good - set(self.output_candids)) + len(good - self.redis_candids),
        }


def read_dead_letters(cfg: ConsumerConfig) -> list[tuple[bytes, dict[str, bytes]]]:
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": f"dlq-reader-{time.time()}", "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(cfg.kafka.dead_letter_topic, timeout=10).topics[cfg.kafka.dead_letter_topic]
        total = 0
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(cfg.kafka.dead_letter_topic, p), timeout=10)
            total += hi - lo
        c.subscribe([cfg.kafka.dead_letter_topic])
        out: list[tuple[bytes, dict[str, bytes]]] = []
        deadline = time.monotonic() + 30
        while len(out) < total and time.monotonic() < deadline:
            for m in c.consume(num_messages=500, timeout=1.0):
                if m.error() is None:
                    out.append((m.value(), dict(m.headers() or [])))
        return out
    finally:
        c.close()


def outcome(config_path: Path) -> Outcome:
    cfg = load_consumer_config(config_path, env={})
    records = [decode_result(v) for v in read_output_topic(cfg, cfg.kafka.output_topic)]
    r = redis.Redis.from_url(cfg.redis.url)
    prefix = f"{cfg.redis.key_prefix}:cand:"
    redis_candids = {int(k.decode()[len(prefix):]) for k in r.scan_iter(f"{prefix}*", count=1000)}
    topic = cfg.kafka.input_topics[0]
    c = Consumer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": cfg.kafka.group_id})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()
    return Outcome(Counter(rec["candid"] for rec in records), redis_candids, read_dead_letters(cfg), committed, ends)
