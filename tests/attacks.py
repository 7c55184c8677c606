"""Crafted hostile messages, one per attack class of issue #11, built from a valid generated alert
(tests only). Each returns (message bytes, the dead-letter reason it must get)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import struct
import zlib

import fastavro
import numpy as np
from astropy.io import fits

from alerts.framing import MAGIC, ContainerFramer, zigzag
from alerts.synthetic import ALERT_SCHEMA, SCHEMA_JSON, make_alert


def record_of(candid: int, n_prv: int = 3) -> dict:
    return next(iter(fastavro.reader(io.BytesIO(make_alert(candid, n_prv=n_prv).message))))


def message_of(schema: dict, record: dict) -> bytes:
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    return ContainerFramer(json.dumps(schema).encode()).frame(body.getvalue())


def deep_recursive_schema(depth: int = 10_000) -> bytes:
    inner = '{"type":"record","name":"n","fields":[{"name":"x","type":' * depth + '"n"' + "}]}" * depth
    schema = json.dumps(ALERT_SCHEMA).replace('"publisher", "type": "string"', f'"publisher", "type": {inner}')
    return ContainerFramer(schema.encode()).frame(b"\x00" * 64)


def zero_byte_items(candid: int) -> bytes:
    schema = json.loads(SCHEMA_JSON)
    schema["fields"].insert(2, {"name": "nothing", "type": {"type": "array", "items": "null"}})
    record = record_of(candid) | {"nothing": []}
    msg = message_of(schema, record)
    i = msg.index(record["objectId"].encode()) - 1
    return msg[: i - 1] + zigzag(2**62) + msg[i - 1 :]


def huge_history_count(candid: int) -> bytes:
    record = record_of(candid, n_prv=1)
    record["prv_candidates"][0]["jd"] = 1234.5678
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ALERT_SCHEMA), record)
    raw = body.getvalue()
    i = raw.index(b"\x02" + zigzag(1) + struct.pack("<d", 1234.5678))
    return ContainerFramer(SCHEMA_JSON).frame(raw[:i] + b"\x02" + zigzag(2**62) + raw[i + 2 :])


def bzip2_bomb() -> bytes:
    bomb = bz2.compress(b"\x00" * (200 * 1024 * 1024))
    framer = ContainerFramer(SCHEMA_JSON)
    header = framer.header.replace(zigzag(4) + b"null", zigzag(5) + b"bzip2")
    return MAGIC + header[4:] + zigzag(1) + zigzag(len(bomb)) + bomb + framer.sync


def gzip_stamp_bomb(candid: int) -> bytes:
    record = record_of(candid)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    record["cutoutScience"]["stampData"] = c.compress(b"\x00" * (64 * 1024 * 1024)) + c.flush()
    return message_of(ALERT_SCHEMA, record)


def fits_size_bomb(candid: int) -> bytes:
    hdu = fits.PrimaryHDU(np.zeros((10, 10), np.uint8))
    hdu.header["BSCALE"] = 2.0
    raw = io.BytesIO()
    hdu.writeto(raw)
    text = raw.getvalue().replace(b"NAXIS1  =                   10", b"NAXIS1  =                12000")
    text = text.replace(b"NAXIS2  =                   10", b"NAXIS2  =                12000")
    record = record_of(candid)
    record["cutoutScience"]["stampData"] = gzip.compress(text)
    return message_of(ALERT_SCHEMA, record)


def infinite_jd(candid: int) -> bytes:
    record = record_of(candid)
    record["candidate"]["jd"] = float("inf")
    return message_of(ALERT_SCHEMA, record)


def candid_as_double(candid: int) -> bytes:
    schema = json.loads(SCHEMA_JSON)
    next(f for f in schema["fields"] if f["name"] == "candid")["type"] = "double"
    record = record_of(candid) | {"candid": 1e30}
    return message_of(schema, record)


def long_object_id(candid: int) -> bytes:
    return message_of(ALERT_SCHEMA, record_of(candid) | {"objectId": "ZTF" + "a" * 5000})


def oversized_schema(candid: int, size: int = 600_000) -> bytes:
    """A valid alert whose writer schema carries ``size`` bytes of padding (a flood of distinct
    ~0.9 MB schemas once kept ~16 MB resident each)."""
    schema = json.loads(SCHEMA_JSON) | {"doc": f"flood {candid} " + "x" * size}
    return message_of(schema, record_of(candid))


def all_attacks(start: int) -> list[tuple[str, bytes, str]]:
    """(name, message, expected dead-letter reason) for every attack class."""
    return [
        ("deep recursive schema", deep_recursive_schema(), "schema_policy"),
        ("2^62 zero-byte array items", zero_byte_items(start + 1), "schema_policy"),
        ("2^62 history entries", huge_history_count(start + 2), "too_large"),
        ("bzip2 bomb block", bzip2_bomb(), "codec"),
        ("gzip stamp bomb", gzip_stamp_bomb(start + 4), "cutout_too_large"),
        ("FITS header size bomb", fits_size_bomb(start + 5), "cutout_too_large"),
        ("infinite jd", infinite_jd(start + 6), "bad_value"),
        ("candid as a double", candid_as_double(start + 7), "schema_policy"),
        ("over-long objectId", long_object_id(start + 8), "bad_value"),
        ("oversized writer schema (flood)", oversized_schema(start + 9), "schema_policy"),
    ]
