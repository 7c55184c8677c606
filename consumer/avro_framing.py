"""Framing of one Avro record as an object container file (the ZTF wire form: one record, codec
null, writer schema in the header). Hand-written because it is three byte strings: fastavro.writer
per message would re-serialise and re-validate the schema each time."""

from __future__ import annotations

import os


def zigzag(n: int) -> bytes:
    """Avro long encoding."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ContainerFramer:
    """Precomputed header for one schema; ``frame(record_bytes)`` -> one-record container file."""

    def __init__(self, schema_json: bytes, sync: bytes | None = None) -> None:
        self.sync = sync if sync is not None else os.urandom(16)
        meta = b"".join(
            zigzag(len(k)) + k + zigzag(len(v)) + v for k, v in ((b"avro.schema", schema_json), (b"avro.codec", b"null"))
        )
        self.header = b"Obj\x01" + zigzag(2) + meta + zigzag(0) + self.sync

    def frame(self, record: bytes) -> bytes:
        return b"".join((self.header, zigzag(1), zigzag(len(record)), record, self.sync))
