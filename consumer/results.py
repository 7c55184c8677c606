"""The result record (what is published per alert) and its Avro wire form on the output topic.
Its Redis form is in ``consumer/redis_sink.py``.

The output topic carries one Avro object container file per message with the schema of
``output_schema.avsc`` in its header, like ZTF's own stream, so any Avro reader can read a message
with no registry. The header is built once (the schema never changes in a process) and each record
is framed by hand: fastavro.writer per message would re-validate and re-serialise the schema.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from fastavro import parse_schema, schemaless_writer

from alerts.framing import ContainerFramer, zigzag

SCHEMA_PATH = Path(__file__).with_name("output_schema.avsc")


@cache
def output_schema_json() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


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
    stamp_probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classifier: str = "stamp-probe"
    features_version: int = 0
    survey: str = "ztf"
    band: str = ""
    dia_source_id: int | None = None  # Rubin
    dia_object_id: int | None = None
    ndethist: int | None = None  # detections of the object so far (schema 3.1)
    jdstarthist: float | None = None  # its first detection

    @property
    def predicted_index(self) -> int:
        """-1 where there is no classifier (no classes)."""
        return int(np.argmax(self.probabilities)) if len(self.probabilities) else -1

    @property
    def predicted_class(self) -> str:
        i = self.predicted_index
        return self.class_names[i] if i >= 0 else ""

    @property
    def predicted_probability(self) -> float:
        i = self.predicted_index
        return float(self.probabilities[i]) if i >= 0 else 0.0


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
        "predicted_probability": r.predicted_probability,
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
        "stamp_probabilities": np.asarray(r.stamp_probabilities, dtype=np.float32).tolist(),
        "classifier": r.classifier,
        "features_version": r.features_version,
        "survey": r.survey,
        "band": r.band,
        "diaSourceId": r.dia_source_id,
        "diaObjectId": r.dia_object_id,
        "ndethist": r.ndethist,
        "jdstarthist": r.jdstarthist,
    }


_DOUBLE = struct.Struct("<d")
_TWO_DOUBLES = struct.Struct("<dd")
_TWO_FLOATS = struct.Struct("<ff")
_FLOAT = struct.Struct("<f")


def _avro_string(s: str) -> bytes:
    b = s.encode()
    return zigzag(len(b)) + b


def _optional_long(v: int | None) -> bytes:
    """["null", "long"] (or ["null", "int"]: the same bytes): branch 0 (null) or branch 1 and the value."""
    return b"\x00" if v is None else b"\x02" + zigzag(v)


def _optional_double(v: float | None) -> bytes:
    """["null", "double"]."""
    return b"\x00" if v is None else b"\x02" + _DOUBLE.pack(v)


def _avro_floats(a: np.ndarray) -> bytes:
    """An Avro array of float in one block (as fastavro writes it); ``a`` is little-endian float32."""
    return zigzag(len(a)) + a.tobytes() + b"\x00" if len(a) else b"\x00"


class ResultEncoder:
    """Result -> one-record Avro container (codec null) with the output schema in its header.

    The record is encoded by hand, field by field in the order of ``output_schema.avsc``: the schema
    is fixed (its unions are ["null", x]), and fastavro's schemaless_writer (plus the dict it needs) costs
    ~20 us per result on the consumer's main thread, this ~4 us. The unit tests hold it byte for
    byte to fastavro's encoding of the same record (``encode_with_fastavro``), so a change of the
    schema that is not made here too fails them."""

    def __init__(self) -> None:
        schema = json.dumps(output_schema_json(), separators=(",", ":")).encode()
        self._framer = ContainerFramer(schema)
        self._schemavsn = _avro_string(output_schema_version())
        # for the current (class names, model name, model version): the class_names array, each
        # class name as an Avro string (predicted_class), and the model_name + model_version strings
        self._consts: tuple[tuple[tuple[str, ...], str, str], tuple[bytes, list[bytes], bytes]] | None = None
        self._buf = io.BytesIO()

    def _constants(self, r: Result) -> tuple[bytes, list[bytes], bytes]:
        key = (r.class_names, r.model_name, r.model_version)
        if self._consts is None or self._consts[0] != key:  # one model at a time: a reload replaces it
            names = [_avro_string(n) for n in r.class_names]
            array = zigzag(len(names)) + b"".join(names) + b"\x00" if names else b"\x00"
            self._consts = (key, (array, names, _avro_string(r.model_name) + _avro_string(r.model_version)))
        return self._consts[1]

    def encode(self, r: Result) -> bytes:
        names_array, names, model = self._constants(r)
        probs = np.asarray(r.probabilities, dtype="<f4")
        best = r.predicted_index
        record = b"".join((
            self._schemavsn,
            zigzag(r.candid),
            _avro_string(r.object_id),
            _DOUBLE.pack(r.jd),
            zigzag(r.fid),
            _TWO_DOUBLES.pack(r.ra, r.dec),
            _avro_floats(np.asarray(r.embedding, dtype="<f4")),
            names_array,
            _avro_floats(probs),
            names[best] if best >= 0 else b"\x00",
            probs[best : best + 1].tobytes() if best >= 0 else _FLOAT.pack(0.0),
            model,
            b"\x01" if r.cutout_padded else b"\x00",
            _TWO_FLOATS.pack(*r.nan_fraction),
            _avro_string(r.alert_schema_version),
            zigzag(r.processed_at_ms),
            _avro_string(r.source_topic),
            zigzag(r.source_partition),
            zigzag(r.source_offset),
            _avro_floats(np.asarray(r.stamp_probabilities, dtype="<f4")),
            _avro_string(r.classifier),
            zigzag(r.features_version),
            _avro_string(r.survey),
            _avro_string(r.band),
            _optional_long(r.dia_source_id),
            _optional_long(r.dia_object_id),
            _optional_long(r.ndethist),
            _optional_double(r.jdstarthist),
        ))  # fmt: skip
        return self._framer.frame(record)

    def encode_with_fastavro(self, r: Result) -> bytes:
        """The same message by fastavro's schemaless_writer: the reference the tests hold encode to."""
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        schemaless_writer(buf, _parsed_schema(), result_record(r))
        return self._framer.frame(buf.getvalue())


def decode_result(message: bytes) -> dict[str, Any]:
    """One output message -> its record (for readers, tests and the demo)."""
    records = list(fastavro.reader(io.BytesIO(message)))
    if len(records) != 1 or not isinstance(records[0], dict):
        raise ValueError(f"expected one record, got {len(records)}")
    return records[0]
