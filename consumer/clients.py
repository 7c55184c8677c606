"""Client settings, built from the config in one place: Kafka consumer, producer and admin (one
set of bootstrap + security settings), the Redis client, and the one helper for producing with
back-pressure that the sinks, the replay tool and the benchmark share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import Producer

from config import KafkaConfig, RedisConfig

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def kafka_common(cfg: KafkaConfig) -> dict[str, Any]:
    """Bootstrap and security settings shared by consumer, producer and admin clients."""
    s = cfg.security
    out: dict[str, Any] = {"bootstrap.servers": cfg.bootstrap_servers, "security.protocol": s.protocol}
    optional = {
        "sasl.mechanism": s.sasl_mechanism,
        "sasl.username": s.sasl_username,
        "sasl.password": s.sasl_password,
        "ssl.ca.location": s.ssl_ca_location,
        "ssl.certificate.location": s.ssl_certificate_location,
        "ssl.key.location": s.ssl_key_location,
    }
    out.update({k: v for k, v in optional.items() if v})
    return out


def consumer_settings(cfg: KafkaConfig) -> dict[str, Any]:
    static = {"group.instance.id": cfg.group_instance_id} if cfg.group_instance_id else {}
    return kafka_common(cfg) | static | {
        "group.id": cfg.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": cfg.auto_offset_reset,
        "session.timeout.ms": cfg.session_timeout_ms,
        "max.poll.interval.ms": cfg.max_poll_interval_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        # ZTF messages are ~60 KB: fetch in large chunks (the 1 MB default per partition means one
        # broker round trip per ~16 alerts), but bound the prefetch queue: in-flight memory is
        # this plus the batches in hand. When that queue is full librdkafka stops fetching for
        # fetch.queue.backoff.ms, 1 s by default: with a busy consumer that cut throughput 8x
        # (benchmark), so it is short here.
        "max.partition.fetch.bytes": 4 * 1024 * 1024,
        "fetch.max.bytes": 16 * 1024 * 1024,
        "queued.max.messages.kbytes": 32768,
        "fetch.queue.backoff.ms": 10,
    }


def producer_settings(cfg: KafkaConfig) -> dict[str, Any]:
    return kafka_common(cfg) | {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": cfg.producer_linger_ms,
        "compression.type": cfg.compression,
        "queue.buffering.max.messages": cfg.producer_queue_max_messages,
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "message.timeout.ms": 120000,
    }


def replay_producer_settings(cfg: KafkaConfig) -> dict[str, Any]:
    """A producer that writes alerts into an input topic (replay, benchmark, tests)."""
    return kafka_common(cfg) | {"linger.ms": 50, "compression.type": "lz4", "message.max.bytes": MAX_MESSAGE_BYTES}


def redis_client(cfg: RedisConfig) -> redis.Redis:
    kwargs: dict[str, Any] = {"socket_timeout": cfg.socket_timeout_s, "socket_connect_timeout": cfg.socket_timeout_s}
    if cfg.password:
        kwargs["password"] = cfg.password
    url = cfg.url
    if cfg.tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]  # redis-py takes TLS from the scheme (ssl=True is refused)
    return redis.Redis.from_url(url, **kwargs)


DeliveryCallback = Callable[[Any, Any], None]


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: bytes | None = None,
    headers: list[tuple[str, str | bytes | None]] | None = None,
    on_delivery: DeliveryCallback | None = None,
) -> None:
    """Produce one message; while librdkafka's local queue is full, serve delivery reports and try
    again (back-pressure instead of an unbounded queue or a lost message)."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)
