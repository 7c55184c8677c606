"""Rubin/LSST alerts: wire framing, schemas (packaged, registry with fallback), the two decoding
paths held equal, hostile input, cutouts, features and the allowlist. Real alerts from
../shared/rubin when present; generated alerts of every packaged schema from 8.0 (11.x included)
always."""

from __future__ import annotations

import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.allowlist import (
    RUBIN_FORBIDDEN,
    RUBIN_HISTORY_FIELDS,
    RUBIN_OBJECT_FIELDS,
    RUBIN_SOURCE_FIELDS,
    RUBIN_SOURCE_STRINGS,
)
from alerts.cutouts import resample_area, rubin_stamp_pixels, window
from alerts.decoder import SchemaCache
from alerts.errors import AlertDecodeError, BadAlertError, CutoutError
from alerts.limits import DecodeLimits
from alerts.message import decode_any, features_of
from alerts.rubin import RubinAlert, RubinSchemaCache, decode_rubin
from alerts.rubin_features import RUBIN_FEATURE_NAMES, rubin_features
from alerts.rubin_schemas import packaged_ids, packaged_schema, version_of, wire_schema_id
from alerts.synthetic import make_alert
from alerts.synthetic_rubin import cutout_fits, make_rubin_message
from config.consumer import SchemaRegistryConfig
from consumer.schema_registry import RubinSchemaSource

ROOT = Path(__file__).resolve().parents[2]
RUBIN = Path(os.environ.get("STAMPSTREAM_SHARED_RUBIN", ROOT.parent / "shared" / "rubin"))
WIRE = sorted((RUBIN / "wire").glob("*.bin")) if (RUBIN / "wire").is_dir() else []
OPERATIONS_IDS = [i for i in packaged_ids() if i >= 800]


def test_the_package_ships_the_operations_schemas() -> None:
    assert {900, 1000, 1100, 1101} <= set(packaged_ids())
    assert packaged_schema(4242) is None
    assert version_of(900) == "9.0" and version_of(1101) == "11.1"


@pytest.mark.skipif(not (RUBIN / "schemas").is_dir(), reason="../shared/rubin not here")
def test_packaged_schemas_equal_the_official_files() -> None:
    from fastavro.schema import to_parsing_canonical_form as canonical

    for sid, name in ((900, "lsst.v9_0.alert.avsc"), (1000, "lsst.v10_0.alert.avsc")):
        official = json.loads((RUBIN / "schemas" / name).read_text())
        assert canonical(json.loads(packaged_schema(sid) or b"")) == canonical(official)


def test_wire_header() -> None:
    msg = make_rubin_message(1100, 77)
    assert wire_schema_id(msg) == 1100
    for bad, reason in ((b"", "bad_framing"), (b"\x00\x00\x00", "bad_framing"), (b"\x01" + msg[1:], "bad_framing"),
                        (b"\x00\xff\xff\xff\xff" + msg[5:], "unknown_schema"),
                        (b"\x00\x7f\x00\x00\x00" + msg[5:], "unknown_schema")):  # fmt: skip
        with pytest.raises(AlertDecodeError) as e:
            wire_schema_id(bad)
        assert e.value.reason == reason


@pytest.mark.parametrize("schema_id", OPERATIONS_IDS)
def test_fast_and_general_paths_agree_on_generated_alerts(schema_id: int) -> None:
    cache = RubinSchemaCache()
    for seed in range(12):
        msg = make_rubin_message(schema_id, 10_000 + seed, seed=seed, n_prv=seed % 6)
        fast, general = decode_rubin(msg, cache), decode_rubin(msg, cache, fast=False)
        assert fast == general
        assert fast.schema_version == version_of(schema_id) and len(fast.history) == seed % 6
    assert cache.misses == 1  # one compile per schema


@pytest.mark.skipif(not WIRE, reason="../shared/rubin not here")
def test_fast_and_general_paths_agree_on_every_real_alert() -> None:
    cache = RubinSchemaCache()
    for path in WIRE:
        msg = path.read_bytes()
        a = decode_rubin(msg, cache)
        assert a == decode_rubin(msg, cache, fast=False), path.name
        assert a.candid == int(path.stem.rsplit("_", 1)[1])
        stamp = rubin_stamp_pixels(a.science, a.difference)
        assert np.array_equal(stamp.pixels, rubin_stamp_pixels(a.science, a.difference, fast=False).pixels, equal_nan=True)
        f = rubin_features(a)
        assert f.shape == (len(RUBIN_FEATURE_NAMES),) and f.dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 30), st.sampled_from(OPERATIONS_IDS))
def test_paths_agree_property(seed: int, n_prv: int, schema_id: int) -> None:
    msg = make_rubin_message(schema_id, 1 + seed, seed=seed, n_prv=n_prv)
    cache = RubinSchemaCache()
    assert decode_rubin(msg, cache) == decode_rubin(msg, cache, fast=False)


# ---- hostile input --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_cut_or_flipped_messages_only_raise_named_errors(data: st.DataObject) -> None:
    msg = bytearray(make_rubin_message(1000, 99, seed=3, n_prv=4))
    if data.draw(st.booleans()):
        msg = msg[: data.draw(st.integers(0, len(msg) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(5, len(msg) - 1))
            msg[i] = data.draw(st.integers(0, 255))
    cache = RubinSchemaCache()
    for fast in (True, False):
        try:
            alert, _ = decode_any(bytes(msg), SchemaCache(), cache) if fast else (decode_rubin(bytes(msg), cache, False), None)
        except BadAlertError:
            continue
        assert isinstance(alert, RubinAlert)


def test_every_truncation_is_a_named_error() -> None:
    msg = make_rubin_message(1100, 5, seed=1, n_prv=3)
    cache = RubinSchemaCache()
    for cut in range(0, len(msg) - 1, 97):
        with pytest.raises(AlertDecodeError):
            decode_rubin(msg[:cut], cache)
    with pytest.raises(AlertDecodeError, match="after the record"):
        decode_rubin(msg + b"\x00", cache)


@pytest.mark.parametrize("fast", [True, False])
def test_a_history_longer_than_the_limit_is_refused_by_both_paths(fast: bool) -> None:
    msg = make_rubin_message(1000, 5, seed=1, n_prv=12)
    with pytest.raises(AlertDecodeError) as e:
        decode_rubin(msg, RubinSchemaCache(DecodeLimits(max_array_items=10)), fast=fast)
    assert e.value.reason == "too_large"
    assert len(decode_rubin(msg, RubinSchemaCache(DecodeLimits(max_array_items=12)), fast=fast).history) == 12


def test_unknown_ids_and_schemas_against_the_policy() -> None:
    msg = make_rubin_message(1000, 5)
    asked: list[int] = []

    def lookup(i: int) -> bytes | None:
        asked.append(i)
        if i == 1000:
            return packaged_schema(1000)
        if i == 1300:  # recursive named type: refused before fastavro sees it
            return json.dumps({"type": "record", "name": "a", "fields": [
                {"name": "diaSourceId", "type": "long"},
                {"name": "diaSource", "type": {"type": "record", "name": "s", "fields": [
                    *({"name": n, "type": "double"} for n in ("midpointMjdTai", "ra", "dec")),
                    {"name": "band", "type": "string"}, {"name": "next", "type": "a"}]}}]}).encode()  # fmt: skip
        if i == 1400:  # no diaSource
            return json.dumps({"type": "record", "name": "a", "fields": [{"name": "diaSourceId", "type": "long"}]}).encode()
        return None

    cache = RubinSchemaCache(lookup=lookup)
    assert decode_rubin(msg, cache).candid == 5
    for sid, reason in ((1200, "unknown_schema"), (1300, "schema_policy"), (1400, "schema_policy")):
        bad = b"\x00" + sid.to_bytes(4, "big") + msg[5:]
        for _ in range(2):
            with pytest.raises(AlertDecodeError) as e:
                decode_rubin(bad, cache)
            assert e.value.reason == reason
    assert asked.count(1300) == 1 and asked.count(1400) == 1, "a refused schema is checked once"
    assert asked.count(1200) == 2, "an unknown id is asked again (the lookup rate-limits itself)"


def test_values_out_of_range_are_named() -> None:
    from alerts.synthetic_rubin import make_rubin_record

    schema = json.loads(packaged_schema(1000) or b"")
    rec = make_rubin_record(schema, 7, np.random.default_rng(0))
    rec["diaSource"]["midpointMjdTai"] = float("nan")
    rec["diaSource"]["band"] = "Q"
    from fastavro import parse_schema, schemaless_writer

    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), rec)
    with pytest.raises(AlertDecodeError) as e:
        decode_rubin(b"\x00\x00\x00\x03\xe8" + buf.getvalue(), RubinSchemaCache())
    assert e.value.reason == "bad_value" and e.value.candid == 7


def test_framing_decides_the_survey() -> None:
    ztf = make_alert(2_400_000_000_000_000_001).message
    rubin = make_rubin_message(900, 12)
    caches = (SchemaCache(), RubinSchemaCache())
    assert decode_any(ztf, *caches)[0].survey == "ztf"
    assert decode_any(rubin, *caches)[0].survey == "lsst"
    for junk, reason in ((b"junk", "not_avro"), (b"", "empty"), (None, "empty")):
        with pytest.raises(AlertDecodeError) as e:
            decode_any(junk, *caches)
        assert e.value.reason == reason


# ---- cutouts --------------------------------------------------------------------------------


def test_the_field_is_centred_on_the_reference_pixel_and_resampled_by_area() -> None:
    img = np.zeros((40, 40), np.float32)
    img[20, 17] = 1.0
    raw = cutout_fits(img, (18.0, 21.0))  # FITS is 1-based: (x 17, y 20)
    stamp = rubin_stamp_pixels(raw, raw)
    assert stamp.pixels.shape == (2, 21, 21) and not stamp.padded
    assert np.unravel_index(np.argmax(stamp.pixels[0]), (21, 21)) == (10, 10)
    # by area: the mean is kept (flux per area), a constant stays that constant
    flat = rubin_stamp_pixels(cutout_fits(np.full((30, 30), 7.0), (15.5, 15.5)), raw)
    assert np.allclose(flat.pixels[0], 7.0)
    smooth = np.random.default_rng(0).random((30, 30))
    assert resample_area(smooth).mean() == pytest.approx(smooth.mean(), rel=1e-6)
    # near the corner the window leaves the image: NaN there, flagged
    corner = rubin_stamp_pixels(cutout_fits(np.ones((30, 30)), (3.0, 3.0)), raw)
    assert corner.padded and np.isnan(corner.pixels[0, 0, 0]) and corner.pixels[0, 20, 20] == 1.0
    crop, padded = window(img, -2, 0, 30)
    assert padded and np.isnan(crop[0, 0]) and crop[20, 19] == 1.0


def test_bad_cutouts_are_named() -> None:
    good = cutout_fits(np.ones((30, 30)), (15.5, 15.5))
    for sci, reason in ((None, "cutout_missing"), (b"not fits at all", "cutout_bad_fits"),
                        (b"SIMPLE  =" + b" " * 5000, "cutout_bad_fits")):  # fmt: skip
        with pytest.raises(CutoutError) as e:
            rubin_stamp_pixels(sci, good)
        assert e.value.reason == reason
    with pytest.raises(CutoutError) as e:
        rubin_stamp_pixels(good, good, max_bytes=1000)
    assert e.value.reason == "cutout_too_large"
    nan = cutout_fits(np.full((30, 30), np.nan), (15.5, 15.5))
    with pytest.raises(CutoutError) as e:
        rubin_stamp_pixels(nan, good)
    assert e.value.reason == "cutout_all_nan"


# ---- features and the allowlist -------------------------------------------------------------


def test_no_forbidden_field_is_read() -> None:
    read = set(RUBIN_SOURCE_FIELDS) | set(RUBIN_SOURCE_STRINGS) | set(RUBIN_OBJECT_FIELDS) | set(RUBIN_HISTORY_FIELDS)
    assert not read & RUBIN_FORBIDDEN
    lowered = " ".join(RUBIN_FEATURE_NAMES).lower()
    for bad in ("reliab", "ssobject", "sssource", "mpc", "visit", "detector", "id"):
        assert bad not in lowered.replace("_", ""), bad
    from alerts import rubin

    for column in rubin._TOP_COLUMNS:
        assert column.rsplit(".", 1)[-1] not in RUBIN_FORBIDDEN, column


def test_features_handle_missing_on_purpose() -> None:
    cache = RubinSchemaCache()
    alone = decode_rubin(make_rubin_message(1100, 21, seed=2, n_prv=0), cache)
    f = dict(zip(RUBIN_FEATURE_NAMES, rubin_features(alone), strict=True))
    assert f["n_prv"] == 0 and np.isnan(f["days_since_prv_last"]) and np.isnan(f["dflux_per_day_same_band"])
    assert sum(f[f"band_{b}"] for b in "ugrizy") == 1.0
    with_history = decode_rubin(make_rubin_message(1100, 22, seed=2, n_prv=6), cache)
    g = dict(zip(RUBIN_FEATURE_NAMES, rubin_features(with_history), strict=True))
    assert g["n_prv"] == 6 and g["n_bands_prv"] == 6 and g["days_since_prv_last"] == pytest.approx(3.0)
    assert g["n_prv_same_band"] == 1 and np.isfinite(g["dflux_per_day_same_band"])
    # no diaObject (a solar-system source): object features NaN, nothing raises
    no_obj = RubinAlert(1, None, "9.0", with_history.source, np.full(2, np.nan), "g", with_history.history, None, None)
    h = dict(zip(RUBIN_FEATURE_NAMES, rubin_features(no_obj), strict=True))
    assert np.isnan(h["days_since_first_source"]) and np.isnan(h["n_dia_sources"]) and no_obj.object_id == ""
    assert features_of(no_obj).shape == (len(RUBIN_FEATURE_NAMES),)


def test_fluxes_past_float32_are_missing_not_infinite() -> None:
    """A crafted psfFlux of 3e38 over an error of 1e-30 overflows float32 in its ratio: NaN, no
    infinity, no warning (the daemon would print one per alert)."""
    import warnings

    from fastavro import parse_schema, schemaless_writer

    from alerts.synthetic_rubin import make_rubin_record

    schema = json.loads(packaged_schema(1000) or b"")
    rec = make_rubin_record(schema, 8, np.random.default_rng(0), 2)
    rec["diaSource"]["psfFlux"], rec["diaSource"]["psfFluxErr"] = 3e38, 1e-30
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), rec)
    a = decode_rubin(b"\x00\x00\x00\x03\xe8" + buf.getvalue(), RubinSchemaCache())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = dict(zip(RUBIN_FEATURE_NAMES, rubin_features(a), strict=True))
    assert not any(np.isinf(v) for v in f.values())
    assert np.isnan(f["psf_flux_over_err"]) and f["log_abs_psf_flux"] == pytest.approx(38.477, abs=1e-3)


# ---- the schema source: registry, fallback, rate limit --------------------------------------


class _Schema:
    def __init__(self, text: str, references: list[Any] | None = None) -> None:
        self.schema_str = text
        self.references = references or []


class _FakeRegistry:
    """A unit-test stand-in for confluent-kafka's client (the HTTP path is tested below)."""

    def __init__(self, known: dict[int, str], fail: bool = False) -> None:
        self.known, self.fail, self.asked = known, fail, 0

    def get_schema(self, schema_id: int) -> _Schema:
        self.asked += 1
        if self.fail:
            raise ConnectionError("registry down")
        if schema_id not in self.known:
            err = RuntimeError("not found")
            err.http_status_code = 404  # type: ignore[attr-defined]
            raise err
        return _Schema(self.known[schema_id])


def test_schema_source_prefers_the_registry_and_falls_back() -> None:
    now = [0.0]
    cfg = SchemaRegistryConfig(url="http://registry.invalid", retry_after_s=60)
    reg = _FakeRegistry({1200: '{"registry": true}'})
    src = RubinSchemaSource(cfg, client=reg, clock=lambda: now[0])
    assert src(1200) == b'{"registry": true}'
    assert src(900) == packaged_schema(900), "404 -> the package"
    assert src(4242) is None and src(4242) is None
    assert reg.asked == 3, "an id nobody knows is not asked again within retry_after_s"
    reg.fail = True
    assert src(1000) == packaged_schema(1000)
    assert src(1100) == packaged_schema(1100)
    assert reg.asked == 4 and src.counts["registry_errors"] == 1, "a failed registry rests for retry_after_s"
    now[0] = 61.0
    reg.fail = False
    assert src(1200) == b'{"registry": true}' and reg.asked == 5
    # ever-new ids: at most max_requests_per_minute registry round trips, then the package answers
    capped = RubinSchemaSource(SchemaRegistryConfig(url="http://registry.invalid", max_requests_per_minute=3),
                               client=_FakeRegistry({}), clock=lambda: now[0])  # fmt: skip
    for i in range(10):
        capped(5000 + i)
    assert capped.client.asked == 3 and capped.counts["rate_limited"] == 7
    assert capped(900) == packaged_schema(900), "the package still answers"
    now[0] += 61.0
    capped(6000)
    assert capped.client.asked == 4, "a minute later the registry is asked again"
    no_registry = RubinSchemaSource(SchemaRegistryConfig())
    assert no_registry.client is None and no_registry(900) == packaged_schema(900)


class RegistryTestDouble(BaseHTTPRequestHandler):
    """A minimal HTTP test double of a Confluent schema registry, for the tests only: answers
    ``GET /schemas/ids/{id}`` from ``SCHEMAS`` and 404 otherwise (no real registry installs from
    the package registries this project may use)."""

    SCHEMAS: dict[int, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        RegistryTestDouble.requests.append(self.path)
        sid = self.path.split("?")[0].rsplit("/", 1)[-1]
        body = self.SCHEMAS.get(int(sid)) if self.path.startswith("/schemas/ids/") and sid.isdigit() else None
        if body is None:
            self.send_response(404)
            payload = json.dumps({"error_code": 40403, "message": "Schema not found"}).encode()
        else:
            self.send_response(200)
            payload = json.dumps({"schema": body.decode()}).encode()
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: Any) -> None:
        pass


def test_schema_registry_over_http_with_confluent_kafkas_client() -> None:
    # id 1200 is not packaged: only the registry knows it (the 11.1 schema, as a future version)
    RegistryTestDouble.SCHEMAS = {1200: packaged_schema(1101) or b""}
    RegistryTestDouble.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RegistryTestDouble)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cache = RubinSchemaCache(lookup=RubinSchemaSource(SchemaRegistryConfig(url=url)))
        body = make_rubin_message(1101, 31, seed=4)[5:]
        alert = decode_rubin(b"\x00\x00\x00\x04\xb0" + body, cache)  # id 1200
        assert alert.candid == 31 and alert.schema_version == "12.0"
        assert decode_rubin(make_rubin_message(900, 32), cache).candid == 32, "404 -> packaged"
        assert any(p.startswith("/schemas/ids/1200") for p in RegistryTestDouble.requests)
    finally:
        server.shutdown()
    down = RubinSchemaCache(lookup=RubinSchemaSource(SchemaRegistryConfig(url=url, timeout_s=1)))
    assert decode_rubin(make_rubin_message(1000, 33), down).candid == 33, "registry gone -> packaged"
