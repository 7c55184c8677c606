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


# One call per batch. For each alert: the per-candid hash (HSET + EXPIRE), then the per-object
# entry, updated only if this alert is not older than what is stored (by jd, then candid), so that
# a replay of old alerts, or partitions processed out of order, never move "latest" backwards.
# Idempotent: the same batch twice leaves the same hashes.
# KEYS: the N candid keys, then the N object keys. ARGV: ttl, k, the k field names, then the k
# field values of each alert in turn; ARGV[4 + k...] for alert i starts at 3 + k + (i - 1) * k.
# The field names go once per batch and every reply is folded into one: this is what makes the
# Redis sink cost ~10 us per alert instead of ~60 (docs/benchmarks.md).
_BATCH_LUA = """
local ttl = tonumber(ARGV[1])
local k = tonumber(ARGV[2])
local n = #KEYS / 2
local jd_at, candid_at
for j = 1, k do
  if ARGV[2 + j] == 'jd' then jd_at = j end
  if ARGV[2 + j] == 'candid' then candid_at = j end
end
local args = {}
for i = 1, n do
  local off = 2 + k + (i - 1) * k
  for j = 1, k do
    args[2 * j - 1] = ARGV[2 + j]
    args[2 * j] = ARGV[off + j]
  end
  redis.call('HSET', KEYS[i], unpack(args))
  redis.call('EXPIRE', KEYS[i], ttl)
  local okey = KEYS[n + i]
  local jd = tonumber(ARGV[off + jd_at])
  local candid = tonumber(ARGV[off + candid_at])
  local cur = redis.call('HMGET', okey, 'jd', 'candid')
  local cur_jd = tonumber(cur[1])
  if (not cur_jd) or cur_jd < jd or (cur_jd == jd and tonumber(cur[2]) <= candid) then
    redis.call('HSET', okey, unpack(args))
  end
  redis.call('EXPIRE', okey, ttl)
end
return n
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


@dataclass
class RedisRequest:
    """A batch sent to Redis whose reply has not been read yet (RedisSink.send / wait)."""

    results: Sequence[Result]
    conn: Any = None  # the connection that owes the reply
    error: Exception | None = None  # why it could not be sent


class RedisSink:
    """One round trip and one script call per batch: per alert, the per-candid hash and the
    compare-and-set of the per-object entry (see _BATCH_LUA).

    The command is packed by hand into one buffer: redis-py's pipeline spends ~90 us per alert
    packing its ~60 arguments one by one, more than all the other work of a result. An error
    reply fails the whole batch (which is then retried whole: every write is idempotent). The
    script runs atomically, so Redis serves no other client for its ~10-20 ms per 512 alerts."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl_seconds
        self._ttl = str(ttl_seconds).encode()
        self._sha = b""  # of the batch script, loaded on first use

    def _pack(self, results: Sequence[Result]) -> bytes:
        rows = [redis_fields(r) for r in results]
        names = list(rows[0])
        if any(list(f) != names for f in rows):
            raise ValueError("results of one batch must have the same fields (same model classes)")
        args: list[bytes] = [b"EVALSHA", self._sha, b"%d" % (2 * len(results))]
        args += [candid_key(self.prefix, r.candid).encode() for r in results]
        args += [object_key(self.prefix, r.object_id).encode() for r in results]
        args += [self._ttl, b"%d" % len(names), *(n.encode() for n in names)]
        for f in rows:
            args += [v if isinstance(v, bytes) else v.encode() for v in f.values()]
        return resp_command(*args)

    def send(self, results: Sequence[Result]) -> RedisRequest:
        """Send the batch's script call and return without waiting for the reply, so that Redis
        runs the batch while the caller flushes Kafka; ``wait`` reads the reply. Never raises: a
        failure to send is kept in the request and raised by ``wait``."""
        if not results:
            return RedisRequest(results)
        conn = None
        try:
            if not self._sha:
                sha = self.client.script_load(_BATCH_LUA)
                self._sha = sha if isinstance(sha, bytes) else sha.encode()
            payload = self._pack(results)
            conn = self.client.connection_pool.get_connection()
            conn.send_packed_command([payload])
        except redis.RedisError as e:
            if conn is not None:
                self._drop(conn)
            return RedisRequest(results, error=e)
        return RedisRequest(results, conn=conn)

    def wait(self, request: RedisRequest, _reloaded: bool = False) -> None:
        """The reply of ``send``; raises SinkError if the batch is not stored (the caller retries)."""
        if not request.results:
            return
        conn = request.conn
        if conn is None:
            raise SinkError(f"redis: {type(request.error).__name__}: {request.error}") from request.error
        request.conn = None
        try:
            conn.read_response()
        except redis.exceptions.NoScriptError:
            self.client.connection_pool.release(conn)
            if _reloaded:
                raise SinkError("redis: the batch script vanished again after reloading it") from None
            self._sha = b""  # the server lost its scripts (restart): load again and redo the batch
            self.wait(self.send(request.results), _reloaded=True)
            return
        except redis.ResponseError as e:  # an error reply: the connection is still in step
            self.client.connection_pool.release(conn)
            raise SinkError(f"redis: error reply: {e}") from e
        except BaseException as e:
            self._drop(conn)
            if isinstance(e, redis.RedisError):
                raise SinkError(f"redis: {type(e).__name__}: {e}") from e
            raise
        self.client.connection_pool.release(conn)

    def abandon(self, request: RedisRequest) -> None:
        """Forget a sent request whose reply will not be read (shutdown): its connection is closed."""
        if request.conn is not None:
            self._drop(request.conn)
            request.conn = None

    def write(self, results: Sequence[Result]) -> None:
        """Store a batch and wait for Redis to acknowledge it; raises SinkError."""
        self.wait(self.send(results))

    def _drop(self, conn: Any) -> None:
        conn.disconnect()  # the reply stream may be out of step: never reuse this connection
        self.client.connection_pool.release(conn)
