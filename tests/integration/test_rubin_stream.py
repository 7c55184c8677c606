"""Rubin alerts on the real broker and Redis: every wire message of ../shared/rubin (generated
alerts of every packaged schema from 8.0 without it) alone, then mixed with ZTF alerts in one topic,
through `consumer run` into both sinks, with the offsets committed to the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from conftest import ROOT, Stack

from alerts.decoder import SchemaCache
from alerts.message import decode_any
from alerts.rubin import RubinSchemaCache
from config import load_consumer_config
from consumer.peek import read_output_topic
from consumer.results import decode_result
from consumer.vector_index import similar

from .helpers import create_topic, outcome, produce, run_consumer

pytestmark = pytest.mark.integration

RUBIN_WIRE = ROOT.parent / "shared" / "rubin" / "wire"


def rubin_messages() -> list[bytes]:
    if RUBIN_WIRE.is_dir():
        return [p.read_bytes() for p in sorted(RUBIN_WIRE.glob("*.bin"))]
    from alerts.rubin_schemas import packaged_ids
    from alerts.synthetic_rubin import make_rubin_message

    ids = [i for i in packaged_ids() if i >= 800]
    return [make_rubin_message(ids[i % len(ids)], 9_000_000 + i, seed=i, n_prv=i % 40) for i in range(60)]


def _run(stack: Stack, tmp_path: Path, values: list[bytes], **overrides: dict) -> tuple[Path, list[dict], redis.Redis, str]:
    cfg_path, data = stack.config(tmp_path, **overrides)
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    produce(stack.bootstrap, topic, values)
    rc = run_consumer(cfg_path, "--idle-exit", "6", log_path=tmp_path / "consumer.log")
    assert rc == 0, (tmp_path / "consumer.log").read_text()[-3000:]
    cfg = load_consumer_config(cfg_path, env={})
    records = [decode_result(v) for v in read_output_topic(cfg, cfg.kafka.output_topic)]
    return cfg_path, records, redis.Redis.from_url(cfg.redis.url), cfg.redis.key_prefix


def _check_rubin(records: list[dict], r: redis.Redis, prefix: str, expected: dict[int, str]) -> None:
    got = {rec["candid"]: rec for rec in records if rec["survey"] == "lsst"}
    assert set(got) == set(expected), "one result per Rubin alert"
    for sid, rec in got.items():
        assert rec["diaSourceId"] == sid and rec["classifier"] == "none" and rec["class_names"] == []
        assert len(rec["embedding"]) == 42 and rec["model_name"] == "stampstream-rubin-ae"
        assert rec["objectId"] == expected[sid] and (rec["diaObjectId"] is None) == (expected[sid] == "")
        h = r.hgetall(f"{prefix}:lsst:cand:{sid}")
        assert int(h[b"candid"]) == sid and h[b"survey"] == b"lsst" and h[b"classifier"] == b"none"
        if expected[sid]:
            assert r.hget(f"{prefix}:lsst:obj:{expected[sid]}", "candid") is not None
    assert not list(r.scan_iter(f"{prefix}:lsst:obj:", count=1000)), "no pointer for sources without an object"


def test_every_rubin_alert_alone(stack: Stack, tmp_path: Path) -> None:
    values = rubin_messages()
    cache = RubinSchemaCache()
    expected = {a.candid: a.object_id for a in (decode_any(v, SchemaCache(), cache)[0] for v in values)}
    cfg_path, records, r, prefix = _run(stack, tmp_path, values)
    _check_rubin(records, r, prefix, expected)
    o = outcome(cfg_path)
    assert not o.dead_letters and o.committed == o.end_offsets
    # the similarity index holds Rubin's embeddings too, under Rubin's keys
    cfg = load_consumer_config(cfg_path, env={})
    query = next(sid for sid, oid in expected.items() if oid)
    ans = similar(r, prefix, cfg.redis.index, cfg.redis.ttl_seconds, candid=query, k=5, survey="lsst")
    assert len(ans.neighbours) == 5 and all(n.candid in expected and n.candid != query for n in ans.neighbours)
    assert ans.model.startswith("stampstream-rubin-ae")
    print(f"\nrubin alone: {len(values)} alerts -> {len(records)} results, both sinks")


def test_a_mixed_ztf_and_rubin_topic(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    rubin = rubin_messages()
    ztf = corpus[:: max(1, len(corpus) // 150)][:150]
    values = [v for pair in zip(ztf, rubin, strict=False) for v in pair] + ztf[len(rubin) :] + rubin[len(ztf) :]
    caches = (SchemaCache(), RubinSchemaCache())
    alerts = [decode_any(v, *caches)[0] for v in values]
    expected_rubin = {a.candid: a.object_id for a in alerts if a.survey == "lsst"}
    expected_ztf = {a.candid for a in alerts if a.survey == "ztf"}
    cfg_path, records, r, prefix = _run(stack, tmp_path, values)
    _check_rubin(records, r, prefix, expected_rubin)
    z = [rec for rec in records if rec["survey"] == "ztf"]
    assert {rec["candid"] for rec in z} == expected_ztf and len(z) == len(expected_ztf)
    assert all(rec["classifier"] == "fused" and len(rec["class_names"]) == 5 for rec in z)
    o = outcome(cfg_path)
    assert o.redis_candids == expected_ztf, "ZTF keys where they always were"
    assert not o.dead_letters and o.committed == o.end_offsets
    print(f"\nmixed topic: {len(expected_ztf)} ZTF + {len(expected_rubin)} Rubin alerts, both sinks")


def test_without_a_rubin_bundle_rubin_alerts_are_dead_letters(stack: Stack, corpus: list[bytes], tmp_path: Path) -> None:
    rubin = rubin_messages()[:10]
    ztf = corpus[:20]
    cfg_path, records, _r, _prefix = _run(stack, tmp_path, ztf + rubin, rubin={"bundle_path": str(tmp_path / "none.npz")})
    assert {rec["survey"] for rec in records} == {"ztf"} and len(records) == 20
    o = outcome(cfg_path)
    assert sorted(h["reason"].decode() for _, h in o.dead_letters) == ["no_model_for_survey"] * 10
    assert sorted(v for v, _ in o.dead_letters) == sorted(rubin), "the raw messages, to replay later"
    assert o.committed == o.end_offsets
    assert "does not exist" in (tmp_path / "consumer.log").read_text()
