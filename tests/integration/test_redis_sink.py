"""The Redis sink's batch script on the real Redis: per-candid hashes (compact listpacks), the
latest-per-object pointer by (jd, candid) whatever the order of arrival, the embedding in its
vector set or its own key, TTLs, idempotence."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis
from conftest import Stack, _free_port

from config.consumer import VectorIndexConfig
from consumer.redis_sink import RedisSink
from consumer.results import Result
from consumer.vector_index import read_embedding

pytestmark = pytest.mark.integration

CLASSES = ("AGN", "SN", "VS", "asteroid", "bogus")


def result(candid: int, object_id: str, jd: float, seed: int = 0) -> Result:
    rng = np.random.default_rng(seed)
    p = rng.random(5).astype(np.float32)
    return Result(candid=candid, object_id=object_id, jd=jd, fid=1, ra=10.0 + seed, dec=-5.0,
                  embedding=rng.normal(size=42).astype(np.float32), probabilities=p / p.sum(),
                  class_names=CLASSES, model_name="m", model_version="1", cutout_padded=False,
                  nan_fraction=(0.0, 0.0), alert_schema_version="4.02", processed_at_ms=int(time.time() * 1000),
                  source_topic="t", source_partition=0, source_offset=candid)  # fmt: skip


def snapshot(r: redis.Redis, prefix: str) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for k in r.scan_iter(f"{prefix}:*"):
        kind = r.type(k)
        out[k] = (r.hgetall(k) if kind == b"hash" else r.get(k) if kind == b"string"
                  else r.execute_command("VCARD", k))  # fmt: skip
    return out


@pytest.mark.parametrize("index", [None, VectorIndexConfig(mode="on")], ids=["plain", "indexed"])
def test_latest_per_object_never_moves_back(stack: Stack, index: VectorIndexConfig | None) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    prefix = f"sinktest{uuid.uuid4().hex[:6]}"
    sink = RedisSink(r, prefix, 120, index)
    a_new, a_old = result(11, "ZTF25aaaaaab", 2460001.5, 1), result(10, "ZTF25aaaaaab", 2460000.5, 2)
    b_tie_lo, b_tie_hi = result(20, "ZTF25aaaaaac", 2460002.5, 3), result(21, "ZTF25aaaaaac", 2460002.5, 4)
    c_only = result(30, "ZTF25aaaaaad", 2460003.5, 5)
    # One batch with the newer alert first, then the older one; a tie on jd broken by candid.
    sink.write([a_new, a_old, b_tie_hi, b_tie_lo, c_only])
    # A later batch replays an old alert: "latest" must not move back.
    sink.write([a_old])

    def obj(oid: str) -> dict[bytes, bytes]:
        return r.hgetall(f"{prefix}:obj:{oid}")

    # The object entry points at its latest alert.
    assert obj("ZTF25aaaaaab") == {b"candid": b"11", b"jd": repr(a_new.jd).encode()}
    assert obj("ZTF25aaaaaac")[b"candid"] == b"21"
    assert obj("ZTF25aaaaaad")[b"candid"] == b"30"
    # Every alert has its own compact hash with its probabilities, its embedding, and a TTL.
    for res in (a_new, a_old, b_tie_lo, b_tie_hi, c_only):
        key = f"{prefix}:cand:{res.candid}"
        h = r.hgetall(key)
        assert h[b"objectId"] == res.object_id.encode() and b"embedding" not in h
        assert r.object("encoding", key) == b"listpack", "every value under 64 bytes: the compact encoding"
        emb = read_embedding(r, prefix, index or VectorIndexConfig(), res.candid, "m:1", res.processed_at_ms)
        assert emb is not None
        if index is None:  # stored as given
            assert np.array_equal(emb, res.embedding) and 0 < r.ttl(f"{prefix}:emb:{res.candid}") <= 120
        else:  # the vector set keeps the direction (cosine)
            assert float(emb @ res.embedding / np.linalg.norm(emb) / np.linalg.norm(res.embedding)) > 0.9999
        assert float(h[b"p_SN"]) == pytest.approx(float(res.probabilities[1]), abs=1e-6)
        assert h[b"jd"] == repr(res.jd).encode()
        assert 0 < r.ttl(key) <= 120
    assert 0 < r.ttl(f"{prefix}:obj:ZTF25aaaaaab") <= 120
    # A newer alert moves it forward; writing the same batch again changes nothing.
    newest = result(12, "ZTF25aaaaaab", 2460009.5, 6)
    sink.write([newest])
    before = snapshot(r, prefix)
    sink.write([newest])
    assert snapshot(r, prefix) == before
    assert obj("ZTF25aaaaaab")[b"candid"] == b"12"
    assert len(before) == 6 + 3 + (6 if index is None else 1)


def test_send_then_wait_stores_the_batch_and_keeps_the_connection_in_step(stack: Stack) -> None:
    """send() returns before Redis answers; other commands may run meanwhile on other connections;
    wait() reads the reply and hands a clean connection back to the pool."""
    r = redis.Redis.from_url(stack.redis_url)
    prefix = f"sendtest{uuid.uuid4().hex[:6]}"
    sink = RedisSink(r, prefix, 120)
    batch = [result(100 + i, f"ZTF25aaaab{i:03d}"[:12], 2460000.5 + i, i) for i in range(300)]
    request = sink.send(batch)
    assert r.ping()  # another connection of the same pool, while the reply is still owed
    sink.wait(request)
    assert r.hget(f"{prefix}:cand:399", "objectId") == batch[-1].object_id.encode()
    assert sum(1 for _ in r.scan_iter(f"{prefix}:cand:*")) == 300
    # The connection went back in step: the next command on the pool gets its own reply.
    assert r.set(f"{prefix}:probe", "x") and r.get(f"{prefix}:probe") == b"x"
    sink.write(batch[:1])


def test_wait_raises_a_sink_error_when_redis_is_unreachable(stack: Stack) -> None:
    from consumer.retry import SinkError

    dead = redis.Redis(host="127.0.0.1", port=_free_port(), socket_connect_timeout=1)
    sink = RedisSink(dead, "deadtest", 60)
    request = sink.send([result(1, "ZTF25aaaaaaa", 2460000.5)])
    assert request.conn is None and request.error is not None
    with pytest.raises(SinkError, match="redis"):
        sink.wait(request)
    with pytest.raises(SinkError, match="redis"):
        sink.write([result(1, "ZTF25aaaaaaa", 2460000.5)])


def test_an_abandoned_request_closes_its_connection(stack: Stack) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    sink = RedisSink(r, f"abandon{uuid.uuid4().hex[:6]}", 60)
    request = sink.send([result(1, "ZTF25aaaaaaa", 2460000.5)])
    conn = request.conn
    assert conn is not None
    sink.abandon(request)
    assert request.conn is None and conn._sock is None  # closed, its unread reply dropped with it
    assert r.ping()
