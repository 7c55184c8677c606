"""Extreme values that are valid Avro: every allowlisted candidate field, and the stamps' pixels,
set to NaN, infinities, the edges of float32, float64 and int64, zero and subnormals. A crafted
message need not break the decoder to do harm: a value that decodes may still turn into a NaN
embedding, probabilities that do not sum to 1, an output record the Avro encoder refuses (the
whole batch's publish fails, and its offsets with it) or a Redis hash that cannot be written.

Each such message must end either as a named error (a dead letter) or as a result with finite
outputs, through the same chain as the daemon's (decode -> features -> both model paths ->
result record -> its Avro form, equal to fastavro's -> Redis fields)."""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Callable

import fastavro
import numpy as np
import pytest
from astropy.io import fits

from alerts.allowlist import CANDIDATE_FIELDS
from alerts.cutouts import gunzip
from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.message import decode_message, features_of
from consumer.batches import GoodAlert, ModelMeta, Source, build_results
from consumer.inference import ModelRunner
from consumer.redis_sink import redis_fields
from consumer.results import ResultEncoder, decode_result

FLOATS = (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e300, -1e300, 0.0, 5e-324)
INTS = (0, -1, 2**31 - 1, -(2**31))
LONGS = (2**63 - 1, -(2**63))
VALUES: dict[str, tuple[float, ...]] = {"float": FLOATS, "double": FLOATS, "int": INTS, "long": INTS + LONGS}
PIXELS: tuple[float | str, ...] = (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, "constant", "all infinite")

Mutation = Callable[[dict], None]


def _avro_kind(schema: dict, field: str) -> str | None:
    """'int', 'long', 'float' or 'double' of a candidate field in a writer schema (None: absent)."""
    cand = next(f for f in schema["fields"] if f["name"] == "candidate")["type"]
    for f in cand["fields"]:
        if f["name"] == field:
            t = f["type"]
            kinds = [k for k in (t if isinstance(t, list) else [t]) if k != "null"]
            return kinds[0] if kinds and isinstance(kinds[0], str) else None
    return None


def _set_field(field: str, value: float) -> Mutation:
    def f(rec: dict) -> None:
        rec["candidate"][field] = value

    return f


def _set_pixels(value: float | str) -> Mutation:
    def f(rec: dict) -> None:
        for key in ("cutoutScience", "cutoutDifference"):
            cut = rec[key]
            with fits.open(io.BytesIO(gunzip(cut["stampData"]))) as h:
                img = np.array(h[0].data, dtype=np.float32)
            if value == "constant":
                img[:] = 7.0
            elif value == "all infinite":
                img[:] = np.inf
            else:
                img[img.shape[0] // 2, img.shape[1] // 2] = value
            buf = io.BytesIO()
            fits.PrimaryHDU(img).writeto(buf)
            cut["stampData"] = gzip.compress(buf.getvalue())

    return f


def _cases(message: bytes) -> list[tuple[str, Mutation]]:
    schema = fastavro.reader(io.BytesIO(message)).writer_schema
    out: list[tuple[str, Mutation]] = []
    for field in CANDIDATE_FIELDS:
        kind = _avro_kind(schema, field)
        values = VALUES.get(kind or "", ())
        out += [(f"{field}={v}", _set_field(field, v)) for v in values]
    return out + [(f"pixels={v}", _set_pixels(v)) for v in PIXELS]


def _rewritten(message: bytes, mutate: Mutation) -> bytes:
    reader = fastavro.reader(io.BytesIO(message))
    schema, record = reader.writer_schema, next(reader)
    mutate(record)
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [record], codec="null")
    return buf.getvalue()


@pytest.fixture(scope="module")
def runners() -> list[ModelRunner]:
    """The shipped model on both paths: the torch-free runtime bundle (the CPU default) and the
    torch bundle (what a GPU runs; on the CPU here)."""
    return [ModelRunner("model/bundles/default.npz"), ModelRunner("model/bundles/default.pt", device="cpu")]


def test_extreme_field_values_and_pixels_end_as_a_dead_letter_or_a_finite_result(
    corpus: list[bytes], runners: list[ModelRunner]
) -> None:
    schemas = SchemaCache()
    good: list[tuple[str, GoodAlert]] = []
    reasons: dict[str, str] = {}
    for message in (corpus[0], corpus[len(corpus) // 2], corpus[-1]):
        for name, mutate in _cases(message):
            try:
                alert, pixels = decode_message(_rewritten(message, mutate), schemas)
            except BadAlertError as e:
                reasons[name] = e.reason
                continue
            good.append((name, GoodAlert(alert, pixels, features_of(alert), Source("alerts", 0, len(good)))))
    assert len(good) > 3 * len(reasons), "most extreme values are still alerts, not dead letters"
    assert "unexpected" not in reasons.values()
    raw = np.stack([g.stamp.pixels for _, g in good])
    features = np.stack([g.features for _, g in good])
    encoder = ResultEncoder()
    for runner in runners:
        z, stamp_probs, probs = runner.predict(raw, features)
        for i, (name, _) in enumerate(good):
            assert np.isfinite(z[i]).all(), name
            for p in (stamp_probs[i], probs[i]):
                assert np.isfinite(p).all() and (p >= 0).all() and abs(float(p.sum()) - 1.0) < 1e-4, name
        meta = ModelMeta.of(runner.name, runner.version, runner.bundle.class_names, True, 1)
        results = build_results([g for _, g in good], z, stamp_probs, probs, [meta] * len(good), 0)
        for (name, _), r in zip(good, results, strict=True):
            encoded = encoder.encode(r)
            assert encoded == encoder.encode_with_fastavro(r), name
            assert decode_result(encoded)["candid"] == r.candid
            assert all(isinstance(v, str) for v in redis_fields(r).values()), name
