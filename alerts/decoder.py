"""bytes -> Alert: one Kafka message (an Avro object container file with its writer schema) to the
allowlisted fields, the 30-day history and the two cutouts.

Two paths, which give equal alerts (tests compare them on every real alert and on mutated ones):

* **fast** (codec null, a schema with a layout, ``layout.py``): the container header is read by
  hand, each distinct writer schema is compiled once (``SchemaCache``), and the record is read
  field by field from start to end by the compiled flat reader (``flat_reader.py``), keeping only
  the allowlisted columns. It is an exact parse: the cutouts are where the schema says they are,
  and the record must end exactly at its block's end.
* **general** (other codecs, schemas without a layout): fastavro with a projected reader schema.

Why not ``fastavro.reader`` per message: it parses the ~23 KB writer schema of every message
(~240 us) and decodes every field, the history included (~18 us per history entry).
"""

from __future__ import annotations

import bz2
import copy
import io
import math
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fastavro
import numpy as np
from fastavro import parse_schema, schemaless_reader

from alerts.alert import NEGATIVE_SIGNS, POSITIVE_SIGNS, Alert, History, sign_of
from alerts.allowlist import CANDIDATE_FIELDS, CANDIDATE_STRINGS, EPOCH_FIELDS, HISTORY_FIELDS
from alerts.errors import AlertDecodeError
from alerts.flat_reader import ERR_TOO_MANY, ERROR_TEXT, PackedLayout, Rows, read_record
from alerts.framing import SYNC_SIZE, read_container_header, read_long
from alerts.layout import compile_layout
from alerts.limits import SUPPORTED_CODECS, DecodeLimits
from alerts.official_schemas import official_version
from alerts.schema_policy import (
    RefusedSchemas,
    check_alert_fields,
    check_structure,
    check_ztf_types,
    checked_schema,
    field_of,
    record_of,
)
from alerts.strict_reader import strict_reader

__all__ = ["Alert", "History", "SchemaCache", "alert_from_record", "decode_alert", "decode_alert_reference", "decode_alerts"]

# Top-level fields kept by the projection. cutoutTemplate is not read (the model uses science and
# difference only).
_TOP_FIELDS = ("objectId", "candid", "candidate", "prv_candidates", "cutoutScience", "cutoutDifference")
# Columns of the fast path: the top row (fixed order: the first ones by position below), and the
# columns of each history entry.
_TOP_COLUMNS = (
    "objectId", "candid", "candidate.candid", "candidate.isdiffpos",
    "cutoutScience.stampData", "cutoutDifference.stampData",
    *(f"candidate.{n}" for n in CANDIDATE_FIELDS),
)  # fmt: skip
_OBJECT_ID, _CANDID, _CAND_CANDID, _ISDIFFPOS, _SCIENCE, _DIFFERENCE, _FIRST_CANDIDATE = range(7)
_HISTORY = {n: i for i, n in enumerate(HISTORY_FIELDS)}
# The history's isdiffpos by its first byte, as sign_of reads the candidate's (one rule, two
# forms): a table indexed by the byte, 1.5 us for 20 entries where two np.isin took 25 (measured).
_SIGN_OF_BYTE = np.full(256, -1, np.int8)
_SIGN_OF_BYTE[np.frombuffer(POSITIVE_SIGNS.encode(), np.uint8)] = 1
_SIGN_OF_BYTE[np.frombuffer(NEGATIVE_SIGNS.encode(), np.uint8)] = 0
OBJECT_ID = re.compile(r"ZTF[0-9]{2}[a-z0-9]{7}")


@dataclass(frozen=True, slots=True)
class _SchemaPlan:
    writer: Any  # parsed writer schema (general path)
    reader: Any  # parsed projected reader schema, or None when no projection was possible
    version: str
    layout: PackedLayout | None  # fast path; None: general path only
    official: bool = False  # an official ZTF schema (by fingerprint): the policy's rules skipped


def _projection(writer: dict[str, Any]) -> dict[str, Any]:
    """The reader schema of the general path: only the allowlisted fields."""
    reader = copy.deepcopy(writer)
    reader["fields"] = [f for f in reader["fields"] if f["name"] in _TOP_FIELDS]
    cand = field_of(reader, "candidate")
    rec = record_of(cand["type"]) if cand else None
    if rec is not None:
        keep = {"candid", *CANDIDATE_FIELDS, *CANDIDATE_STRINGS}
        rec["fields"] = [f for f in rec["fields"] if f["name"] in keep]
    prv = field_of(reader, "prv_candidates")
    if prv is not None:
        branches = prv["type"] if isinstance(prv["type"], list) else [prv["type"]]
        for b in branches:
            if isinstance(b, dict) and b.get("type") == "array" and isinstance(b.get("items"), dict):
                b["items"]["fields"] = [f for f in b["items"]["fields"] if f["name"] in HISTORY_FIELDS]
    return reader


class SchemaCache:
    """Compiled writer schemas by their exact JSON bytes (a stream carries a handful), and the
    decoding limits. Bounded in entries and in bytes, so a stream of garbage with ever-new schemas
    cannot grow memory without end; a refused schema is remembered too (by its hash), so a flood
    of one bad schema costs one check."""

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()
        self._plans: OrderedDict[bytes, _SchemaPlan] = OrderedDict()
        self._bytes = 0
        self._refused = RefusedSchemas()
        # The plan of the previous message: a stream is nearly always one schema in long runs, and
        # comparing the ~20 KB schema to the last one (memcmp) costs ~1 us where hashing it for
        # the dict costs ~6 us on every message.
        self._last: tuple[bytes, _SchemaPlan] | None = None
        self.misses = 0
        self.fast_hits = 0
        self.fast_misses = 0

    def __len__(self) -> int:
        return len(self._plans)

    def plan(self, schema_json: bytes) -> _SchemaPlan:
        last = self._last
        if last is not None and last[0] == schema_json:
            return last[1]
        plan = self._plans.get(schema_json)
        if plan is not None:
            self._last = (schema_json, plan)
            return plan
        key = hash(schema_json)
        self._refused.check(key)
        self.misses += 1
        try:
            plan = _compile(schema_json, self.limits)
        except AlertDecodeError as e:
            self._refused.remember(key, e)
            raise
        self._plans[schema_json] = plan
        self._bytes += len(schema_json)
        self._last = (schema_json, plan)
        while len(self._plans) > self.limits.max_schema_cache_entries or (
            self._bytes > self.limits.max_schema_cache_bytes and len(self._plans) > 1
        ):
            old, _ = self._plans.popitem(last=False)
            self._bytes -= len(old)
        return plan


def _ztf_rules(writer: Any) -> None:
    """The fields we read; the structural rules only for a schema that is not an official one."""
    check_alert_fields(writer)
    if official_version(writer) is None:  # depth and size already checked
        check_structure(writer)
        check_ztf_types(writer)


def _compile(schema_json: bytes, limits: DecodeLimits) -> _SchemaPlan:
    """The schema policy (schema_policy.py) first, then fastavro's parse and our layout."""
    writer_json, writer = checked_schema(schema_json, limits, _ztf_rules)
    official = official_version(writer_json) is not None
    try:
        reader = parse_schema(_projection(writer_json))
    except Exception:
        reader = None  # named-type references broke by the projection: decode everything
    version = str(writer_json.get("version") or writer_json.get("doc", "")[:16] or "unknown")
    layout = compile_layout(writer_json, _TOP_COLUMNS, "prv_candidates", HISTORY_FIELDS)
    return _SchemaPlan(writer, reader, version, layout, official)


# ---- the general path ------------------------------------------------------------------------


def _stamp(cutout: Any) -> bytes | None:
    if isinstance(cutout, dict):
        data = cutout.get("stampData")
        return bytes(data) if data is not None else None
    return None


def _as_record(value: object) -> dict[str, Any]:
    """A decoded datum that must be a record (the top level of an alert schema is one)."""
    if not isinstance(value, dict):
        raise AlertDecodeError("the decoded datum is not a record", reason="unknown_schema")
    return value


def _num(v: Any) -> float:
    return np.nan if v is None else float(v)


def _history_from_list(prv: Any) -> History:
    if not prv:
        return History.empty()
    cols = {n: np.array([_num(e.get(n)) for e in prv], dtype=np.float64) for n in HISTORY_FIELDS if n != "isdiffpos"}
    positive = np.array([sign_of(e.get("isdiffpos")) for e in prv], dtype=np.int8)
    return History(cols["jd"], cols["fid"], cols["magpsf"], cols["sigmapsf"], cols["diffmaglim"], positive)


def _checked(
    candid: Any, object_id: Any, candidate: np.ndarray, version: str, isdiffpos: str | None, history: History,
    science: bytes | None, difference: bytes | None,
) -> Alert:
    """The checks both paths share, then the Alert. Values are checked here, at decode time: a
    non-finite jd once pinned an object's Redis entry forever, an over-long objectId made a
    result bigger than the output topic accepts."""
    if candid is None or not object_id:
        raise AlertDecodeError("record lacks candid or objectId", reason="missing_field", candid=candid)
    candid = int(candid)
    alert = Alert(candid, str(object_id), version, candidate, isdiffpos, history, science, difference)
    for name in ("jd", "fid", "ra", "dec"):
        if np.isnan(alert.value(name)):
            raise AlertDecodeError(f"candidate.{name} is null", reason="missing_field", candid=candid)
    jd, fid, ra, dec = (alert.value(n) for n in ("jd", "fid", "ra", "dec"))
    problems = []
    if not (candid > 0 and (len(object_id) <= 32 and OBJECT_ID.fullmatch(object_id))):
        problems.append(f"candid {candid} / objectId {str(object_id)[:40]!r}")
    if not (math.isfinite(jd) and 2_400_000.0 < jd < 2_600_000.0):
        problems.append(f"jd {jd}")
    if not (fid == int(fid) and 1 <= fid <= 9):
        problems.append(f"fid {fid}")
    if not (0.0 <= ra <= 360.0 and -90.0 <= dec <= 90.0):
        problems.append(f"ra/dec {ra}/{dec}")
    if problems:
        raise AlertDecodeError("values out of range: " + ", ".join(problems), reason="bad_value", candid=candid)
    return alert


def alert_from_record(rec: dict[str, Any], schema_version: str) -> Alert:
    """Decoded Avro record (dict) -> Alert (the general path)."""
    cand = rec.get("candidate")
    if not isinstance(cand, dict):
        raise AlertDecodeError("record has no candidate", reason="missing_field")
    candid = rec.get("candid")
    if candid is None:
        candid = cand.get("candid")
    values = np.array([_num(cand.get(n)) for n in CANDIDATE_FIELDS], dtype=np.float64)
    isdiffpos = cand.get("isdiffpos")
    return _checked(
        candid, rec.get("objectId"), values, schema_version, None if isdiffpos is None else str(isdiffpos),
        _history_from_list(rec.get("prv_candidates")), _stamp(rec.get("cutoutScience")), _stamp(rec.get("cutoutDifference")),
    )  # fmt: skip


def epoch_values(entry: dict[str, Any]) -> tuple[np.ndarray, str | None]:
    """One ``prv_candidates`` detection -> its ``EPOCH_FIELDS`` (NaN where null) and its
    ``isdiffpos``, read as ``alert_from_record`` reads a candidate (trainer/stages.py builds
    first-detection views from them)."""
    isdiffpos = entry.get("isdiffpos")
    return np.array([_num(entry.get(n)) for n in EPOCH_FIELDS], dtype=np.float64), None if isdiffpos is None else str(isdiffpos)


def check_history_length(history: Any, max_items: int) -> None:
    """The general path's bound of a history, as the fast path's reader stops at ``max_items``:
    both paths refuse the same messages (``too_large``)."""
    if isinstance(history, list) and len(history) > max_items:
        raise AlertDecodeError(f"history of {len(history)} entries (limit {max_items})", reason="too_large")


def decode_records(message: bytes) -> tuple[str, list[dict[str, Any]]]:
    """message -> (writer schema version, the records as dicts): fastavro's own container reader
    (any codec, any block layout). The general path reads alerts from these; the trainer reads the
    history's per-epoch fields from them (trainer/stages.py), after ``decode_alerts`` accepted the
    same message."""
    try:
        reader = fastavro.reader(io.BytesIO(message))
        writer_schema: Any = reader.writer_schema
        check_alert_fields(writer_schema)
        version = str(writer_schema.get("version", "unknown"))
        return version, [_as_record(r) for r in reader]
    except AlertDecodeError:
        raise
    except Exception as e:
        raise AlertDecodeError(f"Avro decoding failed: {type(e).__name__}: {e}", reason="truncated") from e


def _decode_full(message: bytes) -> list[Alert]:
    """The slow, general path."""
    version, records = decode_records(message)
    return [alert_from_record(r, version) for r in records]


# ---- the fast path ---------------------------------------------------------------------------


def _kernel_error(err: int, where: str) -> AlertDecodeError:
    reason = "too_large" if err == ERR_TOO_MANY else "truncated"
    return AlertDecodeError(f"{where}: {ERROR_TEXT.get(err, 'bad record')}", reason=reason)


def field_bytes(message: bytes, rows: Rows, col: int) -> bytes | None:
    """A bytes field of the compiled reader's top row (None where null)."""
    n = int(rows.lens[0, col])
    if n < 0:
        return None
    start = int(rows.ints[0, col])
    return message[start : start + n]


def field_text(message: bytes, rows: Rows, col: int) -> str | None:
    """A string field, strictly UTF-8 (as fastavro reads it, so both paths agree)."""
    raw = field_bytes(message, rows, col)
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AlertDecodeError(f"a string field is not UTF-8: {e}", reason="truncated") from e


def _history_from_rows(buf: np.ndarray, items: Rows) -> History:
    n = items.vals.shape[0]
    if n == 0:
        return History.empty()
    v = items.vals
    i = _HISTORY["isdiffpos"]
    present = items.lens[:, i] > 0
    first = np.where(present, buf[np.where(present, items.ints[:, i], 0)], 0)  # 0 where null: unknown in the table
    return History(
        v[:, _HISTORY["jd"]].copy(), v[:, _HISTORY["fid"]].copy(), v[:, _HISTORY["magpsf"]].copy(),
        v[:, _HISTORY["sigmapsf"]].copy(), v[:, _HISTORY["diffmaglim"]].copy(), _SIGN_OF_BYTE[first],
    )  # fmt: skip


def _decode_record(message: bytes, buf: np.ndarray, pos: int, end: int, plan: _SchemaPlan, max_items: int) -> tuple[Alert, int]:
    """One record at ``pos`` by the compiled layout (one kernel call) -> (alert, position after it)."""
    assert plan.layout is not None
    pos, err, top, items = read_record(buf, pos, end, plan.layout, max_items)
    if err:
        reason = "too_large" if err == ERR_TOO_MANY else "truncated"
        raise AlertDecodeError(f"record: {ERROR_TEXT.get(err, 'bad record')}", reason=reason)
    candid: int | None = int(top.ints[0, _CANDID]) if top.lens[0, _CANDID] >= 0 else None
    if candid is None and top.lens[0, _CAND_CANDID] >= 0:
        candid = int(top.ints[0, _CAND_CANDID])
    object_id = field_text(message, top, _OBJECT_ID)
    isdiffpos = field_text(message, top, _ISDIFFPOS)
    alert = _checked(
        candid, object_id, top.vals[0, _FIRST_CANDIDATE:].copy(), plan.version, isdiffpos,
        _history_from_rows(buf, items),
        field_bytes(message, top, _SCIENCE), field_bytes(message, top, _DIFFERENCE),
    )  # fmt: skip
    return alert, pos


def _inflate(codec: str, block: bytes, limit: int) -> bytes:
    """A compressed container block, inflated to at most ``limit`` bytes (AlertDecodeError past it)."""
    too_large = AlertDecodeError(f"{codec} blocks inflate past the message's cap ({limit} bytes left)", reason="too_large")
    try:
        if codec == "deflate":
            d = zlib.decompressobj(-15)
            out = d.decompress(block, limit + 1)
            if len(out) > limit or d.unconsumed_tail:
                raise too_large
            return out
        if codec == "bzip2":
            b = bz2.BZ2Decompressor()
            out = b.decompress(block, limit + 1)
            if len(out) > limit or not b.eof and b.needs_input is False:
                raise too_large
            return out
        if codec == "snappy":  # Avro: raw snappy + big-endian CRC32 of the inflated bytes
            import cramjam

            size, _ = read_long(block, 0)  # snappy's preamble is a plain varint: read it unsigned
            size = ((size << 1) ^ (size >> 63)) & ((1 << 64) - 1)  # undo the zig-zag of read_long
            if size > limit:
                raise too_large
            out = bytes(cramjam.snappy.decompress_raw(block[:-4]))
            if zlib.crc32(out) != int.from_bytes(block[-4:], "big"):
                raise AlertDecodeError("snappy block fails its CRC", reason="truncated")
            return out
    except AlertDecodeError:
        raise
    except Exception as e:
        raise AlertDecodeError(f"{codec} block does not inflate: {type(e).__name__}: {e}", reason="truncated") from e
    raise AlertDecodeError(f"codec {codec!r} is not supported", reason="codec")


def decode_alerts(message: bytes, cache: SchemaCache, fast: bool = True) -> list[Alert]:
    """All alerts in one container (the ZTF stream has exactly one; archive files have many).
    ``fast=False`` forces the general path. Codecs other than null are read only when allowed by
    the limits (``DecodeLimits.allowed_codecs``: deflate by default), the blocks inflated up to
    ``DecodeLimits.max_block_bytes`` in all."""
    limits = cache.limits
    header = read_container_header(message)
    plan = cache.plan(header.schema_json)
    codec = header.codec
    if codec != "null" and (codec not in limits.allowed_codecs or codec not in SUPPORTED_CODECS):
        raise AlertDecodeError(f"container codec {codec!r} is not allowed here", reason="codec")
    alerts: list[Alert] = []
    pos = header.body_offset
    inflate_left = limits.max_block_bytes
    while pos < len(message):
        count, pos = read_long(message, pos)
        size, pos = read_long(message, pos)
        end = pos + size
        if count < 0 or size < 0 or end + SYNC_SIZE > len(message):
            raise AlertDecodeError("block runs past the end of the message", reason="truncated")
        if message[end : end + SYNC_SIZE] != header.sync:
            raise AlertDecodeError("sync marker mismatch", reason="truncated")
        if count > limits.max_array_items:
            raise AlertDecodeError(f"block of {count} records", reason="too_large")
        data, start, stop = message, pos, end
        if codec != "null":
            data = _inflate(codec, message[pos:end], inflate_left)
            inflate_left -= len(data)
            start, stop = 0, len(data)
        alerts += _decode_block(data, start, stop, count, plan, cache, fast)
        pos = end + SYNC_SIZE
    if not alerts:
        raise AlertDecodeError("container holds no record", reason="no_records")
    return alerts


def _decode_block(data: bytes, pos: int, end: int, count: int, plan: _SchemaPlan, cache: SchemaCache, fast: bool) -> list[Alert]:
    """``count`` records from data[pos:end], which they must fill exactly."""
    alerts = []
    if fast and plan.layout is not None:
        buf = np.frombuffer(data, dtype=np.uint8)
        for _ in range(count):
            alert, pos = _decode_record(data, buf, pos, end, plan, cache.limits.max_array_items)
            alerts.append(alert)
        cache.fast_hits += count
    else:
        cache.fast_misses += count
        bio = strict_reader(data, pos)
        for _ in range(count):
            try:
                rec = _as_record(schemaless_reader(bio, plan.writer, plan.reader))
            except AlertDecodeError:
                raise
            except Exception as e:
                raise AlertDecodeError(f"record decoding failed: {type(e).__name__}: {e}", reason="truncated") from e
            check_history_length(rec.get("prv_candidates"), cache.limits.max_array_items)
            alerts.append(alert_from_record(rec, plan.version))
        pos = bio.tell()
    if pos != end:
        raise AlertDecodeError("record length disagrees with its block size", reason="truncated")
    return alerts


def decode_alert(message: bytes, cache: SchemaCache, fast: bool = True) -> Alert:
    """One Kafka message -> one Alert (the ZTF wire form is one record per message)."""
    alerts = decode_alerts(message, cache, fast)
    if len(alerts) != 1:
        raise AlertDecodeError(f"message holds {len(alerts)} alerts, expected 1", reason="not_one_record")
    return alerts[0]


def decode_alert_reference(message: bytes) -> Alert:
    """Reference path for tests and the naive benchmark: fastavro.reader, full decode, no cache."""
    alerts = _decode_full(message)
    if len(alerts) != 1:
        raise AlertDecodeError(f"message holds {len(alerts)} alerts, expected 1", reason="not_one_record")
    return alerts[0]
