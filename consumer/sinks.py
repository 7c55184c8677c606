"""The two sinks (output/dead-letter Kafka topics, Redis) and the client settings built from config.

Both sinks are written so that a retry of a whole batch is harmless: Kafka messages are keyed by
candid (at-least-once: a retry may duplicate a message in the output topic, never lose one), Redis
writes are HSETs keyed by candid and a compare-by-jd update of the per-object entry (a replay
overwrites, never duplicates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import KafkaError, Producer

from config import KafkaConfig, RedisConfig
from consumer.results import Result, redis_fields


class SinkError(RuntimeError):
    """A sink did not acknowledge every write of a batch; the batch is retried, offsets not committed."""


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
    return kafka_common(cfg) | {
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
        "message.max.bytes": 16 * 1024 * 1024,
        "message.timeout.ms": 120000,
    }


@dataclass
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


class KafkaSink:
    """Produce a batch and wait until the broker has acknowledged all of it."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    def send(self, messages: Sequence[Outgoing], flush_timeout_s: float) -> None:
        """Raises SinkError with the failed messages (only those are retried by the caller)."""
        failed: list[Outgoing] = []
        errors: list[str] = []

        def on_delivery(msg_index: int):
            def cb(err: KafkaError | None, _msg: Any) -> None:
                if err is not None:
                    failed.append(messages[msg_index])
                    errors.append(str(err))

            return cb

        for i, m in enumerate(messages):
            while True:
                try:
                    self.producer.produce(m.topic, m.value, m.key, headers=m.headers, on_delivery=on_delivery(i))
                    break
                except BufferError:
                    self.producer.poll(0.1)  # local queue full: serve deliveries, then try again
        remaining = self.producer.flush(flush_timeout_s)
        if remaining:
            raise SinkError(f"{remaining} message(s) not acknowledged within {flush_timeout_s}s")
        if failed:
            exc = SinkError(f"{len(failed)} message(s) failed: {errors[0]}")
            exc.failed = failed  # type: ignore[attr-defined]
            raise exc


# Update the per-object entry only if this alert is not older than what is stored (by jd, then
# candid), so that a replay of old alerts, or partitions processed out of order, never move
# "latest" backwards. Idempotent: the same alert twice leaves the same hash.
_LATEST_LUA = """
local cur_jd = redis.call('HGET', KEYS[1], 'jd')
local cur_candid = redis.call('HGET', KEYS[1], 'candid')
local jd = tonumber(ARGV[1])
if (not cur_jd) or tonumber(cur_jd) < jd or (tonumber(cur_jd) == jd and tonumber(cur_candid) <= tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def candid_key(prefix: str, candid: int) -> str:
    return f"{prefix}:cand:{candid}"


def object_key(prefix: str, object_id: str) -> str:
    return f"{prefix}:obj:{object_id}"


def redis_client(cfg: RedisConfig) -> redis.Redis:
    kwargs: dict[str, Any] = {"socket_timeout": cfg.socket_timeout_s, "socket_connect_timeout": cfg.socket_timeout_s}
    if cfg.password:
        kwargs["password"] = cfg.password
    if cfg.tls and not cfg.url.startswith("rediss://"):
        kwargs["ssl"] = True
    return redis.Redis.from_url(cfg.url, **kwargs)


def resp_command(*args: bytes) -> bytes:
    """One command in the Redis wire protocol (RESP2)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RedisSink:
    """One round trip per batch: HSET + EXPIRE per candid, the compare-and-set per objectId.

    The commands are packed by hand into one buffer: redis-py's pipeline spends ~90 us per alert
    packing its ~60 arguments one by one, more than all the other work of a result; this costs
    ~15 us. Every reply is read, so an error reply anywhere fails the whole batch (which is then
    retried whole: every write is idempotent)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl_seconds
        self._ttl = str(ttl_seconds).encode()
        self._sha = b""  # of the compare-and-set script, loaded on first use

    def _pack(self, r: Result) -> bytes:
        fields = redis_fields(r)
        flat = [b for k, v in fields.items() for b in (k.encode(), v if isinstance(v, bytes) else v.encode())]
        key = candid_key(self.prefix, r.candid).encode()
        obj = object_key(self.prefix, r.object_id).encode()
        return b"".join((
            resp_command(b"HSET", key, *flat),
            resp_command(b"EXPIRE", key, self._ttl),
            resp_command(b"EVALSHA", self._sha, b"1", obj, fields["jd"].encode(), fields["candid"].encode(),  # type: ignore[union-attr]
                         self._ttl, *flat),
        ))  # fmt: skip

    def write(self, results: Sequence[Result], _reloaded: bool = False) -> None:
        if not results:
            return
        try:
            if not self._sha:
                sha = self.client.script_load(_LATEST_LUA)
                self._sha = sha if isinstance(sha, bytes) else sha.encode()
            payload = b"".join(self._pack(r) for r in results)
            errors = self._round_trip(payload, 3 * len(results))
            if not _reloaded and any(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                self._sha = b""  # the server lost its scripts (restart): load again and redo the batch
                self.write(results, _reloaded=True)
                return
            if errors:
                raise SinkError(f"redis: {len(errors)} error replies, first: {errors[0]}")
        except redis.RedisError as e:
            raise SinkError(f"redis: {type(e).__name__}: {e}") from e

    def _round_trip(self, payload: bytes, n_replies: int) -> list[Exception]:
        pool = self.client.connection_pool
        conn = pool.get_connection()
        errors: list[Exception] = []
        try:
            conn.send_packed_command([payload])
            for _ in range(n_replies):
                try:
                    conn.read_response()
                except redis.ResponseError as e:
                    errors.append(e)
        except BaseException:
            conn.disconnect()  # the reply stream is out of step: never reuse this connection
            raise
        finally:
            pool.release(conn)
        return errors
