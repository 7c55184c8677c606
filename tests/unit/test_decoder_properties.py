"""Property tests: truncated and mutated alert bytes raise the named error (BadAlertError) and
nothing else, whatever the damage."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.framing import read_container_header, zigzag
from alerts.message import decode_message
from alerts.synthetic import make_alert

GOOD = make_alert(2_400_000_000_000_000_100, n_prv=5).message
CACHE = SchemaCache()
# The mutation fuzzer's budget: short in CI; a longer run is `STAMPSTREAM_FUZZ_EXAMPLES=20000
# .venv/bin/python -m pytest tests/unit/test_decoder_properties.py` (docs/faults.md).
EXAMPLES = int(os.environ.get("STAMPSTREAM_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_named_error(data: bytes) -> None:
    try:
        _, stamp = decode_message(data, CACHE)
    except BadAlertError as e:
        assert e.reason and isinstance(e.reason, str)
        return
    assert stamp.pixels.shape == (2, 21, 21)
    assert np.isfinite(stamp.pixels).any()


@SETTINGS
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_alerts_raise_named_error(n: int) -> None:
    try:
        decode_message(GOOD[:n], CACHE)
    except BadAlertError:
        return
    raise AssertionError(f"a message truncated to {n} of {len(GOOD)} bytes decoded")


@SETTINGS
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=20))
def test_mutated_alerts_decode_or_raise_named_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD)
    for pos, value in edits:
        data[pos] = value
    _decode_or_named_error(bytes(data))


def _deflated(message: bytes) -> bytes:
    import io

    import fastavro

    reader = fastavro.reader(io.BytesIO(message))
    buf = io.BytesIO()
    fastavro.writer(buf, reader.writer_schema, list(reader), codec="deflate")
    return buf.getvalue()


GOOD_DEFLATED = _deflated(GOOD)  # deflate is read by default (Avro's required codec)


@SETTINGS
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD_DEFLATED) - 1), st.integers(0, 255)),
                min_size=1, max_size=20), st.integers(min_value=1, max_value=len(GOOD_DEFLATED)))  # fmt: skip
def test_mutated_deflate_containers_decode_or_raise_named_error(edits: list[tuple[int, int]], keep: int) -> None:
    """Byte edits and a truncation of a deflate container, mostly inside its compressed block."""
    data = bytearray(GOOD_DEFLATED)
    for pos, value in edits:
        data[pos] = value
    _decode_or_named_error(bytes(data[:keep]))


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_raise_named_error(data: bytes) -> None:
    _decode_or_named_error(data)


@SETTINGS
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=len(GOOD)))
def test_inserted_bytes_decode_or_raise_named_error(chunk: bytes, at: int) -> None:
    _decode_or_named_error(GOOD[:at] + chunk + GOOD[at:])


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 2**62, -(2**62), 2**31])
def test_extreme_varints_anywhere_in_the_fields_decode_or_raise_named_error(value: int) -> None:
    """Exhaustive over the record's fields (all but the stamps' bytes): the varint of ``value``
    written at every position, so every length, count and union index meets it. The compiled
    reader's bounds checks once overflowed on a length near 2^63 and read outside the message
    (a segfault, found by mutation fuzzing: random byte edits almost never make such a varint)."""
    start = read_container_header(GOOD).body_offset
    stop = GOOD.index(b"\x1f\x8b")  # the first stamp's gzip stream
    varint = zigzag(value)
    for pos in range(start, stop):
        _decode_or_named_error(GOOD[:pos] + varint + GOOD[pos + len(varint) :])


def _one_real_alert_per_writer_schema() -> list[bytes]:
    from conftest import HAVE_SHARED, real_messages

    if not HAVE_SHARED:
        return []
    seen: dict[bytes, bytes] = {}
    from alerts.decoder import read_container_header

    for msg in real_messages():
        seen.setdefault(read_container_header(msg).schema_json, msg)
    return list(seen.values())


REAL = _one_real_alert_per_writer_schema()


@pytest.mark.skipif(not REAL, reason="../shared/ztf absent: the generated alert above covers the decoder")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_real_alerts_of_every_schema_decode_or_raise_named_error(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(REAL))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(msg) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    buf = bytearray(msg)
    for pos, value in edits:
        buf[pos] = value
    _decode_or_named_error(bytes(buf))
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(BadAlertError):
        decode_message(msg[:cut], CACHE)


# ---- fast path == general path ---------------------------------------------------------------

PATH_SAMPLES = [GOOD, make_alert(2_400_000_000_000_000_101, n_prv=0).message, *REAL]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_equals_general_path_on_mutated_alerts(data: st.DataObject) -> None:
    """Mutated real and generated alert bytes: the fast path either raises a named error or returns
    exactly what fastavro's general path returns for the same bytes. (The general path is only
    asked when the fast one parsed the record: on hostile counts fastavro itself can hang.)"""
    from alerts.decoder import decode_alert

    msg = data.draw(st.sampled_from(PATH_SAMPLES))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(msg) - 1), st.integers(0, 255)), min_size=1, max_size=6))
    buf = bytearray(msg)
    for pos, value in edits:
        buf[pos] = value
    mutated = bytes(buf)
    cache = SchemaCache()
    try:
        fast = decode_alert(mutated, cache)
    except BadAlertError:
        return
    assert decode_alert(mutated, cache, fast=False) == fast


def test_fast_path_is_taken_for_the_samples() -> None:
    cache = SchemaCache()
    for msg in PATH_SAMPLES:
        decode_message(msg, cache)
    assert cache.fast_hits == len(PATH_SAMPLES) and cache.fast_misses == 0


# ---- mutated writer schemas ----------------------------------------------------------------------

_FILL = {"float": 0.0, "double": 0.0, "int": 0, "long": 0, "string": "", "boolean": False, "bytes": b""}


def _records_of(msg: bytes) -> tuple[dict, dict]:
    import io
    import json

    import fastavro

    from alerts.framing import read_container_header

    schema = json.loads(read_container_header(msg).schema_json)
    return schema, next(iter(fastavro.reader(io.BytesIO(msg))))


def _mutate(schema: dict, record: dict, data: st.DataObject) -> None:
    """One structural change of a writer schema, with the record adjusted to stay valid."""
    cand_type = next(f for f in schema["fields"] if f["name"] == "candidate")["type"]
    cand_rec = cand_type if isinstance(cand_type, dict) else next(t for t in cand_type if isinstance(t, dict))
    where = data.draw(st.sampled_from(["top", "candidate"]))
    fields = schema["fields"] if where == "top" else cand_rec["fields"]
    values = record if where == "top" else record["candidate"]
    kind = data.draw(st.sampled_from(["swap_union", "not_null", "widen", "insert", "remove"]))
    i = data.draw(st.integers(0, len(fields) - 1))
    f = fields[i]
    t = f["type"]
    protected = {"objectId", "candid", "candidate", "jd", "fid", "ra", "dec", "cutoutScience", "cutoutDifference"}
    if kind == "swap_union" and isinstance(t, list) and len(t) == 2:
        f["type"] = [t[1], t[0]]
        f.pop("default", None)
    elif kind == "not_null" and isinstance(t, list) and "null" in t and len(t) == 2:
        other = next(b for b in t if b != "null")
        if isinstance(other, str) and other in _FILL:
            f["type"] = other
            f.pop("default", None)
            if values.get(f["name"]) is None:
                values[f["name"]] = _FILL[other]
    elif kind == "widen" and t in ("float", ["null", "float"]):
        f["type"] = "double" if t == "float" else ["null", "double"]
    elif kind == "insert":
        new_type = data.draw(st.sampled_from(["int", "long", "float", "double", "string", "boolean", "bytes"]))
        name = f"extra_{len(fields)}_{i}"
        if any(x["name"] == name for x in fields):
            return
        fields.insert(i, {"name": name, "type": new_type})
        values[name] = _FILL[new_type]
    elif kind == "remove" and f["name"] not in protected:
        del fields[i]
        values.pop(f["name"], None)


@settings(max_examples=max(60, EXAMPLES // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_equals_general_path_on_mutated_schemas(data: st.DataObject) -> None:
    import io
    import json

    import fastavro

    from alerts.decoder import decode_alert
    from alerts.framing import ContainerFramer

    schema, record = _records_of(data.draw(st.sampled_from(PATH_SAMPLES)))
    for _ in range(data.draw(st.integers(1, 4))):
        _mutate(schema, record, data)
    body = io.BytesIO()
    try:
        fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    except (TypeError, ValueError, fastavro.schema.SchemaParseException):
        return  # the mutation made a schema the record cannot be written in: not a case
    message = ContainerFramer(json.dumps(schema).encode()).frame(body.getvalue())
    cache = SchemaCache()
    try:
        fast = decode_alert(message, cache)
    except BadAlertError:
        return
    assert cache.fast_hits == 1, "a mutated ZTF-like schema still takes the fast path"
    assert decode_alert(message, cache, fast=False) == fast


def _stamp_fits() -> bytes:
    import io

    from astropy.io import fits

    raw = io.BytesIO()
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(63, 63)).astype(np.float32)).writeto(raw)
    return raw.getvalue()


STAMP_FITS = _stamp_fits()
CARD_NAMES = [b"SIMPLE", b"BITPIX", b"NAXIS", b"NAXIS1", b"NAXIS2", b"NAXIS3", b"BSCALE", b"BZERO", b"BLANK",
              b"EXTEND", b"XTENSION", b"PCOUNT", b"GCOUNT", b"END", b"ZIMAGE", b"ZNAXIS1"]  # fmt: skip
CARD_VALUES = [b"-64", b"-32", b"8", b"16", b"32", b"64", b"0", b"1", b"2", b"3", b"-1", b"999", b"63", b"1000000",
               b"2147483647", b"99999999999999999999", b"1E300", b"NAN", b"T", b"F", b"'IMAGE   '", b"", b"0.5"]  # fmt: skip


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 35), st.sampled_from(CARD_NAMES), st.sampled_from(CARD_VALUES)), min_size=1,
                max_size=4), st.integers(min_value=0, max_value=len(STAMP_FITS)))  # fmt: skip
def test_mutated_fits_headers_crop_or_raise_named_error(cards: list[tuple[int, bytes, bytes]], keep: int) -> None:
    """The cutout's own FITS, its header cards rewritten (sizes, types, scaling, END, extension
    and tile-compression keywords) and cut at any byte: a (21, 21) crop or a CutoutError, through
    both the fast parser and astropy's fallback."""
    import gzip

    from alerts.cutouts import cutout_crop
    from alerts.errors import CutoutError

    raw = bytearray(STAMP_FITS)
    for i, name, value in cards:
        raw[i * 80 : (i + 1) * 80] = (name.ljust(8) + b"= " + value.rjust(20)).ljust(80)
    gz = gzip.compress(bytes(raw[:keep]), 1)
    for fast in (True, False):
        try:
            crop, _ = cutout_crop(gz, "science", 1500.0, 1500.0, fast=fast)
        except CutoutError as e:
            assert e.reason.startswith("cutout_")
            continue
        assert crop.shape == (21, 21)


@SETTINGS
@given(st.binary(max_size=256), st.integers(0, 16), st.lists(st.integers(-1, 40), max_size=30))
def test_strict_reader_reads_as_bytesio_and_refuses_short_reads(data: bytes, start: int, sizes: list[int]) -> None:
    """What fastavro's general path reads through (alerts/strict_reader.py): the bytes io.BytesIO
    would give while they are there, an EOFError where BytesIO would return fewer than asked."""
    import io

    from alerts.strict_reader import StrictReader

    start = min(start, len(data))
    strict, plain = StrictReader(data, start), io.BytesIO(data)
    plain.seek(start)
    for n in sizes:
        left = len(data) - plain.tell()
        if n > left:
            with pytest.raises(EOFError):
                strict.read(n)
            return
        assert strict.read(n) == plain.read(n) and strict.tell() == plain.tell()


def test_strict_reader_bounds_zero_length_reads() -> None:
    from alerts.strict_reader import StrictReader

    r = StrictReader(b"abc")
    with pytest.raises(EOFError):
        for _ in range(1000):
            r.read(0)
