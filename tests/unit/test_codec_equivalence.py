"""Every hand-written codec, held to the library it replaces on generated input (hypothesis):
RESP packing vs redis-py's packer, container framing vs ``fastavro.writer`` / ``block_reader``,
the direct FITS reader vs astropy on odd headers."""

from __future__ import annotations

import gzip
import io
import json

import fastavro
import numpy as np
import pytest
import redis.connection
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alerts.cutouts import _fast_fits, fits_image, gunzip
from alerts.framing import ContainerFramer, read_container_header, read_long, zigzag
from consumer.redis_sink import resp_command

# ---- RESP ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"EVALSHA", b"HSET", b"VADD"]),  # a command name (redis-py splits it on spaces)
    st.lists(st.binary(min_size=0, max_size=300), max_size=40),
)
def test_resp_packing_equals_redis_py(command: bytes, args: list[bytes]) -> None:
    packer = redis.connection.Connection()
    assert resp_command(command, *args) == b"".join(packer.pack_command(command, *args))


# ---- Avro container framing ----------------------------------------------------------------

_FIELD_TYPES = {
    "long": st.integers(-(2**63), 2**63 - 1),
    "string": st.text(max_size=50),
    "bytes": st.binary(max_size=200),
    "double": st.floats(allow_nan=False),
}


@st.composite
def schema_and_record(draw: st.DrawFn) -> tuple[dict, dict]:
    names = draw(st.lists(st.sampled_from(sorted(_FIELD_TYPES)), min_size=1, max_size=6))
    fields = [{"name": f"f{i}", "type": t} for i, t in enumerate(names)]
    schema = {"type": "record", "name": "r", "namespace": draw(st.sampled_from(["ztf", "x.y"])), "fields": fields}
    record = {f["name"]: draw(_FIELD_TYPES[f["type"]]) for f in fields}
    return schema, record


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_and_record(), st.binary(min_size=16, max_size=16))
def test_container_framing_equals_fastavro_writer(sr: tuple[dict, dict], sync: bytes) -> None:
    schema, record = sr
    parsed = fastavro.parse_schema(schema)
    buf = io.BytesIO()
    fastavro.writer(buf, parsed, [record], sync_marker=sync)
    theirs = buf.getvalue()
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, record)
    header = read_container_header(theirs)
    assert header.codec == "null" and header.sync == sync
    assert json.loads(header.schema_json)["fields"] == schema["fields"]
    ours = ContainerFramer(header.schema_json, sync).frame(body.getvalue())
    assert ours == theirs
    assert list(fastavro.reader(io.BytesIO(ours))) == [record]


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_varint_round_trip(n: int) -> None:
    assert read_long(zigzag(n), 0) == (n, len(zigzag(n)))


# ---- FITS ------------------------------------------------------------------------------------

_BITPIX = {8: np.uint8, 16: np.int16, 32: np.int32, -32: np.float32, -64: np.float64}


@st.composite
def fits_file(draw: st.DrawFn) -> bytes:
    bitpix = draw(st.sampled_from(sorted(_BITPIX)))
    ny, nx = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = _BITPIX[bitpix]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -30000), min(info.max, 30000), size=(ny, nx), endpoint=True).astype(dtype)
    else:
        data = (rng.normal(0, 1000, size=(ny, nx))).astype(dtype)
        if draw(st.booleans()):
            data[rng.random((ny, nx)) < 0.1] = np.nan
    hdu = fits.PrimaryHDU(data)
    for i in range(draw(st.integers(0, 80))):  # extra cards: a header over several 2880-byte blocks
        hdu.header[f"EXTRA{i}"] = (draw(st.sampled_from([1, 2.5, "text", True])), "a comment / with slash")
    if draw(st.booleans()):
        hdu.header["BSCALE"] = draw(st.sampled_from([1.0, 0.5, 2.0]))
        hdu.header["BZERO"] = draw(st.sampled_from([0.0, 32768.0, -10.0]))
    out = io.BytesIO()
    hdu.writeto(out, output_verify="silentfix")
    return out.getvalue()


def _astropy(raw: bytes) -> np.ndarray:
    with fits.open(io.BytesIO(raw), memmap=False) as h:
        return np.array(h[0].data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fits_file())
def test_fits_reader_equals_astropy(raw: bytes) -> None:
    """The direct reader either declines (None: astropy reads it) or returns astropy's pixels."""
    fast = _fast_fits(raw)
    ref = _astropy(raw)
    if fast is not None:
        np.testing.assert_array_equal(fast.astype(np.float64), ref.astype(np.float64))
    np.testing.assert_array_equal(fits_image(raw).astype(np.float64), ref.astype(np.float64))


def test_fits_reader_takes_the_float_cases_it_exists_for() -> None:
    """The fast path must really serve plain float images (else the equivalence above is vacuous)."""
    for dtype in (np.float32, np.float64):
        out = io.BytesIO()
        fits.PrimaryHDU(np.arange(63 * 63, dtype=dtype).reshape(63, 63)).writeto(out)
        assert _fast_fits(out.getvalue()) is not None


@pytest.mark.parametrize("level", [1, 9])
def test_gunzip_equals_gzip_module(level: int) -> None:
    data = np.random.default_rng(level).normal(size=5000).astype(">f4").tobytes()
    assert gunzip(gzip.compress(data, compresslevel=level)) == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12) | st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_utf8_check_equals_python(raw: bytes) -> None:
    """The compiled reader refuses exactly the strings Python's (and so fastavro's) UTF-8 refuses."""
    from alerts.flat_reader import _utf8_ok

    try:
        raw.decode("utf-8")
        expected = True
    except UnicodeDecodeError:
        expected = False
    assert _utf8_ok(np.frombuffer(raw, np.uint8), 0, len(raw)) == expected
