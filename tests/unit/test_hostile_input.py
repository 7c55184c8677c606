"""Crafted messages of each attack class of issue #11, decoded in-process: each is a named error
(its reason), never a crash, a hang or a memory bomb; and the allowed codecs read real data."""

from __future__ import annotations

import io
import json
import time
import zlib

import fastavro
import pytest
from attacks import (
    bzip2_bomb,
    deep_recursive_schema,
    deflate_blocks_past_the_cap,
    deflate_bomb,
    message_of,
    record_of,
    zero_byte_items,
)

from alerts.cutouts import gunzip
from alerts.decoder import SchemaCache, decode_alert, decode_alert_reference, decode_alerts
from alerts.errors import AlertDecodeError, BadAlertError
from alerts.framing import ContainerFramer, read_container_header
from alerts.limits import DecodeLimits
from alerts.message import decode_message
from alerts.schema_policy import json_depth
from alerts.synthetic import ALERT_SCHEMA, SCHEMA_JSON, make_alert

CANDID = 2_400_000_000_000_007_000


def _record() -> dict:
    return record_of(CANDID)


def _reason(msg: bytes, cache: SchemaCache | None = None) -> str:
    with pytest.raises(BadAlertError) as e:
        decode_message(msg, cache if cache is not None else SchemaCache())
    return e.value.reason


def test_deeply_nested_self_referencing_schema_is_refused_before_parsing() -> None:
    msg = deep_recursive_schema(20_000)
    t = time.monotonic()
    assert _reason(msg) == "schema_policy"
    assert time.monotonic() - t < 2.0
    assert json_depth(read_container_header(msg).schema_json) > 32


def test_recursive_named_type_is_refused() -> None:
    schema = json.loads(SCHEMA_JSON)
    schema["fields"].insert(2, {"name": "node", "type": {"type": "record", "name": "node", "fields": [
        {"name": "next", "type": ["null", "node"]}]}})  # fmt: skip
    assert _reason(ContainerFramer(json.dumps(schema).encode()).frame(b"\x00")) == "schema_policy"


@pytest.mark.parametrize("size", [-1, 2**31, 2**63, 1.5, "8", None, True])
def test_fixed_sizes_outside_avro_ints_are_refused(size: object) -> None:
    """A ``fixed`` field's size must be an int in 0..2^31 - 1: fastavro takes any value, and 2^63
    overflowed the compiled layout's int64 tables past every named error (found by fuzzing)."""
    schema = json.loads(SCHEMA_JSON)
    schema["fields"].insert(2, {"name": "blob", "type": {"type": "fixed", "name": "blob", "size": size}})
    assert _reason(ContainerFramer(json.dumps(schema).encode()).frame(b"\x00" * 64)) == "schema_policy"


def test_a_plausible_fixed_field_is_read() -> None:
    schema = json.loads(SCHEMA_JSON)
    schema["fields"].insert(2, {"name": "blob", "type": {"type": "fixed", "name": "blob", "size": 16}})
    alert, _ = decode_message(message_of(schema, _record() | {"blob": b"\x01" * 16}), SchemaCache())
    assert alert.candid == CANDID


def test_array_of_zero_byte_items_is_refused() -> None:
    hostile = zero_byte_items(CANDID)
    t = time.monotonic()
    assert _reason(hostile) == "schema_policy"
    assert time.monotonic() - t < 2.0


def test_wrong_field_types_are_refused() -> None:
    for path, new in ((("candid",), "double"), (("candidate", "jd"), "string")):
        schema = json.loads(SCHEMA_JSON)
        fields = schema["fields"]
        if path[0] == "candidate":
            fields = next(f for f in fields if f["name"] == "candidate")["type"]["fields"]
        next(f for f in fields if f["name"] == path[-1])["type"] = new
        assert _reason(ContainerFramer(json.dumps(schema).encode()).frame(b"\x00")) == "schema_policy"


def test_deflate_and_snappy_are_read_by_default_bzip2_only_where_allowed_and_all_are_bounded() -> None:
    record = _record()
    out = {}
    for codec in ("deflate", "bzip2", "snappy"):
        buf = io.BytesIO()
        fastavro.writer(buf, fastavro.parse_schema(ALERT_SCHEMA), [record], codec=codec)
        out[codec] = buf.getvalue()
        if codec in ("deflate", "snappy"):  # Avro's required codec, and Spark's default: read by default
            assert decode_alert(out[codec], SchemaCache()) == decode_alert_reference(out[codec])
            assert _reason(out[codec], SchemaCache(DecodeLimits(allowed_codecs=()))) == "codec"
        else:
            assert _reason(out[codec]) == "codec"
        allowed = SchemaCache(DecodeLimits(allowed_codecs=(codec,)))
        assert decode_alert(out[codec], allowed) == decode_alert_reference(out[codec])
        tiny = SchemaCache(DecodeLimits(allowed_codecs=(codec,), max_block_bytes=1000))
        assert _reason(out[codec], tiny) == "too_large"


def test_a_deflate_bomb_is_stopped_at_the_cap_by_default() -> None:
    """~20 KB of deflate that would inflate to 20 MiB: inflated up to the 16 MiB cap, then refused."""
    msg = deflate_bomb()
    assert len(msg) < 64 * 1024
    t = time.monotonic()
    assert _reason(msg) == "too_large"
    assert time.monotonic() - t < 5.0


def test_the_inflate_cap_counts_every_block_of_a_message() -> None:
    """20 deflate blocks of one valid record each (1 MiB inflated, ~1 KB on the wire): no block
    is near the cap, together they pass it. Under a cap that holds them all they decode (and the
    stream path refuses the 20 records as not one alert)."""
    msg = deflate_blocks_past_the_cap(CANDID, blocks=20)
    assert len(msg) < 256 * 1024
    assert _reason(msg) == "too_large"
    cache = SchemaCache(DecodeLimits(max_block_bytes=32 * 1024 * 1024))
    assert len(decode_alerts(msg, cache)) == 20
    assert _reason(msg, cache) == "not_one_record"
    fewer = deflate_blocks_past_the_cap(CANDID, blocks=12)
    assert len(decode_alerts(fewer, SchemaCache())) == 12


def test_a_bzip2_bomb_is_stopped_at_the_cap() -> None:
    """2.6 KB of bzip2 that would inflate to ~770 MB: read up to the cap, then refused."""
    msg = bzip2_bomb()
    assert len(msg) < 4096
    cache = SchemaCache(DecodeLimits(allowed_codecs=("bzip2",)))
    t = time.monotonic()
    assert _reason(msg, cache) == "too_large"
    assert time.monotonic() - t < 5.0


def test_gzip_stamp_bomb_and_trailing_members_are_refused() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(b"\x00" * (64 * 1024 * 1024)) + bomb.flush()
    with pytest.raises(BadAlertError) as e:
        gunzip(data, max_bytes=4 * 1024 * 1024)
    assert e.value.reason == "cutout_too_large"
    good = make_alert(2_400_000_000_000_007_001)
    rec = next(iter(fastavro.reader(io.BytesIO(good.message))))
    stamp = rec["cutoutScience"]["stampData"]
    with pytest.raises(BadAlertError) as e:
        gunzip(stamp + stamp)
    assert e.value.reason == "cutout_not_gzip"


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("candidate", "jd"), float("nan"), "missing_field"),  # NaN reads as null
        (("candidate", "jd"), float("inf"), "bad_value"),
        (("candidate", "ra"), 400.0, "bad_value"),
        (("candidate", "dec"), -91.0, "bad_value"),
        (("objectId",), "ZTF" + "a" * 5000, "bad_value"),
        (("objectId",), "'; DROP TABLE", "bad_value"),
        (("candid",), -5, "bad_value"),
    ],
)
def test_values_are_checked_at_decode_time(path: tuple[str, ...], value: object, reason: str) -> None:
    rec = _record()
    target = rec
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    msg = message_of(ALERT_SCHEMA, rec)
    assert _reason(msg) == reason
    with pytest.raises(AlertDecodeError):
        decode_alert(msg, SchemaCache(), fast=False)


def test_a_flood_of_distinct_schemas_stays_bounded_in_bytes() -> None:
    cache = SchemaCache(DecodeLimits(max_schema_cache_bytes=200_000))
    for i in range(60):
        schema = json.loads(SCHEMA_JSON) | {"doc": f"padding {i} " + "x" * 20_000}
        decode_alert(message_of(schema, _record()), cache)
    assert cache._bytes <= 200_000 and len(cache) < 60


def test_official_schemas_pass_by_fingerprint_and_others_by_the_rules(corpus: list[bytes]) -> None:
    from conftest import HAVE_SHARED

    from alerts.framing import read_container_header

    cache = SchemaCache()
    for msg in corpus:
        decode_alert(msg, cache)
    plans = [cache.plan(read_container_header(m).schema_json) for m in corpus[:: max(1, len(corpus) // 50)]]
    if HAVE_SHARED:
        assert all(p.official for p in plans), "every real writer schema is an official one"
    assert not SchemaCache().plan(SCHEMA_JSON).official, "the generated test schema is judged by the rules"


def _framing_cases() -> list[tuple[str, bytes, str]]:
    """One valid record in containers crafted around it (found by a fuzzing round of 2026-11-28:
    each was already refused by name; kept so that it stays so)."""
    from alerts.framing import zigzag

    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ALERT_SCHEMA), record_of(CANDID + 1))
    rec, framer = body.getvalue(), ContainerFramer(SCHEMA_JSON)
    block = framer.frame(rec)[len(framer.header) :]
    flood = b"".join(zigzag(2) + b"k%d" % (i % 10) + zigzag(1) + b"v" for i in range(100_000))
    return [
        ("metadata map claiming 100,001 entries", b"Obj\x01" + zigzag(100_001) + zigzag(11) + b"avro.schema"
         + zigzag(len(SCHEMA_JSON)) + SCHEMA_JSON + flood + zigzag(0) + framer.sync + block, "not_avro"),
        ("sync marker that is not the header's", framer.frame(rec)[:-16] + b"\x00" * 16, "truncated"),
        ("bytes after the last block", framer.frame(rec) + b"garbage", "truncated"),
        ("block size past the message", framer.header + zigzag(1) + zigzag(len(rec) + 100) + rec + framer.sync, "truncated"),
        ("block size short of the record", framer.header + zigzag(1) + zigzag(len(rec) - 100) + rec + framer.sync, "truncated"),
        ("a header and no block", framer.header, "no_records"),
        ("a codec the reader does not know", framer.header.replace(zigzag(4) + b"null", zigzag(9) + b"zstandard") + block, "codec"),
        ("a writer schema that is not UTF-8", ContainerFramer(b"\xff\xfe" + SCHEMA_JSON).frame(rec), "not_avro"),
        ("two records in one block", framer.header + zigzag(2) + zigzag(2 * len(rec)) + rec + rec + framer.sync, "not_one_record"),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "message", "reason"), _framing_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_crafted_framing_is_a_named_error(name: str, message: bytes, reason: str) -> None:
    t = time.monotonic()
    assert _reason(message) == reason, name
    assert _reason(message, SchemaCache(DecodeLimits(allowed_codecs=("deflate", "snappy", "bzip2")))) == reason, name
    assert time.monotonic() - t < 5.0
