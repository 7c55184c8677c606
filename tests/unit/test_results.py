from __future__ import annotations

import io

import fastavro
import numpy as np

from consumer.results import (
    Result,
    ResultEncoder,
    decode_result,
    embedding_from_redis,
    output_schema_json,
    redis_fields,
)


def _result(candid: int = 123) -> Result:
    return Result(
        candid=candid, object_id="ZTF25abcdefg", jd=2460000.5, fid=2, ra=10.5, dec=-5.25,
        embedding=np.arange(42, dtype=np.float32) / 7, probabilities=np.array([0.1, 0.2, 0.4, 0.2, 0.1], np.float32),
        class_names=("AGN", "SN", "VS", "asteroid", "bogus"), model_name="m", model_version="3",
        cutout_padded=True, nan_fraction=(0.25, 0.0), alert_schema_version="4.02", processed_at_ms=1_700_000_000_000,
        source_topic="t", source_partition=1, source_offset=99,
    )  # fmt: skip


def test_output_message_is_a_valid_avro_container_with_the_repo_schema() -> None:
    msg = ResultEncoder().encode(_result())
    reader = fastavro.reader(io.BytesIO(msg))
    assert reader.writer_schema["name"] == "stampstream.stamp_result"
    (rec,) = list(reader)
    assert rec["candid"] == 123 and rec["predicted_class"] == "VS"
    assert abs(rec["predicted_probability"] - 0.4) < 1e-6
    np.testing.assert_allclose(rec["embedding"], np.arange(42) / 7, rtol=1e-6)
    assert rec["schemavsn"] == output_schema_json()["version"]
    assert decode_result(msg)["source_offset"] == 99


def test_encoder_reuse_gives_independent_messages() -> None:
    enc = ResultEncoder()
    a, b = enc.encode(_result(1)), enc.encode(_result(2))
    assert decode_result(a)["candid"] == 1 and decode_result(b)["candid"] == 2


def test_redis_fields_round_trip_embedding() -> None:
    f = redis_fields(_result())
    assert f["class"] == "VS" and f["p_VS"] == "0.400000" and f["padded"] == "1"
    np.testing.assert_array_equal(embedding_from_redis(f["embedding"]), np.arange(42, dtype=np.float32) / 7)
