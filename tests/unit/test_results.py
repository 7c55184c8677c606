from __future__ import annotations

import dataclasses
import io

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.alert import count_or_none
from consumer.redis_sink import embedding_bytes, embedding_from_redis, redis_fields
from consumer.results import Result, ResultEncoder, decode_result, output_schema_json


def _result(candid: int = 123) -> Result:
    return Result(
        candid=candid, object_id="ZTF25abcdefg", jd=2460000.5, fid=2, ra=10.5, dec=-5.25,
        embedding=np.arange(42, dtype=np.float32) / 7, probabilities=np.array([0.1, 0.2, 0.4, 0.2, 0.1], np.float32),
        class_names=("AGN", "SN", "VS", "asteroid", "bogus"), model_name="m", model_version="3",
        cutout_padded=True, nan_fraction=(0.25, 0.0), alert_schema_version="4.02", processed_at_ms=1_700_000_000_000,
        source_topic="t", source_partition=1, source_offset=99,
        stamp_probabilities=np.array([0.5, 0.1, 0.1, 0.2, 0.1], np.float32), classifier="fused", features_version=1,
    )  # fmt: skip


def test_version_3_0_readers_and_records_still_work() -> None:
    """Schema 3.1 only adds ndethist and jdstarthist (defaults null): a 3.0 record read with 3.1
    says nothing of the object's detections, and a 3.1 message is read by a 3.0 reader."""
    v31 = output_schema_json()
    v30 = dict(v31, version="3.0", fields=[f for f in v31["fields"] if f["name"] not in ("ndethist", "jdstarthist")])
    r = dataclasses.replace(_result(), ndethist=12, jdstarthist=2459990.25)
    rec = next(iter(fastavro.reader(io.BytesIO(ResultEncoder().encode(r)))))
    assert rec["ndethist"] == 12 and rec["jdstarthist"] == 2459990.25
    old = io.BytesIO()
    fastavro.writer(old, fastavro.parse_schema(v30), [{f["name"]: rec[f["name"]] for f in v30["fields"]}])
    (upgraded,) = list(fastavro.reader(io.BytesIO(old.getvalue()), reader_schema=fastavro.parse_schema(v31)))
    assert upgraded["ndethist"] is None and upgraded["jdstarthist"] is None and upgraded["candid"] == 123
    (downgraded,) = list(fastavro.reader(io.BytesIO(ResultEncoder().encode(r)), reader_schema=fastavro.parse_schema(v30)))
    assert "ndethist" not in downgraded and downgraded["survey"] == "ztf"


def test_version_2_readers_and_records_still_work() -> None:
    """Schema 3.0 only adds fields with defaults (survey, band, Rubin ids): a 2.0 record read with
    3.0 is a ZTF result, and a 3.0 message is read by a reader that asks for the 2.0 fields."""
    v3 = output_schema_json()
    added = ("survey", "band", "diaSourceId", "diaObjectId", "ndethist", "jdstarthist")
    v2 = dict(v3, version="2.0", fields=[f for f in v3["fields"] if f["name"] not in added])
    rec = next(iter(fastavro.reader(io.BytesIO(ResultEncoder().encode(_result())))))
    old = io.BytesIO()
    fastavro.writer(old, fastavro.parse_schema(v2), [{f["name"]: rec[f["name"]] for f in v2["fields"]}])
    (upgraded,) = list(fastavro.reader(io.BytesIO(old.getvalue()), reader_schema=fastavro.parse_schema(v3)))
    assert upgraded["survey"] == "ztf" and upgraded["diaSourceId"] is None
    (downgraded,) = list(fastavro.reader(io.BytesIO(ResultEncoder().encode(_result())), reader_schema=fastavro.parse_schema(v2)))
    assert "survey" not in downgraded


def test_version_1_readers_and_records_still_work() -> None:
    """Schema 2.0 only adds fields with defaults: a 1.0 record read with the 2.0 schema gets them
    filled in, and a 2.0 message is read by a reader that asks for the 1.0 fields only."""
    v2 = output_schema_json()
    v1 = dict(v2, version="1.0", fields=[f for f in v2["fields"] if "default" not in f])
    rec = {k: v for k, v in fastavro.reader(io.BytesIO(ResultEncoder().encode(_result()))).__next__().items()}
    old = io.BytesIO()
    fastavro.writer(old, fastavro.parse_schema(v1), [{f["name"]: rec[f["name"]] for f in v1["fields"]}])
    (upgraded,) = list(fastavro.reader(io.BytesIO(old.getvalue()), reader_schema=fastavro.parse_schema(v2)))
    assert upgraded["stamp_probabilities"] == [] and upgraded["classifier"] == "stamp-probe"
    (downgraded,) = list(fastavro.reader(io.BytesIO(ResultEncoder().encode(_result())), reader_schema=fastavro.parse_schema(v1)))
    assert downgraded["candid"] == 123 and "classifier" not in downgraded


def test_output_message_is_a_valid_avro_container_with_the_repo_schema() -> None:
    msg = ResultEncoder().encode(_result())
    reader = fastavro.reader(io.BytesIO(msg))
    assert reader.writer_schema["name"] == "stampstream.stamp_result"
    (rec,) = list(reader)
    assert rec["candid"] == 123 and rec["predicted_class"] == "VS"
    assert abs(rec["predicted_probability"] - 0.4) < 1e-6
    np.testing.assert_allclose(rec["embedding"], np.arange(42) / 7, rtol=1e-6)
    assert rec["schemavsn"] == output_schema_json()["version"] == "3.1"
    assert rec["survey"] == "ztf" and rec["diaSourceId"] is None and rec["diaObjectId"] is None
    assert rec["ndethist"] is None and rec["jdstarthist"] is None, "not given: null, not 0"
    assert rec["classifier"] == "fused" and rec["features_version"] == 1
    np.testing.assert_allclose(rec["stamp_probabilities"], [0.5, 0.1, 0.1, 0.2, 0.1], rtol=1e-6)
    assert decode_result(msg)["source_offset"] == 99


def test_encoder_reuse_gives_independent_messages() -> None:
    enc = ResultEncoder()
    a, b = enc.encode(_result(1)), enc.encode(_result(2))
    assert decode_result(a)["candid"] == 1 and decode_result(b)["candid"] == 2


def test_redis_fields_are_short_and_the_embedding_round_trips() -> None:
    f = redis_fields(_result())
    assert f["class"] == "VS" and f["p_VS"] == "0.400000" and f["padded"] == "1"
    assert f["classifier"] == "fused" and f["stamp_class"] == "AGN" and f["stamp_probability"] == "0.500000"
    assert "embedding" not in f and max(len(v) for v in f.values()) <= 64, "Redis keeps such a hash as a listpack"
    np.testing.assert_array_equal(embedding_from_redis(embedding_bytes(_result())), np.arange(42, dtype=np.float32) / 7)
    assert "ndethist" not in f, "an alert that does not say writes no field"
    assert redis_fields(dataclasses.replace(_result(), ndethist=3))["ndethist"] == "3"


_I64 = st.integers(-(2**63), 2**63 - 1)
_I32 = st.integers(-(2**31), 2**31 - 1)
_F32 = st.floats(width=32, allow_nan=False)


@st.composite
def _results(draw: st.DrawFn) -> Result:
    names = tuple(draw(st.lists(st.text(max_size=12), min_size=0, max_size=6)))  # none: no classifier (Rubin)
    arrays = lambda n: st.lists(_F32, min_size=n, max_size=n).map(lambda v: np.array(v, np.float32))  # noqa: E731
    return Result(
        candid=draw(_I64), object_id=draw(st.text(max_size=20)), jd=draw(st.floats()), fid=draw(_I32),
        ra=draw(st.floats()), dec=draw(st.floats()), embedding=draw(st.integers(0, 130).flatmap(arrays)),
        probabilities=draw(arrays(len(names))), class_names=names, model_name=draw(st.text(max_size=30)),
        model_version=draw(st.text(max_size=30)), cutout_padded=draw(st.booleans()),
        nan_fraction=(draw(st.floats(0, 1)), draw(st.floats(0, 1))), alert_schema_version=draw(st.text(max_size=8)),
        processed_at_ms=draw(_I64), source_topic=draw(st.text(max_size=40)), source_partition=draw(_I32),
        source_offset=draw(_I64), stamp_probabilities=draw(st.sampled_from([0, len(names)]).flatmap(arrays)),
        classifier=draw(st.sampled_from(["fused", "stamp-probe", "none"])), features_version=draw(_I32),
        survey=draw(st.sampled_from(["ztf", "lsst"])), band=draw(st.text(max_size=2)),
        dia_source_id=draw(st.none() | _I64), dia_object_id=draw(st.none() | _I64),
        ndethist=draw(st.none() | _I32), jdstarthist=draw(st.none() | st.floats()),
    )  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_results())
def test_hand_encoding_is_byte_for_byte_fastavros(r: Result) -> None:
    enc = ResultEncoder()
    assert enc.encode(r) == enc.encode_with_fastavro(r)


def test_encoder_follows_a_change_of_model() -> None:
    enc = ResultEncoder()
    a = _result()
    b = Result(**{**{f: getattr(a, f) for f in Result.__slots__}, "model_version": "4", "class_names": ("x", "y", "z", "u", "v")})
    for r in (a, b, a):
        assert enc.encode(r) == enc.encode_with_fastavro(r)
        assert decode_result(enc.encode(r))["model_version"] == r.model_version


@pytest.mark.parametrize(("value", "expected"), [
    (12.0, 12), (0.0, 0), (float(2**31 - 1), 2**31 - 1), (float("nan"), None), (float("inf"), None),
    (-1.0, None), (float(2**31), None), (2.5, None),
])  # fmt: skip
def test_a_count_is_an_avro_int_or_none(value: float, expected: int | None) -> None:
    assert count_or_none(value) == expected


def test_detections_so_far_are_read_from_the_alert() -> None:
    """ZTF: candidate.ndethist / jdstarthist, NaN (null or absent from the writer schema) -> None;
    Rubin: the diaObject's nDiaSources / firstDiaSourceMjdTai as a Julian date."""
    from alerts.alert import Alert, History
    from alerts.allowlist import CANDIDATE_FIELDS
    from alerts.rubin import RUBIN_OBJECT_FIELDS, RubinSchemaCache, decode_rubin
    from alerts.synthetic_rubin import make_rubin_message

    c = np.full(len(CANDIDATE_FIELDS), np.nan)
    ztf = Alert(1, "ZTF25abcdefg", "4.02", c, "t", History.empty(), None, None)
    assert ztf.ndethist is None and ztf.jdstarthist is None
    c = c.copy()
    c[CANDIDATE_FIELDS.index("ndethist")], c[CANDIDATE_FIELDS.index("jdstarthist")] = 7.0, 2459990.5
    ztf = dataclasses.replace(ztf, candidate=c)
    assert ztf.ndethist == 7 and ztf.jdstarthist == 2459990.5
    rubin = decode_rubin(make_rubin_message(900, 7_001, seed=1), RubinSchemaCache())
    obj = dict(zip(RUBIN_OBJECT_FIELDS, rubin.obj, strict=True))
    assert np.isfinite(obj["firstDiaSourceMjdTai"]), "the synthetic alert has a diaObject"
    assert rubin.jdstarthist == obj["firstDiaSourceMjdTai"] + 2_400_000.5
    assert rubin.ndethist == (None if np.isnan(obj["nDiaSources"]) else int(obj["nDiaSources"]))
    alone = dataclasses.replace(rubin, obj=np.full(len(RUBIN_OBJECT_FIELDS), np.nan))
    assert alone.ndethist is None and alone.jdstarthist is None
