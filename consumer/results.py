"""Results: what is published per alert, their Avro wire form (output topic) and Redis form.

The output topic carries one Avro object container file per message with the schema of
``output_schema.avsc`` in its header, like ZTF's own stream, so any Avro reader can read a message
with no registry. The header is built once (the schema never changes in a process) and each record
is framed by hand: fastavro.writer per message would re-validate and re-serialise the schema.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from fastavro import parse_schema, schemaless_writer

from consumer.avro_framing import ContainerFramer

SCHEMA_PATH = Path(__file__).with_name("output_schema.avsc")


@cache
def output_schema_json() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@cache
def _parsed_schema() -> Any:
    return parse_schema(output_schema_json())


def output_schema_version() -> str:
    return str(output_schema_json()["version"])


@dataclass(frozen=True, slots=True)
class Result:
    candid: int
    object_id: str
    jd: float
    fid: int
    ra: float
    dec: float
    embedding: np.ndarray  # (latent,) float32
    probabilities: np.ndarray  # (classes,) float32
    class_names: tuple[str, ...]
    model_name: str
    model_version: str
    cutout_padded: bool
    nan_fraction: tuple[float, float]
    alert_schema_version: str
    processed_at_ms: int
    source_topic: str
    source_partition: int
    source_offset: int

    @property
    def predicted_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def predicted_class(self) -> str:
        return self.class_names[self.predicted_index]


def result_record(r: Result) -> dict[str, Any]:
    """Result -> dict in the output schema."""
    return {
        "schemavsn": output_schema_version(),
        "candid": r.candid,
        "objectId": r.object_id,
        "jd": r.jd,
        "fid": r.fid,
        "ra": r.ra,
        "dec": r.dec,
        "embedding": r.embedding.tolist(),
        "class_names": list(r.class_names),
        "probabilities": r.probabilities.tolist(),
        "predicted_class": r.predicted_class,
        "predicted_probability": float(r.probabilities[r.predicted_index]),
        "model_name": r.model_name,
        "model_version": r.model_version,
        "cutout_padded": r.cutout_padded,
        "nan_fraction_science": r.nan_fraction[0],
        "nan_fraction_difference": r.nan_fraction[1],
        "alert_schema_version": r.alert_schema_version,
        "processed_at": r.processed_at_ms,
        "source_topic": r.source_topic,
        "source_partition": r.source_partition,
        "source_offset": r.source_offset,
    }


class ResultEncoder:
    """Result -> one-record Avro container (codec null) with the output schema in its header."""

    def __init__(self) -> None:
        schema = json.dumps(output_schema_json(), separators=(",", ":")).encode()
        self._framer = ContainerFramer(schema)
        self._buf = io.BytesIO()

    def encode(self, r: Result) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        schemaless_writer(buf, _parsed_schema(), result_record(r))
        return self._framer.frame(buf.getvalue())


def decode_result(message: bytes) -> dict[str, Any]:
    """One output message -> its record (for readers, tests and the demo)."""
    records = list(fastavro.reader(io.BytesIO(message)))
    if len(records) != 1:
        raise ValueError(f"expected one record, got {len(records)}")
    return records[0]


def redis_fields(r: Result) -> dict[str, str | bytes]:
    """Hash fields written to Redis for one result (documented in README, "Redis keys").

    ``embedding`` is little-endian float32 bytes, the layout Redis vector search (FT.CREATE ...
    VECTOR FLOAT32) reads directly."""
    fields: dict[str, str | bytes] = {
        "candid": str(r.candid),
        "objectId": r.object_id,
        "jd": repr(r.jd),
        "fid": str(r.fid),
        "ra": repr(r.ra),
        "dec": repr(r.dec),
        "class": r.predicted_class,
        "probability": f"{float(r.probabilities[r.predicted_index]):.6f}",
        "embedding": np.asarray(r.embedding, dtype="<f4").tobytes(),
        "model": f"{r.model_name}:{r.model_version}",
        "padded": "1" if r.cutout_padded else "0",
        "processed_at": str(r.processed_at_ms),
    }
    for name, p in zip(r.class_names, r.probabilities, strict=True):
        fields[f"p_{name}"] = f"{float(p):.6f}"
    return fields


def embedding_from_redis(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4")

