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


def history_count_replaced(candid: int, count: bytes) -> bytes:
    """A one-entry history whose block count (the bytes after the union branch) is ``count``."""
    record = record_of(candid, n_prv=1)
    record["prv_candidates"][0]["jd"] = 1234.5678
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ALERT_SCHEMA), record)
    raw = body.getvalue()
    i = raw.index(b"\x02" + zigzag(1) + struct.pack("<d", 1234.5678))
    return ContainerFramer(SCHEMA_JSON).frame(raw[:i] + b"\x02" + count + raw[i + 2 :])


def huge_history_count(candid: int) -> bytes:
    return history_count_replaced(candid, zigzag(2**62))


def bzip2_bomb() -> bytes:
    bomb = bz2.compress(b"\x00" * (200 * 1024 * 1024))
    framer = ContainerFramer(SCHEMA_JSON)
    header = framer.header.replace(zigzag(4) + b"null", zigzag(5) + b"bzip2")
    return MAGIC + header[4:] + zigzag(1) + zigzag(len(bomb)) + bomb + framer.sync


def deflate_bomb() -> bytes:
    """One deflate block of ~20 KB that inflates to 20 MiB, past the 16 MiB cap. Deflate is read
    by default (Avro's required codec), so it is inflated up to the cap, then refused."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = c.compress(b"\x00" * (20 * 1024 * 1024)) + c.flush()
    framer = ContainerFramer(SCHEMA_JSON)
    header = framer.header.replace(zigzag(4) + b"null", zigzag(7) + b"deflate")
    return MAGIC + header[4:] + zigzag(1) + zigzag(len(bomb)) + bomb + framer.sync


def _snappy_block(data: bytes, stated: int | None = None) -> bytes:
    """An Avro snappy block: raw snappy (its preamble the inflated size, or ``stated`` instead),
    then the big-endian CRC32 of the inflated bytes."""
    import cramjam

    def split(raw: bytes) -> tuple[bytes, bytes]:  # snappy's preamble (a plain varint), the rest
        i = 0
        while raw[i] & 0x80:
            i += 1
        return raw[: i + 1], raw[i + 1 :]

    raw = bytes(cramjam.snappy.compress_raw(data))
    if stated is not None:  # the preamble of `stated` bytes, before this data's blocks
        raw = split(bytes(cramjam.snappy.compress_raw(bytes(stated))))[0] + split(raw)[1]
    return raw + zlib.crc32(data).to_bytes(4, "big")


def snappy_container(block: bytes) -> bytes:
    framer = ContainerFramer(SCHEMA_JSON)
    header = framer.header.replace(zigzag(4) + b"null", zigzag(6) + b"snappy")
    return MAGIC + header[4:] + zigzag(1) + zigzag(len(block)) + block + framer.sync


def snappy_bomb() -> bytes:
    """A snappy block of ~1 MB that states and holds 20 MiB, past the 16 MiB cap: refused by its
    stated size before anything is inflated (snappy is read by default)."""
    return snappy_container(_snappy_block(b"\x00" * (20 * 1024 * 1024)))


def snappy_understated(candid: int) -> bytes:
    """A valid alert's record in a snappy block whose preamble states 100 bytes: the decoder
    refuses a block that outgrows what it stated."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ALERT_SCHEMA), record_of(candid))
    return snappy_container(_snappy_block(body.getvalue(), stated=100))


def deflate_blocks_past_the_cap(candid: int, blocks: int = 20) -> bytes:
    """``blocks`` deflate blocks of one valid record each, whose 1 MiB stamp of zeros makes the
    block ~1 KB: each block far under the cap, 20 MiB together (the cap counts them all)."""
    record = record_of(candid)
    record["cutoutScience"]["stampData"] = b"\x00" * (1024 * 1024)
    for other in ("cutoutTemplate", "cutoutDifference"):  # their noise would not compress
        if record.get(other):
            record[other]["stampData"] = b"\x00" * 1024
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(ALERT_SCHEMA), [record] * blocks, codec="deflate", sync_interval=1)
    return buf.getvalue()


def gzip_stamp_bomb(candid: int) -> bytes:
    record = record_of(candid)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    record["cutoutScience"]["stampData"] = c.compress(b"\x00" * (64 * 1024 * 1024)) + c.flush()
    return message_of(ALERT_SCHEMA, record)


def fits_header_bomb() -> bytes:
    """A 10x10 FITS image whose header claims 12000x12000 pixels, scaled (BSCALE)."""
    hdu = fits.PrimaryHDU(np.zeros((10, 10), np.uint8))
    hdu.header["BSCALE"] = 2.0
    raw = io.BytesIO()
    hdu.writeto(raw)
    text = raw.getvalue().replace(b"NAXIS1  =                   10", b"NAXIS1  =                12000")
    return text.replace(b"NAXIS2  =                   10", b"NAXIS2  =                12000")


def fits_size_bomb(candid: int) -> bytes:
    record = record_of(candid)
    record["cutoutScience"]["stampData"] = gzip.compress(fits_header_bomb())
    return message_of(ALERT_SCHEMA, record)


def array_count_past_the_end(candid: int) -> bytes:
    """A writer schema with an array of doubles inside ``candidate`` (no compiled layout: the
    general path, fastavro), whose count says 2^62: fastavro read empty doubles past the end of the
    message for minutes with the GIL held (found by fuzzing mutated schemas)."""
    schema = json.loads(SCHEMA_JSON)
    cand = next(f for f in schema["fields"] if f["name"] == "candidate")["type"]
    cand["fields"].append({"name": "extra", "type": {"type": "array", "items": "double"}})
    record = record_of(candid)
    record["candidate"]["extra"] = [1234.5678]
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    raw = body.getvalue()
    i = raw.index(zigzag(1) + struct.pack("<d", 1234.5678) + b"\x00")
    return ContainerFramer(json.dumps(schema).encode()).frame(raw[:i] + zigzag(2**62) + raw[i + 1 :])


def tile_compressed_fits(side: int = 2048) -> bytes:
    """A FITS file whose image sits tile-compressed (GZIP_1) in a binary-table extension: its size
    is known only after decompressing (at 16000x16000 a 55 KB message took 6.6 s and ~1 GB)."""
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((side, side), np.float32), compression_type="GZIP_1")])
    raw = io.BytesIO()
    hdus.writeto(raw)
    return raw.getvalue()


def tile_compressed_stamp(candid: int) -> bytes:
    record = record_of(candid)
    record["cutoutDifference"]["stampData"] = gzip.compress(tile_compressed_fits())
    return message_of(ALERT_SCHEMA, record)


def fits_count_bomb(card: str) -> bytes:
    """A cutout whose header claims 2^31 axes (NAXIS) or table columns (TFIELDS, in an extension):
    astropy loops over them while building the HDU, minutes before anything can be checked."""
    raw = io.BytesIO()
    if card == "NAXIS":
        fits.PrimaryHDU(np.zeros((63, 63), np.float32)).writeto(raw)
        return raw.getvalue().replace(b"NAXIS   =                    2", b"NAXIS   =           2147483647")
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.zeros(3, np.float32))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(raw)
    return raw.getvalue().replace(b"TFIELDS =                    1", b"TFIELDS =           2147483647")


def fits_count_stamp(candid: int, card: str) -> bytes:
    record = record_of(candid)
    record["cutoutScience"]["stampData"] = gzip.compress(fits_count_bomb(card))
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


def rubin_message(source_id: int, n_prv: int = 2, schema_id: int = 1000, mutate=None, **changes: object) -> bytes:
    """A generated Rubin wire message with top-level fields replaced by ``changes`` (and
    ``mutate(record)`` applied, for nested fields)."""
    from alerts.rubin_schemas import packaged_schema
    from alerts.synthetic_rubin import make_rubin_record

    schema = json.loads(packaged_schema(schema_id) or b"")
    record = make_rubin_record(schema, source_id, np.random.default_rng(source_id % 1000), n_prv) | changes
    if mutate is not None:
        mutate(record)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    return b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()


def rubin_huge_history(source_id: int) -> bytes:
    """prvDiaSources claims 2^62 entries (the first entry's id follows the count)."""
    msg = rubin_message(source_id, n_prv=1)
    i = msg.index(b"\x02" + zigzag(1) + zigzag(source_id - 1))
    return msg[:i] + b"\x02" + zigzag(2**62) + msg[i + 2 :]


def string_length_past_int64(candid: int) -> bytes:
    """objectId claims 2^63 - 1 bytes: in the compiled reader's int64 ``pos + n`` wrapped negative
    and passed the bounds check, and the read that followed segfaulted (found by fuzzing)."""
    record = record_of(candid)
    msg = message_of(ALERT_SCHEMA, record)
    oid = record["objectId"].encode()
    i = msg.index(zigzag(len(oid)) + oid)
    return msg[:i] + zigzag(2**63 - 1) + msg[i + 1 :]


def history_block_count_min_int64(candid: int) -> bytes:
    """prv_candidates opens a block of -2^63 entries (negative: a block with its byte size), whose
    negation is itself in int64."""
    return history_count_replaced(candid, zigzag(-(2**63)) + zigzag(8))


def rubin_string_length_past_int64(source_id: int) -> bytes:
    """diaSource.band claims 2^63 - 1 bytes (Rubin's records go through the same compiled reader)."""
    msg = rubin_message(source_id, n_prv=0, mutate=lambda rec: rec["diaSource"].update(band="zz"))
    i = msg.index(zigzag(2) + b"zz")
    return msg[:i] + zigzag(2**63 - 1) + msg[i + 1 :]


def fixed_of_2_63_bytes(candid: int) -> bytes:
    """A writer schema with a ``fixed`` of 2^63 bytes (fastavro parses it; the compiled layout's
    int64 tables overflowed past every named error)."""
    schema = json.loads(SCHEMA_JSON)
    schema["fields"].insert(2, {"name": "blob", "type": {"type": "fixed", "name": "blob", "size": 2**63}})
    return ContainerFramer(json.dumps(schema).encode()).frame(zigzag(candid) + b"\x00" * 64)


def rubin_fits_bomb(source_id: int) -> bytes:
    return rubin_message(source_id, cutoutScience=fits_header_bomb())


def rubin_bad_band(source_id: int) -> bytes:
    return rubin_message(source_id, n_prv=0, mutate=lambda rec: rec["diaSource"].update(band="q" * 500))


def all_attacks(start: int) -> list[tuple[str, bytes, str]]:
    """(name, message, expected dead-letter reason) for every attack class."""
    return [
        ("deep recursive schema", deep_recursive_schema(), "schema_policy"),
        ("2^62 zero-byte array items", zero_byte_items(start + 1), "schema_policy"),
        ("2^62 history entries", huge_history_count(start + 2), "too_large"),
        ("2^62 doubles in an array only fastavro reads", array_count_past_the_end(start + 11), "truncated"),
        ("bzip2 bomb block", bzip2_bomb(), "codec"),
        ("deflate bomb block", deflate_bomb(), "too_large"),
        ("snappy bomb block", snappy_bomb(), "too_large"),
        ("snappy block that outgrows its stated size", snappy_understated(start + 18), "truncated"),
        ("deflate blocks that each stay under the cap", deflate_blocks_past_the_cap(start + 17), "too_large"),
        ("gzip stamp bomb", gzip_stamp_bomb(start + 4), "cutout_too_large"),
        ("FITS header size bomb", fits_size_bomb(start + 5), "cutout_too_large"),
        ("tile-compressed FITS image (decompression bomb)", tile_compressed_stamp(start + 10), "cutout_bad_fits"),
        ("FITS header claiming 2^31 axes", fits_count_stamp(start + 12, "NAXIS"), "cutout_bad_fits"),
        ("FITS table extension claiming 2^31 columns", fits_count_stamp(start + 13, "TFIELDS"), "cutout_bad_fits"),
        ("infinite jd", infinite_jd(start + 6), "bad_value"),
        ("candid as a double", candid_as_double(start + 7), "schema_policy"),
        ("over-long objectId", long_object_id(start + 8), "bad_value"),
        ("oversized writer schema (flood)", oversized_schema(start + 9), "schema_policy"),
        ("string length of 2^63 - 1 (int64 overflow)", string_length_past_int64(start + 14), "truncated"),
        ("history block of -2^63 entries", history_block_count_min_int64(start + 15), "truncated"),
        ("fixed of 2^63 bytes in the writer schema", fixed_of_2_63_bytes(start + 16), "schema_policy"),
        # Rubin's wire form (0x00 + schema id + body)
        ("Rubin: 2^62 history entries", rubin_huge_history(start + 20), "too_large"),
        ("Rubin: unknown schema id", b"\x00\x00\x00\x10\x92" + rubin_message(start + 21)[5:], "unknown_schema"),
        ("Rubin: header cut short", b"\x00\x00\x00", "bad_framing"),
        ("Rubin: FITS header size bomb", rubin_fits_bomb(start + 23), "cutout_too_large"),
        ("Rubin: tile-compressed FITS image", rubin_message(start + 26, cutoutDifference=tile_compressed_fits()), "cutout_bad_fits"),
        ("Rubin: FITS header claiming 2^31 axes", rubin_message(start + 27, cutoutScience=fits_count_bomb("NAXIS")), "cutout_bad_fits"),
        ("Rubin: a band that is no band", rubin_bad_band(start + 24), "bad_value"),
        ("Rubin: bytes after the record", rubin_message(start + 25) + b"\x00" * 16, "truncated"),
        ("Rubin: string length of 2^63 - 1", rubin_string_length_past_int64(start + 28), "truncated"),
    ]


# Messages no library crashes or hangs on today, made to: the worker task below dies on the first
# the way a segfault in a decoding library would, and sleeps on the second the way a loop in C
# with the GIL held would (no exception, no reply either way), so the tests can show what the
# daemon does with such messages (consumer/decoding.py, consumer/crash_marker.py).
KILL_WORKER = b"this message kills the process that decodes it"
HANG_WORKER = b"this message hangs the process that decodes it"


def decode_or_die(chunk):  # type: ignore[no-untyped-def]
    """A decode-worker task (``DecodePool(task=...)``) that exits on KILL_WORKER, and hangs on
    HANG_WORKER the way a loop in a C library with the GIL held would (no exception, no reply)."""
    import os
    import time

    from consumer.decoding import chunk_values, decode_chunk

    values = [v or b"" for v in chunk_values(chunk)]
    if any(v.endswith(KILL_WORKER) for v in values):  # as a whole message, or a Rubin message's body
        os._exit(1)
    if any(v.endswith(HANG_WORKER) for v in values):
        time.sleep(3600)
    return decode_chunk(chunk)
