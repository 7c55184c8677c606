"""bytes -> Alert on every real alert (all schema versions), every edge file, and generated cases."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EDGE_DIR, HAVE_SHARED

from alerts.cutouts import fits_image, gunzip, stamp_pixels
from alerts.decoder import SchemaCache, decode_alert, decode_alert_reference, decode_alerts
from alerts.errors import AlertDecodeError, CutoutError
from alerts.limits import DecodeLimits
from alerts.message import decode_message
from alerts.synthetic import make_alert
from model.preprocess import normalise

ALL_WRITER_VERSIONS = {"1.8", "3.0", "3.1", "3.2", "3.3", "4.01", "4.02"}


def test_every_alert_decodes_with_finite_tensors(corpus: list[bytes]) -> None:
    cache = SchemaCache()
    versions = set()
    candids = set()
    for msg in corpus:
        alert, stamp = decode_message(msg, cache)
        versions.add(alert.schema_version)
        candids.add(alert.candid)
        assert alert.object_id.startswith("ZTF")
        assert 2458000 < alert.jd < 2470000 and alert.fid in (1, 2, 3)
        assert stamp.pixels.shape == (2, 21, 21) and stamp.pixels.dtype == np.float32
        x = normalise(stamp.pixels[None])
        assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    assert len(candids) == len(corpus)
    # one parse per distinct writer schema, not per message
    assert cache.misses == len(cache) <= 16
    if HAVE_SHARED:
        assert versions == ALL_WRITER_VERSIONS
        assert len(corpus) == 2134


def test_fast_path_equals_reference_decoder(corpus: list[bytes]) -> None:
    cache = SchemaCache()
    for msg in corpus:
        assert decode_alert(msg, cache) == decode_alert_reference(msg)


def test_one_cache_serves_interleaved_schemas() -> None:
    """The cache's shortcut for the previous message's schema must not leak into the next one."""
    import json

    from alerts.framing import ContainerFramer, zigzag
    from alerts.synthetic import ALERT_SCHEMA, SCHEMA_JSON

    other = ContainerFramer(json.dumps(ALERT_SCHEMA | {"version": "3.3"}).encode())
    header_len = len(ContainerFramer(SCHEMA_JSON).header)
    msgs = []
    for i in range(6):
        m = make_alert(2_500_000_000_000_000_000 + i).message
        if i % 2:  # the same record under a writer schema that differs only in its version
            body = m[header_len + 1 : -16]  # block count 1 (one byte), then size varint + record
            record = next(body[k:] for k in (1, 2, 3) if zigzag(len(body) - k) == body[:k])
            m = other.frame(record)
        msgs.append(m)
    cache = SchemaCache()
    got = [decode_alert(m, cache).schema_version for m in msgs + msgs[::-1]]
    assert got == ["4.02", "3.3"] * 3 + ["3.3", "4.02"] * 3
    assert cache.misses == 2


def test_fast_fits_equals_astropy_on_every_alert(corpus: list[bytes]) -> None:
    cache = SchemaCache()
    for msg in corpus:
        a = decode_alert(msg, cache)
        fast = stamp_pixels(a.science, a.difference, a.xpos, a.ypos, fast=True)
        slow = stamp_pixels(a.science, a.difference, a.xpos, a.ypos, fast=False)
        np.testing.assert_array_equal(fast.pixels, slow.pixels)
        assert fast.padded == slow.padded and fast.nan_fraction == slow.nan_fraction


# ---- the real edge cases of ../shared/ztf/edge, each with its documented treatment -------------

EDGE_EXPECTED = {
    "broken_cutouts_ZTF20abyfpze.avro": ("dead", "cutout_missing"),
    "broken_cutouts_image_classification_example.parquet": ("dead", "not_avro"),
    "nan_pixels_1095578116215015006.avro": ("ok", "nan"),
    "nan_pixels_2475433850015015000.avro": ("ok", "nan"),
    "nan_pixels_820128985115015000.avro": ("ok", "nan"),
    "official_v3.3_472263571115115000.avro": ("ok", "plain"),
    "small_cutout_51x63_595277915515015000.avro": ("ok", "padded"),
    "small_cutout_63x42_2481343020115015020.avro": ("ok", "padded"),
    "small_cutout_63x55_522193343315015001.avro": ("ok", "padded"),
    # a Spark-written snappy container (schema topLevelRecord, candid only in the candidate): read,
    # snappy being Spark's default Avro codec (alerts/limits.py)
    "spark_topLevelRecord_snappy_675208700015010000.avro": ("ok", "plain"),
}


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/ztf/edge absent; generated equivalents below")
@pytest.mark.parametrize("name", sorted(EDGE_EXPECTED))
def test_edge_file_treatment(name: str) -> None:
    data = (EDGE_DIR / name).read_bytes()
    outcome, detail = EDGE_EXPECTED[name]
    cache = SchemaCache()
    if outcome == "dead":
        with pytest.raises((AlertDecodeError, CutoutError)) as ei:
            for alert in decode_alerts(data, cache):
                stamp_pixels(alert.science, alert.difference, alert.xpos, alert.ypos)
        assert ei.value.reason == detail
        return
    (alert,) = decode_alerts(data, cache)
    assert str(alert.candid) in name
    stamp = stamp_pixels(alert.science, alert.difference, alert.xpos, alert.ypos)
    x = normalise(stamp.pixels[None])
    assert np.isfinite(x).all()
    assert stamp.padded == (detail == "padded")
    if detail == "nan":
        # the 63x63 stamp has NaN pixels (in the crop or not); the network input never does
        assert np.isnan(fits_image(gunzip(alert.science))).any()
    if detail == "padded":
        # the stamp sits on the 63x63 canvas away from the CCD edge that cut it (51x63 at ypos~20:
        # 12 rows missing below; 63x42 and 63x55 near the high-x edge: columns missing on the right),
        # so the 21x21 crop is centred on the candidate as in a full stamp
        img = fits_image(gunzip(alert.science))
        y0 = {"51x63": 12}.get(name.split("_")[2], 0)
        np.testing.assert_array_equal(stamp.pixels[0], img[21 - y0 : 42 - y0, 21:42].astype(np.float32))


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/ztf/edge absent")
def test_the_spark_written_alert_is_the_same_alert_as_its_official_copy(corpus: list[bytes]) -> None:
    """A Spark job's re-publication (snappy, schema topLevelRecord) gives the consumer the same
    stamps and features as the copy of that alert in ZTF's own schema (alerts/ztf_v3.1_000.avro)."""
    from alerts.features import alert_features

    cache = SchemaCache()
    spark, spark_stamp = decode_message((EDGE_DIR / "spark_topLevelRecord_snappy_675208700015010000.avro").read_bytes(), cache)
    (official, stamp), = [d for d in (decode_message(m, cache) for m in corpus) if d[0].candid == spark.candid]
    np.testing.assert_array_equal(spark_stamp.pixels, stamp.pixels)
    np.testing.assert_array_equal(alert_features(spark), alert_features(official))


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/ztf/edge absent")
def test_edge_files_all_covered() -> None:
    present = {p.name for p in EDGE_DIR.iterdir() if p.name != "README.txt"}
    assert present == set(EDGE_EXPECTED)


# ---- generated cases (run everywhere) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "xpos", "ypos"),
    [
        ((slice(None), slice(0, 42)), 3060.0, 1500.0),  # high-x CCD edge: right columns missing
        ((slice(12, None), slice(None)), 1500.0, 20.0),  # low-y CCD edge: bottom rows missing
        ((slice(None), slice(0, 33)), 3070.0, 1500.0),  # so narrow that the crop itself is cut
        ((slice(None), slice(25, None)), 5.0, 1500.0),  # low-x CCD edge: left columns missing
    ],
)
def test_small_cutout_is_padded_on_the_ccd_edge_side(cut, xpos, ypos) -> None:
    from alerts.synthetic import fits_gz, source_stamp

    full = source_stamp(np.random.default_rng(1), (63, 63), "point")
    part = full[cut]
    msg = make_alert(2_400_000_000_000_000_001, science=fits_gz(part), difference=fits_gz(part), xpos=xpos, ypos=ypos).message
    _, stamp = decode_message(msg, SchemaCache())
    assert stamp.padded
    expected = np.full((63, 63), np.nan, dtype=np.float32)
    expected[cut] = part
    np.testing.assert_array_equal(stamp.pixels[0], expected[21:42, 21:42])
    np.testing.assert_array_equal(stamp.pixels[1], expected[21:42, 21:42])


@pytest.mark.parametrize(("shape", "xpos"), [((21, 21), 1500.0), ((22, 22), 3060.0), ((21, 40), 5.0), ((5, 5), None), ((1, 1), 1500.0)])
def test_a_stamp_narrower_than_an_edge_cut_is_centred(shape: tuple[int, int], xpos: float | None) -> None:
    """An edge-cut ZTF stamp keeps at least 32 pixels; a narrower side was cut around the stamp's
    centre, so the stamp is centred whatever its position (by the edge rule a 21x21 stamp missed the
    crop: an all-NaN crop, a dead letter)."""
    from alerts.synthetic import fits_gz

    img = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) + 1.0
    msg = make_alert(2_400_000_000_000_000_003, science=fits_gz(img), difference=fits_gz(img), xpos=xpos, ypos=xpos).message
    _, stamp = decode_message(msg, SchemaCache())
    expected = np.full((63, 63), np.nan, dtype=np.float32)
    y0 = (63 - shape[0]) // 2 if shape[0] <= 31 else (63 - shape[0] if xpos is not None and xpos < 1540 else 0)
    x0 = (63 - shape[1]) // 2 if shape[1] <= 31 else (63 - shape[1] if xpos is not None and xpos < 1536 else 0)
    expected[y0 : y0 + shape[0], x0 : x0 + shape[1]] = img
    np.testing.assert_array_equal(stamp.pixels[0], expected[21:42, 21:42])
    assert stamp.padded
    if max(shape) <= 31:  # the stamp's centre pixel is the crop's
        assert stamp.pixels[0, 10, 10] == img[shape[0] // 2, shape[1] // 2]


def test_small_cutout_without_position_is_centred() -> None:
    msg = make_alert(2_400_000_000_000_000_001, shape=(63, 55), xpos=None, ypos=None).message
    _, stamp = decode_message(msg, SchemaCache())
    assert stamp.padded and stamp.pixels.shape == (2, 21, 21)


def test_nan_pixels_become_zero_after_normalisation() -> None:
    msg = make_alert(2_400_000_000_000_000_002, nan_fraction=0.3).message
    _, stamp = decode_message(msg, SchemaCache())
    assert 0.1 < stamp.nan_fraction[0] < 0.5
    x = normalise(stamp.pixels[None])[0]
    assert np.all(x[np.isnan(stamp.pixels)] == 0.0)


@pytest.mark.parametrize(
    ("science", "difference", "reason"),
    [
        (None, "make", "cutout_missing"),
        ("make", None, "cutout_missing"),
        (b"not gzip at all" * 4, "make", "cutout_not_gzip"),
        ("badfits", "make", "cutout_bad_fits"),
        ("allnan", "make", "cutout_all_nan"),
    ],
)
def test_bad_cutouts_raise_named_errors(science, difference, reason) -> None:
    import gzip

    from alerts.synthetic import fits_gz

    if science == "badfits":
        science = gzip.compress(b"SIMPLE  = T" + b" " * 5000)
    elif science == "allnan":
        science = fits_gz(np.full((63, 63), np.nan, dtype=np.float32))
    msg = make_alert(2_400_000_000_000_000_003, science=science, difference=difference).message
    with pytest.raises(CutoutError) as ei:
        decode_message(msg, SchemaCache())
    assert ei.value.reason == reason
    assert ei.value.candid == 2_400_000_000_000_000_003


def test_an_uncompressed_fits_cutout_is_read_as_its_gzipped_form() -> None:
    """A producer that re-serialised an alert may store its stamps as plain FITS: the same crops;
    past the stamp limit it is still refused."""
    import gzip

    gz = make_alert(2_400_000_000_000_000_006).message
    science, difference = _cutouts(gz)
    plain = make_alert(2_400_000_000_000_000_006, science=gzip.decompress(science), difference=gzip.decompress(difference))
    _, want = decode_message(gz, SchemaCache())
    _, got = decode_message(plain.message, SchemaCache())
    np.testing.assert_array_equal(got.pixels, want.pixels)
    assert got.nan_fraction == want.nan_fraction
    with pytest.raises(CutoutError) as ei:
        decode_message(plain.message, SchemaCache(DecodeLimits(max_stamp_bytes=1000)))
    assert ei.value.reason == "cutout_too_large"


def _cutouts(message: bytes) -> tuple[bytes, bytes]:
    alert = decode_alert(message, SchemaCache())
    assert alert.science is not None and alert.difference is not None
    return alert.science, alert.difference


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", "empty"), (b"{\"json\": true}", "not_avro"), (b"Obj\x01", "truncated")],
)
def test_non_alerts_raise_named_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(AlertDecodeError) as ei:
        decode_alert(payload, SchemaCache())
    assert ei.value.reason == reason


def test_unknown_schema_is_rejected() -> None:
    import io

    import fastavro

    buf = io.BytesIO()
    schema = {"type": "record", "name": "other", "fields": [{"name": "x", "type": "int"}]}
    fastavro.writer(buf, schema, [{"x": 1}])
    with pytest.raises(AlertDecodeError) as ei:
        decode_alert(buf.getvalue(), SchemaCache())
    assert ei.value.reason == "unknown_schema"


def test_multi_record_container_is_not_one_alert() -> None:
    import io

    import fastavro

    from alerts.synthetic import ALERT_SCHEMA

    recs = list(fastavro.reader(io.BytesIO(make_alert(2_400_000_000_000_000_004).message)))
    buf = io.BytesIO()
    fastavro.writer(buf, ALERT_SCHEMA, recs * 2, codec="null", sync_interval=10**9)
    assert len(decode_alerts(buf.getvalue(), SchemaCache())) == 2
    with pytest.raises(AlertDecodeError) as ei:
        decode_alert(buf.getvalue(), SchemaCache())
    assert ei.value.reason == "not_one_record"


def test_deflate_container_is_read_by_default_and_refused_where_not_allowed() -> None:
    """Avro's specification requires readers to read deflate; a config may still refuse it."""
    import io

    import fastavro

    from alerts.synthetic import ALERT_SCHEMA

    rec = next(iter(fastavro.reader(io.BytesIO(make_alert(2_400_000_000_000_000_005).message))))
    buf = io.BytesIO()
    fastavro.writer(buf, ALERT_SCHEMA, [rec], codec="deflate")
    assert decode_alert(buf.getvalue(), SchemaCache()).candid == 2_400_000_000_000_000_005
    with pytest.raises(AlertDecodeError) as e:
        decode_alert(buf.getvalue(), SchemaCache(DecodeLimits(allowed_codecs=())))
    assert e.value.reason == "codec"


def test_every_alert_in_a_deflate_container_decodes_as_its_null_codec_message(corpus: list[bytes]) -> None:
    """A producer may write the same alert with deflate (Avro's required codec): same Alert, and
    still through the fast path."""
    import io

    import fastavro

    plain, deflated = SchemaCache(), SchemaCache()
    for msg in corpus:
        reader = fastavro.reader(io.BytesIO(msg))
        buf = io.BytesIO()
        fastavro.writer(buf, reader.writer_schema, list(reader), codec="deflate")
        assert buf.getvalue()[: len(msg)] != msg
        assert decode_alert(buf.getvalue(), deflated) == decode_alert(msg, plain)
    assert deflated.fast_hits == len(corpus) and deflated.fast_misses == 0


@pytest.mark.parametrize(
    "schema",
    [
        b'{"type": "record", "name": "a", "fields": [{"name": "objectId"}, {"name": "candidate"}]}',
        b'{"type": "record", "name": "a", "fields": "nope"}',
        b'["not", "a", "record"]',
        b"{not json",
    ],
)
def test_malformed_writer_schemas_are_named_errors(schema: bytes) -> None:
    """Found by the property tests: a schema JSON that is no valid Avro schema."""
    from alerts.framing import ContainerFramer

    with pytest.raises(AlertDecodeError) as ei:
        decode_alert(ContainerFramer(schema).frame(b"\x00"), SchemaCache())
    assert ei.value.reason in ("unknown_schema", "not_avro", "schema_policy")


@pytest.mark.parametrize("suffix", [".fits.gz", "_é", "_\u00e9\u00e9\u00e9.fits"])
@pytest.mark.parametrize("shape", [(63, 63), (12, 12)])
def test_fast_path_finds_stamps_whatever_the_file_name(suffix: str, shape: tuple[int, int]) -> None:
    """The tail search guesses the stamp length's varint from the bytes before the gzip magic;
    a non-ASCII end of fileName fools that guess (its UTF-8 bytes look like varint bytes), and a
    small stamp has a 1- or 2-byte varint: the other lengths must still be tried."""
    msg = make_alert(2_400_000_000_000_007_000, shape=shape, file_suffix=suffix).message
    cache = SchemaCache()
    assert decode_alert(msg, cache) == decode_alert_reference(msg)
    assert cache.fast_hits == 1 and cache.fast_misses == 0


# ---- the allowlist and the bounded history -----------------------------------------------------


def test_the_allowlist_keeps_label_fields_out() -> None:
    """Nothing the labels were made from (or a name built from it) is decoded, by either path."""
    import json

    from alerts.allowlist import CANDIDATE_FIELDS, CANDIDATE_STRINGS, FORBIDDEN, HISTORY_FIELDS
    from alerts.decoder import _TOP_COLUMNS, _projection
    from alerts.synthetic import ALERT_SCHEMA

    read = {*CANDIDATE_FIELDS, *CANDIDATE_STRINGS, *HISTORY_FIELDS}
    assert not {n for n in read if any(f in n for f in FORBIDDEN)}
    assert not {c for c in _TOP_COLUMNS if any(f in c.split(".")[-1] for f in FORBIDDEN)}
    projected = json.dumps(_projection(json.loads(json.dumps(ALERT_SCHEMA))))
    for name in FORBIDDEN:
        assert f'"{name}"' not in projected
    assert '"ssdistnr"' in json.dumps(ALERT_SCHEMA), "the generated schema has the fields to drop"


def test_history_is_decoded(corpus: list[bytes]) -> None:
    """Every entry has a time and a band; detections a magnitude and its error. (Some public
    copies carry histories whose jd is one constant, even after the alert: the features drop
    those entries, see test_features.py; the decoder reports what the packet says.)"""
    cache = SchemaCache()
    lengths = []
    for msg in corpus:
        h = decode_alert(msg, cache).history
        lengths.append(len(h))
        assert np.all(np.isfinite(h.jd)) and np.all(np.isin(h.fid, (1, 2, 3)))
        det = np.isfinite(h.magpsf)
        assert np.all(np.isfinite(h.sigmapsf[det])) and np.all((h.magpsf[det] > 5) & (h.magpsf[det] < 30))
    assert max(lengths) > 0


def _alert_claiming_history(count: int) -> bytes:
    """A valid alert whose prv_candidates array claims ``count`` entries (one is written)."""
    import io
    import struct

    import fastavro

    from alerts.framing import ContainerFramer, zigzag
    from alerts.synthetic import ALERT_SCHEMA, SCHEMA_JSON

    record = next(iter(fastavro.reader(io.BytesIO(make_alert(2_400_000_000_000_000_555, n_prv=1).message))))
    record["prv_candidates"][0]["jd"] = 1234.5678  # a marker to find the array by
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ALERT_SCHEMA), record)
    raw = body.getvalue()
    marker = b"\x02" + zigzag(1) + struct.pack("<d", 1234.5678)
    i = raw.index(marker)
    return ContainerFramer(SCHEMA_JSON).frame(raw[:i] + b"\x02" + zigzag(count) + raw[i + 2 :])


def test_a_huge_history_count_is_refused_not_looped_over() -> None:
    """2^62 history entries claimed: refused at once (``too_large``), with no allocation."""
    assert len(decode_alert(_alert_claiming_history(1), SchemaCache()).history) == 1
    msg = _alert_claiming_history(2**62)
    with pytest.raises(AlertDecodeError) as e:
        decode_alert(msg, SchemaCache())
    assert e.value.reason == "too_large"
    limited = SchemaCache(DecodeLimits(max_array_items=3))
    for fast in (True, False):  # both paths refuse the same messages
        with pytest.raises(AlertDecodeError, match="limit") as e:
            decode_alert(make_alert(2_400_000_000_000_000_556, n_prv=5).message, limited, fast=fast)
        assert e.value.reason == "too_large"
        assert len(decode_alert(make_alert(2_400_000_000_000_000_557, n_prv=3).message, limited, fast=fast).history) == 3


@pytest.mark.parametrize(
    ("text", "sign"),
    [("t", 1), ("f", 0), ("1", 1), ("0", 0), ("-1", 0), ("+1", 1), ("T", 1), ("F", 0), ("x", -1), ("", -1), (None, -1)],
)
def test_every_spelling_of_isdiffpos_reads_alike_on_both_paths(text: str | None, sign: int) -> None:
    """ZTF writes 't'/'f' or '1'/'0'; a packet rebuilt from ALeRCE's export carries "1"/"-1".
    The candidate's sign (the feature) and the history's (``History.positive``) read the same on
    the fast path, the general path and ``sign_of``; an unknown spelling is unknown (-1, NaN)."""
    import copy
    import io
    import json

    import fastavro

    from alerts.alert import sign_of
    from alerts.features import FEATURE_NAMES, alert_features
    from alerts.framing import ContainerFramer
    from alerts.synthetic import ALERT_SCHEMA

    schema = copy.deepcopy(ALERT_SCHEMA)
    cand = next(f for f in schema["fields"] if f["name"] == "candidate")
    next(f for f in cand["type"]["fields"] if f["name"] == "isdiffpos")["type"] = ["null", "string"]
    prv = next(f for f in schema["fields"] if f["name"] == "prv_candidates")["type"][1]["items"]
    prv["fields"].append({"name": "isdiffpos", "type": ["null", "string"], "default": None})
    record = next(iter(fastavro.reader(io.BytesIO(make_alert(2_400_000_000_000_000_777, n_prv=3).message))))
    record["candidate"]["isdiffpos"] = text
    for e in record["prv_candidates"]:
        e["isdiffpos"] = text
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    msg = ContainerFramer(json.dumps(schema).encode()).frame(body.getvalue())
    cache = SchemaCache()
    fast, general = decode_alert(msg, cache), decode_alert(msg, cache, fast=False)
    assert cache.fast_hits == 1 and fast == general
    assert sign_of(text) == sign and list(fast.history.positive) == [sign] * 3
    value = alert_features(fast)[FEATURE_NAMES.index("isdiffpos")]
    assert (np.isnan(value) if sign < 0 else value == sign), value
