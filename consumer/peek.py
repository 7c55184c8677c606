"""Read results back from both sinks and format a short table (the README's first command ends here)."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from config import ConsumerConfig
from consumer.clients import kafka_common, redis_client
from consumer.redis_keys import candid_glob, candid_key, survey_prefix
from consumer.results import decode_result


def read_output_topic(cfg: ConsumerConfig, topic: str, limit: int | None = None, timeout_s: float = 10.0) -> list[bytes]:
    """All (or the first ``limit``) message values of a topic, read without a consumer group."""
    c = Consumer(kafka_common(cfg.kafka) | {"group.id": f"peek-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=timeout_s).topics[topic]
        parts = []
        ends: dict[int, int] = {}
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if hi > lo:
                parts.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                ends[p] = hi
        c.assign(parts)
        out: list[bytes] = []
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends) and (limit is None or len(out) < limit) and time.monotonic() < deadline:
            msgs = c.consume(num_messages=1000, timeout=0.5)
            if msgs:
                deadline = time.monotonic() + timeout_s
            for m in msgs:
                value, offset, partition = m.value(), m.offset(), m.partition()
                if m.error() is None and value is not None and offset is not None and partition is not None:
                    out.append(value)
                    if offset + 1 >= ends[partition]:
                        done.add(partition)
        return out if limit is None else out[:limit]
    finally:
        c.close()


def peek(cfg: ConsumerConfig, n: int = 10) -> str:
    """The last ``n`` results of the output topic beside their Redis hashes, and counts per survey
    and class. A result without a classifier (Rubin today) shows its class as "(none)"."""
    values = read_output_topic(cfg, cfg.kafka.output_topic)
    records = [decode_result(v) for v in values]
    r = redis_client(cfg.redis)
    hashes = {s: sum(1 for _ in r.scan_iter(candid_glob(survey_prefix(cfg.redis.key_prefix, s)), count=1000))
              for s in ("ztf", "lsst")}  # fmt: skip
    lines = [
        f"output topic {cfg.kafka.output_topic}: {len(records)} results; "
        f"redis: {hashes['ztf']} ZTF and {hashes['lsst']} Rubin candid hashes",
        f"{'survey':<6} {'candid':>20} {'objectId':<18} {'band':>4} {'class (topic)':<14} {'p':>5}  {'class (redis)':<13} {'model':<24}",
    ]
    for rec in records[-n:]:
        survey = rec.get("survey", "ztf")
        h: dict[bytes, bytes] = r.hgetall(candid_key(survey_prefix(cfg.redis.key_prefix, survey), rec["candid"]))  # type: ignore[assignment]
        rc = h.get(b"class", b"-").decode() or "(none)" if h else "-"
        lines.append(
            f"{survey:<6} {rec['candid']:>20} {rec['objectId'] or '-':<18} {rec.get('band') or rec['fid']:>4} "
            f"{rec['predicted_class'] or '(none)':<14} {rec['predicted_probability']:5.2f}  {rc:<13} "
            f"{rec['model_name'] + ':' + rec['model_version']:<24}"
        )
    counts: dict[str, int] = {}
    for rec in records:
        key = f"{rec.get('survey', 'ztf')}:{rec['predicted_class'] or '(none)'}"
        counts[key] = counts.get(key, 0) + 1
    lines.append("predicted classes: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
