"""The whole path on the real broker and Redis: replay -> `consumer run` -> both sinks -> commit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import ROOT, Stack

from alerts.decoder import SchemaCache, decode_alert
from alerts.synthetic import make_alert
from config import load_consumer_config
from consumer.peek import read_output_topic
from consumer.results import decode_result
from consumer.vector_index import read_embedding

from .helpers import create_topic, outcome, produce, run_consumer

pytestmark = pytest.mark.integration


def bad_messages() -> list[bytes]:
    good = make_alert(2_400_000_000_000_009_000).message
    return [
        good[: len(good) // 2],  # truncated Avro
        b"this is not avro",  # non-Avro
        b"",  # empty
        make_alert(2_400_000_000_000_009_001, science=None).message,  # missing cutout
        make_alert(2_400_000_000_000_009_002, difference=b"\x00" * 100).message,  # not gzip
    ]


def test_replay_consume_publish_commit(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    good_msgs = corpus[:: max(1, len(corpus) // 300)][:300]
    bad = bad_messages()
    values = good_msgs + bad
    # interleave the bad ones among the good ones
    values = [v for pair in zip(good_msgs[: len(bad)], bad, strict=True) for v in pair] + good_msgs[len(bad) :]
    cache = SchemaCache()
    good = {decode_alert(m, cache).candid for m in good_msgs}
    cfg_path, data = stack.config(tmp_path)
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    produce(stack.bootstrap, topic, values)

    rc = run_consumer(cfg_path, "--idle-exit", "6", log_path=tmp_path / "consumer.log")
    log = (tmp_path / "consumer.log").read_text()
    assert rc == 0, log[-3000:]

    o = outcome(cfg_path)
    assert set(o.output_candids) == good, "output topic: one record per good alert"
    assert all(n == 1 for n in o.output_candids.values()), "no duplicate without a fault"
    assert o.redis_candids == good
    assert len(o.dead_letters) == len(bad)
    assert sorted(v for v, _ in o.dead_letters) == sorted(bad)
    reasons = sorted(h["reason"].decode() for _, h in o.dead_letters)
    assert reasons == sorted(["truncated", "not_avro", "empty", "cutout_missing", "cutout_not_gzip"])
    for _, h in o.dead_letters:
        assert h["source_topic"].decode() == topic and int(h["source_offset"]) >= 0
    assert o.committed == o.end_offsets, "committed offsets reach the end of the input topic"
    print("\nend-to-end:", o.summary(good, len(bad)))

    # Redis layout: hash per candid, its embedding (in the vector index: the stack runs Redis 8),
    # latest-per-object pointers
    cfg = load_consumer_config(cfg_path, env={})
    r = redis.Redis.from_url(cfg.redis.url)
    some = next(iter(good))
    h = r.hgetall(f"{cfg.redis.key_prefix}:cand:{some}")
    assert int(h[b"candid"]) == some
    emb = read_embedding(r, cfg.redis.key_prefix, cfg.redis.index, some, h[b"model"].decode(), int(h[b"processed_at"]))
    assert emb is not None and emb.shape == (42,)
    assert 0 < r.ttl(f"{cfg.redis.key_prefix}:cand:{some}") <= cfg.redis.ttl_seconds
    obj = r.hgetall(f"{cfg.redis.key_prefix}:obj:{h[b'objectId'].decode()}")
    assert obj and int(obj[b"candid"]) in good, "latest-per-object pointer exists"

    # the default bundle's fused classifier: classes from metadata + history + stamps, and the
    # study's stamp-only probe beside them, in both sinks
    assert h[b"classifier"] == b"fused" and h[b"stamp_class"].decode() in ("AGN", "SN", "VS", "asteroid", "bogus")
    rec = next(decode_result(v) for v in read_output_topic(cfg, cfg.kafka.output_topic) if decode_result(v)["candid"] == some)
    assert rec["classifier"] == "fused" and rec["features_version"] >= 1 and rec["schemavsn"] == "3.1"
    assert rec["survey"] == "ztf" and rec["band"] in ("g", "r", "i") and rec["diaSourceId"] is None
    assert len(rec["stamp_probabilities"]) == len(rec["probabilities"]) == 5
    assert abs(sum(rec["probabilities"]) - 1) < 1e-4 and rec["probabilities"] != rec["stamp_probabilities"]
    assert rec["predicted_class"].encode() == h[b"class"]
    # the object's detections so far, in both sinks (schema 3.1; real alerts have them)
    alert = next(a for a in (decode_alert(m, cache) for m in good_msgs) if a.candid == some)
    assert (rec["ndethist"], rec["jdstarthist"]) == (alert.ndethist, alert.jdstarthist)
    assert h.get(b"ndethist") == (None if alert.ndethist is None else str(alert.ndethist).encode())


def test_replay_cli_and_peek(stack: Stack, tmp_path: Path) -> None:
    """`consumer replay` of a folder and a .tar.gz archive, then `consumer peek` prints the table."""
    import tarfile

    folder = tmp_path / "alerts"
    folder.mkdir()
    alerts = [make_alert(2_400_000_000_000_008_000 + i) for i in range(6)]
    for a in alerts[:3]:
        (folder / f"{a.candid}.avro").write_bytes(a.message)
    with tarfile.open(tmp_path / "night.tar.gz", "w:gz") as tar:
        for a in alerts[3:]:
            p = tmp_path / f"{a.candid}.avro"
            p.write_bytes(a.message)
            tar.add(p, arcname=p.name)
    cfg_path, data = stack.config(tmp_path)
    topic = data["kafka"]["input_topics"][0]
    cmd = [sys.executable, "-m", "consumer.cli", "replay", str(folder), str(tmp_path / "night.tar.gz"),
           "--topic", topic, "--config", str(cfg_path), "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "replayed 6 alerts" in res.stdout
    assert run_consumer(cfg_path, "--idle-exit", "5") == 0
    # run again in the same group on the drained topic: nothing to read, caught up by the committed
    # offsets (it used to wait for messages that never came)
    assert run_consumer(cfg_path, "--idle-exit", "3", timeout=90) == 0
    res = subprocess.run([sys.executable, "-m", "consumer.cli", "peek", "--config", str(cfg_path), "-n", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "6 results" in res.stdout and "6 ZTF and 0 Rubin candid hashes" in res.stdout
    assert str(alerts[-1].candid) in res.stdout or str(alerts[0].candid) in res.stdout


def test_redis_sink_reloads_its_script_after_a_flush(stack: Stack) -> None:
    """A restarted Redis has no scripts: the sink loads its compare-and-set script again."""
    import numpy as np

    from consumer.redis_sink import RedisSink
    from consumer.results import Result

    r = redis.Redis.from_url(stack.redis_url)
    sink = RedisSink(r, "scripttest", 60)
    res = Result(candid=1, object_id="ZTF25aaaaaaa", jd=2460000.5, fid=1, ra=1.0, dec=2.0,
                 embedding=np.zeros(4, np.float32), probabilities=np.full(5, 0.2, np.float32),
                 class_names=("AGN", "SN", "VS", "asteroid", "bogus"), model_name="m", model_version="1",
                 cutout_padded=False, nan_fraction=(0.0, 0.0), alert_schema_version="4.02", processed_at_ms=1,
                 source_topic="t", source_partition=0, source_offset=0)  # fmt: skip
    sink.write([res])
    r.script_flush()
    sink.write([res])
    assert r.hget("scripttest:obj:ZTF25aaaaaaa", "candid") == b"1"


def test_consumer_on_the_torch_free_runtime_bundle(stack: Stack, tmp_path: Path) -> None:
    """`consumer run` with model/bundles/default.npz (ONNX Runtime, no torch, its int8 graph under
    the default model.cpu_precision auto): both sinks get the fused classes, exactly those of the
    runtime model it logged, and those of the fp32 torch bundle on all but near-ties."""
    import numpy as np

    from consumer.inference import ModelRunner

    alerts = [make_alert(2_400_000_000_000_007_000 + i) for i in range(40)]
    npz = ROOT / "model" / "bundles" / "default.npz"
    cfg_path, data = stack.config(tmp_path, model={"bundle_path": str(npz)})
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    produce(stack.bootstrap, topic, [a.message for a in alerts])
    assert run_consumer(cfg_path, "--idle-exit", "5", log_path=tmp_path / "c.log") == 0
    assert "cpu (onnxruntime) int8" in (tmp_path / "c.log").read_text()
    cfg = load_consumer_config(cfg_path, env={})
    records = {decode_result(v)["candid"]: decode_result(v) for v in read_output_topic(cfg, cfg.kafka.output_topic)}
    assert set(records) == {a.candid for a in alerts}
    from alerts.decoder import SchemaCache as Cache
    from alerts.features import alert_features
    from alerts.message import decode_message

    cache = Cache()
    decoded = [decode_message(a.message, cache) for a in alerts]
    raw, feats = np.stack([px.pixels for _, px in decoded]), np.stack([alert_features(al) for al, _ in decoded])
    ref = ModelRunner(str(npz), "cpu", cpu_precision="auto")
    assert ref.precision == "int8"
    _, _, p = ref.predict(raw, feats)
    for (al, _), probs in zip(decoded, p, strict=True):
        rec = records[al.candid]
        assert rec["classifier"] == "fused" and rec["predicted_class"] == ref.class_names[int(probs.argmax())]
    _, _, p32 = ModelRunner(str(ROOT / "model" / "bundles" / "default.pt"), "cpu", cpu_precision="fp32").predict(raw, feats)
    assert (p32.argmax(1) == p.argmax(1)).mean() >= 0.95
    r = redis.Redis.from_url(cfg.redis.url)
    assert sum(1 for _ in r.scan_iter(f"{cfg.redis.key_prefix}:cand:*")) == len(alerts)
