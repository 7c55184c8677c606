"""The pure parts of similar-alert search and of the subscriber: index buckets against the TTL,
FILTER expressions built only from validated literals, reply parsing, exact search, the sink's
packed command with the index, and the subscriber's filter and table."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.consumer import VectorIndexConfig
from consumer.redis_keys import bucket_start, expire_at, index_key, live_buckets
from consumer.redis_sink import RedisSink, redis_fields
from consumer.results import Result
from consumer.subscribe import ResultFilter, json_ready, table_header, table_row
from consumer.vector_index import attributes, exact_neighbours, filter_expression, parse_vsim_reply

CLASSES = ("AGN", "SN", "VS", "asteroid", "bogus")


def result(candid: int = 7, processed_at_ms: int = 1_764_000_000_123, cls: int = 1) -> Result:
    p = np.full(5, 0.1, np.float32)
    p[cls] = 0.6
    return Result(candid=candid, object_id="ZTF25abcdefg", jd=2460000.75, fid=2, ra=1.0, dec=2.0,
                  embedding=np.arange(42, dtype=np.float32), probabilities=p, class_names=CLASSES,
                  model_name="stampstream-ae", model_version="20261126", cutout_padded=False,
                  nan_fraction=(0.0, 0.0), alert_schema_version="4.02", processed_at_ms=processed_at_ms,
                  source_topic="t", source_partition=0, source_offset=1)  # fmt: skip


@given(
    processed_s=st.integers(1_600_000_000, 2_000_000_000),
    age=st.floats(0, 30 * 86400),
    bucket=st.sampled_from([1, 60, 3600, 86400]),
    ttl=st.integers(1, 14 * 86400),
)
def test_a_query_searches_exactly_the_sets_that_can_still_exist(processed_s: int, age: float, bucket: int, ttl: int) -> None:
    b = bucket_start(processed_s * 1000, bucket)
    assert b <= processed_s < b + bucket
    now = processed_s + age
    alive = expire_at(b, bucket, ttl) > now
    assert (b in live_buckets(now, bucket, ttl)) == alive
    if age < ttl:  # within the alert's own TTL its set is always searched
        assert alive


def test_keys_and_attributes() -> None:
    r = result()
    assert index_key("stamp", "stampstream-ae:20261126", "noquant", 86400) == "stamp:vec:stampstream-ae:20261126:noquant:86400"
    a = json.loads(attributes(r))
    assert a == {"objectId": "ZTF25abcdefg", "class": "SN", "p": pytest.approx(0.6), "jd": 2460000.75}


@pytest.mark.parametrize("bad", ['ZTF25" or 1 == 1 or "', "ZTF25 aaa", "", "x" * 65])
def test_filter_refuses_what_is_not_an_id(bad: str) -> None:
    with pytest.raises(ValueError):
        filter_expression(bad, None)
    with pytest.raises(ValueError):
        filter_expression(None, bad)


def test_filter_expression() -> None:
    assert filter_expression("ZTF25abcdefg", "SN") == '.objectId != "ZTF25abcdefg" and .class == "SN"'
    assert filter_expression(None, None) is None


def test_vsim_reply_in_both_forms() -> None:
    attrs = b'{"objectId":"ZTF25abcdefg","class":"SN","p":0.9,"jd":2460000.5}'
    flat = [b"11", b"1", attrs, b"12", b"0.75", attrs]
    parsed = {b"11": [1.0, attrs], b"12": [0.75, attrs]}
    for reply in (flat, parsed):
        n = parse_vsim_reply(reply)  # type: ignore[arg-type]
        assert [x.candid for x in n] == [11, 12]
        assert n[0].similarity == pytest.approx(1.0) and n[1].similarity == pytest.approx(0.5)
        assert n[1].distance == pytest.approx(0.5) and n[0].predicted_class == "SN" and n[0].probability == 0.9


def test_exact_neighbours_is_the_cosine_ranking() -> None:
    rng = np.random.default_rng(1)
    v, q = rng.normal(size=(300, 42)), rng.normal(size=(7, 42))
    got = exact_neighbours(v, q, 10)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    for i in range(len(q)):
        assert list(got[i]) == list(np.argsort(-(vn @ q[i]))[:10])


def test_packed_batch_with_and_without_the_index() -> None:
    """KEYS: candid, object and embedding keys (vector sets when indexing, strings otherwise); per
    alert its fields, its embedding and (indexing) its attributes and the set's expire-at time; the
    index settings once in the header."""
    day0 = 1_764_000_000 - 1_764_000_000 % 86400
    day1 = day0 + 86400
    rs = [result(1), result(2, processed_at_ms=(day1 + 5) * 1000)]  # two different days
    plain = RedisSink(None, "p", 600)  # type: ignore[arg-type]
    plain._sha = b"x"
    ix = VectorIndexConfig(quantisation="q8", m=12, ef_construction=50)
    indexed = RedisSink(None, "p", 600, ix)  # type: ignore[arg-type]
    indexed._sha = b"x"

    def parts(payload: bytes) -> list[bytes]:
        lines = payload.split(b"\r\n")
        return [lines[i] for i in range(2, len(lines) - 1, 2)]

    (payload,) = plain._pack(rs)  # one survey and model: one script call
    a = parts(payload)  # EVALSHA sha numkeys KEYS... ttl k quant ef m names... values...
    assert a[2] == b"6" and a[7:9] == [b"p:emb:1", b"p:emb:2"]
    assert a[9] == b"600" and a[11:14] == [b"", b"0", b"0"]
    ka = int(a[10])
    names = a[14 : 14 + ka]
    first = a[14 + ka : 14 + 2 * ka + 1]
    assert first[names.index(b"candid")] == b"1" and np.frombuffer(first[ka], "<f4").tolist() == list(range(42))
    assert len(a) == 14 + ka + 2 * (ka + 1), "plain: the fields and the embedding per alert"
    (payload,) = indexed._pack(rs)
    b = parts(payload)
    assert b[2] == b"6"
    assert b[7:9] == [f"p:vec:stampstream-ae:20261126:q8:{day0}".encode(), f"p:vec:stampstream-ae:20261126:q8:{day1}".encode()]
    assert b[9] == b"600" and b[11:14] == [b"Q8", b"50", b"12"]
    k = int(b[10])
    names = b[14 : 14 + k]
    first = b[14 + k : 14 + 2 * k + 3]
    assert first[names.index(b"candid")] == b"1" and b"embedding" not in names
    assert np.frombuffer(first[k], "<f4").tolist() == list(range(42))
    assert json.loads(first[k + 1]) == json.loads(attributes(rs[0]))
    assert first[k + 2] == str(expire_at(day0, 86400, 600)).encode()
    second = b[14 + 2 * k + 3 :]
    assert second[k + 2] == str(expire_at(day1, 86400, 600)).encode() and len(second) == k + 3


def test_a_mixed_batch_packs_one_call_per_survey_under_its_own_keys() -> None:
    import dataclasses

    ztf = result(1)
    lsst = dataclasses.replace(result(2), survey="lsst", band="z", dia_source_id=2, dia_object_id=None, object_id="",
                               class_names=(), probabilities=np.zeros(0, np.float32),
                               stamp_probabilities=np.zeros(0, np.float32), classifier="none")  # fmt: skip
    sink = RedisSink(None, "p", 600)  # type: ignore[arg-type]
    sink._sha = b"x"
    first, second = sink._pack([ztf, lsst, ztf])
    assert b"p:cand:1" in first and b"p:lsst:" not in first
    assert b"p:lsst:cand:2" in second and b"p:lsst:obj:\r\n" in second and b"p:lsst:emb:2" in second
    fields = redis_fields(lsst)
    assert fields["class"] == "" and fields["classifier"] == "none" and fields["survey"] == "lsst"
    assert "survey" not in redis_fields(ztf), "ZTF's hash stays as it was"


def test_subscriber_filter_and_table() -> None:
    rec = {"candid": 7, "objectId": "ZTF25abcdefg", "predicted_class": "SN", "predicted_probability": 0.83,
           "jd": 2460000.75, "model_name": "m", "model_version": "1",
           "processed_at": dt.datetime(2026, 11, 26, 1, 2, 3, 456000, tzinfo=dt.UTC)}  # fmt: skip
    assert ResultFilter().matches(rec)
    assert ResultFilter(("SN",), 0.8).matches(rec)
    assert not ResultFilter(("SN",), 0.9).matches(rec)
    assert not ResultFilter(("AGN", "VS")).matches(rec)
    assert ResultFilter(surveys=("ztf",)).matches(rec), "a record without survey (schema < 3.0) is ZTF's"
    assert not ResultFilter(surveys=("lsst",)).matches(rec)
    assert ResultFilter(surveys=("lsst",)).matches(rec | {"survey": "lsst", "predicted_class": ""})
    assert ResultFilter(min_detections=5).matches(rec), "a record that does not say (schema < 3.1) passes"
    assert ResultFilter(min_detections=5).matches(rec | {"ndethist": 5})
    assert not ResultFilter(min_detections=5).matches(rec | {"ndethist": 4})
    assert "  12   " in table_row(rec | {"ndethist": 12}) and "  -    " in table_row(rec)
    row = table_row(rec)
    assert row.startswith("2026-11-26 01:02:03.456") and "ZTF25abcdefg" in row and "0.830" in row
    assert len(table_header().split()) == 8
    assert json.loads(json.dumps(json_ready(rec)))["processed_at"] == "2026-11-26T01:02:03.456000+00:00"
    assert table_row(rec | {"processed_at": 1_795_654_923_456}).startswith("2026-11-26 01:02:03.456")


@pytest.mark.parametrize("oid", ["ZTF25abcdefg", 'we"ird\\id', "ünï"])
def test_attributes_are_the_json_of_the_fields(oid: str) -> None:
    import dataclasses

    r = dataclasses.replace(result(), object_id=oid, jd=2460000.123456789)
    a = json.loads(attributes(r))
    assert a == {"objectId": oid, "class": "SN", "p": pytest.approx(0.6, abs=1e-6), "jd": 2460000.123456789}


def test_index_config_is_checked() -> None:
    from config.consumer import parse_consumer_config
    from config.loader import ConfigError

    cfg = parse_consumer_config({"redis": {"index": {"mode": "on", "quantisation": "q8", "m": 12, "query_ef": 50}}})
    assert cfg.redis.index == VectorIndexConfig(mode="on", quantisation="q8", m=12, query_ef=50)
    for bad in ({"m": 1}, {"bucket_seconds": 0}, {"mode": "maybe"}, {"quantisation": "fp16"}, {"ef": 3}):
        with pytest.raises(ConfigError):
            parse_consumer_config({"redis": {"index": bad}})
