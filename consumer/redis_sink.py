"""The Redis layout and its sink: which keys and fields hold a result, the batch script that
writes them, and the hand-packed command that sends it.

| key | type | content |
|---|---|---|
| ``{prefix}:cand:{candid}`` | hash | ``redis_fields`` of the result (short strings: a compact listpack) |
| ``{prefix}:obj:{objectId}`` | hash | ``candid`` and ``jd`` of the object's latest alert (by jd, then candid) |
| ``{prefix}:vec:{model}:{quantisation}:{bucket}`` | vector set (Redis >= 8) | element candid, the embedding, attributes (consumer/vector_index.py) |
| ``{prefix}:emb:{candid}`` | string (Redis 7, no index) | the embedding, little-endian float32 |

Rubin's results take the same keys under ``{prefix}:lsst`` (``{prefix}:lsst:cand:{diaSourceId}``,
``{prefix}:lsst:obj:{diaObjectId}``, ...; ``redis_keys.survey_prefix``); a source without a
diaObject has no per-object entry.

The embedding is stored once: in the vector set where the server has them, else in its own
string key. Kept out of the hash, the hash's values all stay under Redis's listpack limit (64
bytes), so it is stored compactly: ~1.4 KB -> ~0.3 KB per alert (docs/benchmarks.md, "Redis memory").
The per-object entry points at the latest alert instead of copying it.

Every hash and embedding key gets the TTL; a vector set expires TTL after the end of its time
bucket. A retry of a whole batch is harmless: writes keyed by candid, and a compare-by-jd update
of the per-object entry (a replay overwrites, never duplicates, and never moves "latest" backwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from config.consumer import VectorIndexConfig
from consumer.redis_keys import (
    bucket_start,
    candid_key,
    embedding_key,
    expire_at,
    index_key,
    object_key,
    survey_prefix,
)
from consumer.results import Result
from consumer.retry import SinkError
from consumer.vector_index import QUANT_ARG, attributes


def redis_fields(r: Result) -> dict[str, str]:
    """Hash fields written to Redis for one result (documented in README, "Redis keys"); the
    embedding is stored apart (``embedding_bytes``)."""
    fields: dict[str, str] = {
        "candid": str(r.candid),
        "objectId": r.object_id,
        "jd": repr(r.jd),
        "fid": str(r.fid),
        "ra": repr(r.ra),
        "dec": repr(r.dec),
        "class": r.predicted_class,
        "probability": f"{r.predicted_probability:.6f}",
        "model": f"{r.model_name}:{r.model_version}",
        "padded": "1" if r.cutout_padded else "0",
        "processed_at": str(r.processed_at_ms),
        "classifier": r.classifier,
    }
    if r.survey != "ztf":  # ZTF's hash stays as it was (memory per alert: docs/benchmarks.md)
        fields["survey"] = r.survey
        fields["band"] = r.band
    if r.ndethist is not None:  # how far to trust the classes (docs/model.md, "New objects")
        fields["ndethist"] = str(r.ndethist)
    if len(r.stamp_probabilities):
        best = int(np.argmax(r.stamp_probabilities))
        fields["stamp_class"] = r.class_names[best]
        fields["stamp_probability"] = f"{float(r.stamp_probabilities[best]):.6f}"
    for name, p in zip(r.class_names, r.probabilities, strict=True):
        fields[f"p_{name}"] = f"{float(p):.6f}"
    return fields


def embedding_bytes(r: Result) -> bytes:
    """Little-endian float32: what VADD ... FP32 reads, and the ``{prefix}:emb:`` key holds."""
    return np.asarray(r.embedding, dtype="<f4").tobytes()


def embedding_from_redis(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4")


# One call per batch. For each alert: the per-candid hash (HSET + EXPIRE); the per-object pointer,
# moved only if this alert is not older than the one it points at (by jd, then candid), so that a
# replay of old alerts, or partitions processed out of order, never move "latest" backwards; then
# the embedding: into its vector set when indexing (VADD: a known candid is updated), else into
# its own string key. Idempotent: the same batch twice leaves the same keys.
# KEYS: the N candid keys, the N object keys, the N embedding keys (vector sets or strings).
# ARGV: ttl, k, quantisation ('' = no index), ef, m, the k field names, then per alert its k field
# values, its embedding, and when indexing its attributes and the set's expire-at time.
# The field names go once per batch and every reply is folded into one: this is what makes the
# Redis sink cost ~10 us per alert instead of ~60 (docs/benchmarks.md).
_BATCH_LUA = """
local ttl = tonumber(ARGV[1])
local k = tonumber(ARGV[2])
local quant = ARGV[3]
local ef, m = ARGV[4], ARGV[5]
local head = 5
local indexing = quant ~= ''
local per = k + 1
if indexing then per = k + 3 end
local n = #KEYS / 3
local jd_at, candid_at
for j = 1, k do
  local name = ARGV[head + j]
  if name == 'jd' then jd_at = j end
  if name == 'candid' then candid_at = j end
end
local args = {}
for i = 1, n do
  local off = head + k + (i - 1) * per
  for j = 1, k do
    args[2 * j - 1] = ARGV[head + j]
    args[2 * j] = ARGV[off + j]
  end
  redis.call('HSET', KEYS[i], unpack(args))
  redis.call('EXPIRE', KEYS[i], ttl)
  local okey = KEYS[n + i]
  local jd_s, candid_s = ARGV[off + jd_at], ARGV[off + candid_at]
  local jd, candid = tonumber(jd_s), tonumber(candid_s)
  if string.sub(okey, -1) ~= ':' then  -- a key ending in ':' means no object (e.g. a Rubin solar-system source)
    local cur = redis.call('HMGET', okey, 'jd', 'candid')
    local cur_jd = tonumber(cur[1])
    if (not cur_jd) or cur_jd < jd or (cur_jd == jd and tonumber(cur[2]) <= candid) then
      redis.call('HSET', okey, 'candid', candid_s, 'jd', jd_s)
    end
    redis.call('EXPIRE', okey, ttl)
  end
  local ekey = KEYS[2 * n + i]
  if indexing then
    redis.call('VADD', ekey, 'FP32', ARGV[off + k + 1], candid_s, quant,
               'EF', ef, 'M', m, 'SETATTR', ARGV[off + k + 2])
    redis.call('EXPIREAT', ekey, ARGV[off + k + 3])
  else
    redis.call('SET', ekey, ARGV[off + k + 1], 'EX', ttl)
  end
end
return n
"""








def resp_command(*args: bytes) -> bytes:
    """One command in the Redis wire protocol (RESP2)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


@dataclass
class RedisRequest:
    """A batch sent to Redis whose reply has not been read yet (RedisSink.send / wait)."""

    results: Sequence[Result]
    conn: Any = None  # the connection that owes the replies
    error: Exception | None = None  # why it could not be sent
    replies: int = 1  # script calls sent (one per group of results with the same fields)


class RedisSink:
    """One round trip and one script call per batch: per alert, the per-candid hash, the
    compare-and-set of the per-object pointer and the embedding: with ``index`` (settings resolved
    against the server by ``vector_index.resolve_index``) into its vector set, else into a string
    key (see _BATCH_LUA).

    The command is packed by hand into one buffer: redis-py's pipeline spends ~90 us per alert
    packing its ~60 arguments one by one, more than all the other work of a result. An error
    reply fails the whole batch (which is then retried whole: every write is idempotent). The
    script runs atomically, so Redis serves no other client for its ~10-20 ms per 512 alerts."""

    def __init__(
        self, client: redis.Redis, prefix: str, ttl_seconds: int, index: VectorIndexConfig | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl_seconds
        self.index = index
        self._ttl = str(ttl_seconds).encode()
        if index is None:
            self._index_args = [b"", b"0", b"0"]
        else:
            self._index_args = [QUANT_ARG[index.quantisation].encode(), b"%d" % index.ef_construction, b"%d" % index.m]
        self._sha = b""  # of the batch script, loaded on first use

    def _pack(self, results: Sequence[Result]) -> list[bytes]:
        """One script call per group of results with the same hash fields (a batch of one
        survey and model is one group; a mixed ZTF + Rubin batch two)."""
        rows = [redis_fields(r) for r in results]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, f in enumerate(rows):
            groups.setdefault(tuple(f), []).append(i)
        return [self._pack_group([results[i] for i in idx], [rows[i] for i in idx]) for idx in groups.values()]

    def _pack_group(self, results: Sequence[Result], rows: Sequence[dict[str, str]]) -> bytes:
        names = list(rows[0])
        ix = self.index
        prefixes = [survey_prefix(self.prefix, r.survey) for r in results]
        args: list[bytes] = [b"EVALSHA", self._sha, b"%d" % (3 * len(results))]
        args += [candid_key(p, r.candid).encode() for p, r in zip(prefixes, results, strict=True)]
        args += [object_key(p, r.object_id).encode() for p, r in zip(prefixes, results, strict=True)]
        if ix is None:
            args += [embedding_key(p, r.candid).encode() for p, r in zip(prefixes, results, strict=True)]
        else:
            buckets = [bucket_start(r.processed_at_ms, ix.bucket_seconds) for r in results]
            keys: dict[tuple[str, str, int], bytes] = {}  # a batch has one model and one or two buckets
            for p, r, b in zip(prefixes, results, buckets, strict=True):
                k = (r.model_name, r.model_version, b)
                if k not in keys:
                    keys[k] = index_key(p, f"{r.model_name}:{r.model_version}", ix.quantisation, b).encode()
                args.append(keys[k])
        args += [self._ttl, b"%d" % len(names), *self._index_args, *(n.encode() for n in names)]
        if ix is None:
            for f, r in zip(rows, results, strict=True):
                args += [v.encode() for v in f.values()]
                args.append(embedding_bytes(r))
        else:
            for f, r, b in zip(rows, results, buckets, strict=True):
                args += [v.encode() for v in f.values()]
                args += [embedding_bytes(r), attributes(r), b"%d" % expire_at(b, ix.bucket_seconds, self.ttl)]
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
            payloads = self._pack(results)
            conn = self.client.connection_pool.get_connection()
            conn.send_packed_command(payloads)  # type: ignore[no-untyped-call]
        except redis.RedisError as e:
            if conn is not None:
                self._drop(conn)
            return RedisRequest(results, error=e)
        return RedisRequest(results, conn=conn, replies=len(payloads))

    def wait(self, request: RedisRequest, _reloaded: bool = False) -> None:
        """The reply of ``send``; raises SinkError if the batch is not stored (the caller retries)."""
        if not request.results:
            return
        conn = request.conn
        if conn is None:
            raise SinkError(f"redis: {type(request.error).__name__}: {request.error}") from request.error
        request.conn = None
        try:
            first: redis.ResponseError | None = None
            for _ in range(request.replies):  # read every reply, so the connection stays in step
                try:
                    conn.read_response()
                except redis.ResponseError as e:
                    first = first or e
            if first is not None:
                raise first
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
