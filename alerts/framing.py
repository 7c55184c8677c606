"""Avro object container framing, both ways: reading the header of one message (magic, metadata
map, sync marker) and writing one record as a one-record container (the ZTF wire form: codec null,
writer schema in the header).

Hand-written because it is a handful of byte strings: ``fastavro.reader`` parses the ~23 KB writer
schema of every message (~240 us), and ``fastavro.writer`` re-serialises and re-validates it per
message. The unit tests hold ``ContainerFramer`` byte for byte to ``fastavro.writer`` and
``read_container_header`` to ``fastavro.block_reader`` on generated input (hypothesis).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from alerts.errors import AlertDecodeError

MAGIC = b"Obj\x01"
SYNC_SIZE = 16
MAX_METADATA_ENTRIES = 1024


def zigzag(n: int) -> bytes:
    """Avro long encoding (zig-zag, then base-128 varint)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Avro zig-zag varint at ``pos`` -> (value, position after it). At most 10 bytes are read."""
    shift = 0
    acc = 0
    while True:
        if pos >= len(buf):
            raise AlertDecodeError("truncated varint", reason="truncated")
        b = buf[pos]
        pos += 1
        acc |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise AlertDecodeError("varint longer than 10 bytes", reason="not_avro")
    return (acc >> 1) ^ -(acc & 1), pos


def read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Avro bytes/string at ``pos``; the length is checked against the buffer before slicing."""
    n, pos = read_long(buf, pos)
    if n < 0 or pos + n > len(buf):
        raise AlertDecodeError("bytes field runs past the end of the message", reason="truncated")
    return buf[pos : pos + n], pos + n


@dataclass(frozen=True, slots=True)
class ContainerHeader:
    schema_json: bytes
    codec: str
    sync: bytes
    body_offset: int


def read_container_header(buf: bytes) -> ContainerHeader:
    """Parse the object container header: magic, metadata map, sync marker."""
    if len(buf) < 4 or buf[:4] != MAGIC:
        raise AlertDecodeError(
            "not an Avro object container file (bad magic)", reason="empty" if not buf else "not_avro"
        )
    pos = 4
    meta: dict[bytes, bytes] = {}
    while True:
        count, pos = read_long(buf, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = read_long(buf, pos)  # block size in bytes, unused
        if count + len(meta) > MAX_METADATA_ENTRIES:
            raise AlertDecodeError("implausible metadata map", reason="not_avro")
        for _ in range(count):
            key, pos = read_bytes(buf, pos)
            value, pos = read_bytes(buf, pos)
            meta[key] = value
    if pos + SYNC_SIZE > len(buf):
        raise AlertDecodeError("container header truncated", reason="truncated")
    schema = meta.get(b"avro.schema")
    if not schema:
        raise AlertDecodeError("container has no avro.schema", reason="not_avro")
    codec = meta.get(b"avro.codec", b"null").decode("ascii", "replace")
    return ContainerHeader(schema, codec, buf[pos : pos + SYNC_SIZE], pos + SYNC_SIZE)


class ContainerFramer:
    """Precomputed header for one schema; ``frame(record_bytes)`` -> one-record container file."""

    def __init__(self, schema_json: bytes, sync: bytes | None = None) -> None:
        self.sync = sync if sync is not None else os.urandom(SYNC_SIZE)
        meta = b"".join(
            zigzag(len(k)) + k + zigzag(len(v)) + v for k, v in ((b"avro.codec", b"null"), (b"avro.schema", schema_json))  # fastavro's order
        )
        self.header = MAGIC + zigzag(2) + meta + zigzag(0) + self.sync

    def frame(self, record: bytes) -> bytes:
        return b"".join((self.header, zigzag(1), zigzag(len(record)), record, self.sync))
