"""Similar-alert search and the subscriber on the real services: the sink feeds the Redis 8
vector sets, `similar` finds exact neighbours (a small set: HNSW is exact there), filters by class
and leaves the query's own object out, the index expires with the TTL, Redis 7 keeps the plain
sink, and a subscriber reads live results from the real broker, filtered."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import ROOT, Stack, _free_port

from config.consumer import VectorIndexConfig, load_consumer_config
from consumer.clients import producer_settings
from consumer.redis_keys import index_key
from consumer.redis_sink import RedisSink
from consumer.results import Result, ResultEncoder
from consumer.subscribe import ResultFilter, subscribe
from consumer.vector_index import (
    IndexUnavailable,
    NotFound,
    exact_neighbours,
    resolve_index,
    server_has_vector_sets,
    similar,
)

from .helpers import create_topic, run_consumer

pytestmark = pytest.mark.integration

CLASSES = ("AGN", "SN", "VS", "asteroid", "bogus")
INDEX = VectorIndexConfig(mode="on", quantisation="noquant", m=16, ef_construction=200, query_ef=200)


def results(n: int, seed: int = 0, now_ms: int | None = None) -> list[Result]:
    """n results in 8 clusters of embeddings; 3 alerts per object; classes by cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, 42))
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    out = []
    for i in range(n):
        c = i % 8
        p = np.full(5, 0.05, np.float32)
        p[c % 5] = 0.8
        out.append(Result(
            candid=3_000_000_000_000_000_000 + i, object_id=f"ZTF25{i // 3:07d}", jd=2460000.5 + i * 0.01, fid=1,
            ra=1.0, dec=2.0, embedding=(centres[c] + 0.3 * rng.normal(size=42)).astype(np.float32),
            probabilities=p, class_names=CLASSES, model_name="m", model_version="1", cutout_padded=False,
            nan_fraction=(0.0, 0.0), alert_schema_version="4.02", processed_at_ms=now_ms, source_topic="t",
            source_partition=0, source_offset=i,
        ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def r8(stack: Stack) -> redis.Redis:
    r = redis.Redis.from_url(stack.redis_url)
    # scripts/setup.sh installs Redis 8 and the stack runs it: without it this tier is not run.
    assert server_has_vector_sets(r), "the test stack's Redis has no vector sets (deploy/local/stack.sh redis8)"
    return r


def test_index_fed_by_the_sink_and_queried(r8: redis.Redis) -> None:
    prefix = f"sim{uuid.uuid4().hex[:6]}"
    res = results(240)
    sink = RedisSink(r8, prefix, 600, resolve_index(r8, INDEX))
    for i in range(0, len(res), 64):
        sink.write(res[i : i + 64])
    sink.write(res[:64])  # a retried batch: VADD of a known candid updates, nothing doubles
    bucket = (res[0].processed_at_ms // 1000) // 86400 * 86400
    key = index_key(prefix, "m:1", "noquant", bucket)
    assert r8.execute_command("VCARD", key) == len(res)
    assert 0 < r8.ttl(key) <= 86400 + 600

    emb = np.stack([x.embedding for x in res])
    q = res[5]
    ans = similar(r8, prefix, INDEX, 600, candid=q.candid, k=10)
    assert ans.candid == q.candid and ans.object_id == q.object_id and ans.model == "m:1"
    # exact neighbours, the query's own object excluded
    others = [i for i, x in enumerate(res) if x.object_id != q.object_id]
    want = [res[others[j]].candid for j in exact_neighbours(emb[others], emb[5:6], 10)[0]]
    assert [n.candid for n in ans.neighbours] == want
    top = ans.neighbours[0]
    ref = res[[x.candid for x in res].index(top.candid)]
    want_cos = float(ref.embedding @ q.embedding / np.linalg.norm(ref.embedding) / np.linalg.norm(q.embedding))
    assert top.similarity == pytest.approx(want_cos, abs=1e-4) and top.distance == pytest.approx(1 - want_cos, abs=1e-4)
    assert top.object_id == ref.object_id and top.predicted_class == ref.predicted_class and top.jd == ref.jd
    assert all(n.object_id != q.object_id for n in ans.neighbours)

    # own object on request; a class filter; an object's latest alert as the query
    mine = similar(r8, prefix, INDEX, 600, candid=q.candid, k=3, include_same_object=True)
    assert q.candid not in [n.candid for n in mine.neighbours]
    sn = similar(r8, prefix, INDEX, 600, candid=q.candid, k=5, cls="AGN")
    assert sn.neighbours and all(n.predicted_class == "AGN" for n in sn.neighbours)
    latest = similar(r8, prefix, INDEX, 600, object_id=q.object_id, k=3)
    assert latest.candid == max(x.candid for x in res if x.object_id == q.object_id)
    with pytest.raises(NotFound):
        similar(r8, prefix, INDEX, 600, candid=1, k=3)


def test_index_expires_with_the_ttl(r8: redis.Redis) -> None:
    prefix = f"simttl{uuid.uuid4().hex[:6]}"
    cfg = VectorIndexConfig(mode="on", bucket_seconds=1)
    res = results(16)
    RedisSink(r8, prefix, 1, resolve_index(r8, cfg)).write(res)
    assert similar(r8, prefix, cfg, 1, candid=res[0].candid, k=3).neighbours
    time.sleep(3.2)  # bucket (1 s) + TTL (1 s), and a margin
    assert not r8.keys(f"{prefix}:*"), "hashes and vector sets are gone"
    with pytest.raises(NotFound):
        similar(r8, prefix, cfg, 1, candid=res[0].candid, k=3)


def test_plain_sink_on_redis_7(tmp_path: Path) -> None:
    """Debian's Redis 7.0 has no vector sets: auto writes plain hashes, on refuses to start."""
    binary = shutil.which("redis-server")
    assert binary, "Debian's redis-server (scripts/setup.sh installs it)"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    if " v=7." not in version:
        pytest.skip(f"the system redis-server is not 7.x: {version}")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        r7 = redis.Redis(port=port)
        for _ in range(100):
            try:
                r7.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert not server_has_vector_sets(r7)
        assert resolve_index(r7, VectorIndexConfig()) is None
        with pytest.raises(IndexUnavailable):
            resolve_index(r7, VectorIndexConfig(mode="on"))
        res = results(10)
        RedisSink(r7, "plain", 60, resolve_index(r7, VectorIndexConfig())).write(res)
        assert len(r7.keys("plain:cand:*")) == 10 and not r7.keys("plain:vec:*")
        assert len(r7.keys("plain:emb:*")) == 10, "the embedding in its own key"
        with pytest.raises(IndexUnavailable):  # a query says why, instead of an unknown-command error
            similar(r7, "plain", VectorIndexConfig(), 60, candid=res[0].candid)
    finally:
        proc.terminate()
        proc.wait(10)


def test_subscriber_reads_live_results_filtered(stack: Stack, tmp_path: Path) -> None:
    cfg_path, data = stack.config(tmp_path)
    cfg = load_consumer_config(cfg_path, env={})
    create_topic(stack.bootstrap, cfg.kafka.output_topic, 2)
    res = results(40)
    want = {x.candid for x in res if x.predicted_class == "SN"}
    got: list[dict[str, object]] = []
    done = threading.Event()

    def follow() -> None:
        for rec in subscribe(cfg, ResultFilter(("SN",), 0.5), idle_timeout_s=20, stop=done.is_set):
            got.append(rec)
            if len(got) == len(want):
                done.set()

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(4)  # live: the subscriber (latest offsets) is in its group before anything is published
    from confluent_kafka import Producer

    producer, enc = Producer(producer_settings(cfg.kafka)), ResultEncoder()
    for x in res:
        producer.produce(cfg.kafka.output_topic, enc.encode(x), key=str(x.candid).encode())
    producer.produce(cfg.kafka.output_topic, b"not an output record")  # skipped, not fatal
    producer.flush(30)
    t.join(60)
    done.set()
    assert {int(str(rec["candid"])) for rec in got} == want
    assert all(rec["predicted_class"] == "SN" for rec in got)


def test_similar_and_subscribe_commands_after_a_run(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    """The README's path: the daemon indexes what it publishes, `consumer similar` finds
    neighbours, `consumer subscribe --from-beginning` prints the filtered records."""
    from .helpers import produce

    cfg_path, data = stack.config(tmp_path, redis={"index": {"mode": "on"}})
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    produce(stack.bootstrap, topic, corpus[:60])
    assert run_consumer(cfg_path, "--idle-exit", "5") == 0
    cfg = load_consumer_config(cfg_path, env={})
    r = redis.Redis.from_url(cfg.redis.url)
    some = int(next(iter(r.scan_iter(f"{cfg.redis.key_prefix}:cand:*"))).decode().rsplit(":", 1)[1])
    cli = [sys.executable, "-m", "consumer.cli"]
    out = subprocess.run([*cli, "similar", "--config", str(cfg_path), "--candid", str(some), "-k", "5", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    ans = json.loads(out.stdout)
    assert ans["candid"] == some and 1 <= len(ans["neighbours"]) <= 5
    assert all(n["objectId"] != ans["objectId"] for n in ans["neighbours"])
    table = subprocess.run([*cli, "similar", "--config", str(cfg_path), "--candid", str(some)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0 and "distance" in table.stdout
    sub = subprocess.run([*cli, "subscribe", "--config", str(cfg_path), "--from-beginning", "--json", "--idle-exit", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    lines = [json.loads(x) for x in sub.stdout.splitlines() if x.strip()]
    assert len(lines) == len(list(r.scan_iter(f"{cfg.redis.key_prefix}:cand:*")))
