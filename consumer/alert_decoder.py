"""bytes -> Alert: one Kafka message (an Avro object container file with its writer schema) to the
few fields the service needs.

Why not ``fastavro.reader`` per message: it parses the ~23 KB writer schema of every message
(~240 us) and decodes every field, ``prv_candidates`` included (~8-20 us per history entry, and
alerts carry up to hundreds). Here the container header is read by hand, each distinct writer
schema is parsed once (``SchemaCache``), and the record is read in two parts:

* the *prefix* (objectId, candid, candidate) with fastavro and a writer schema cut after
  ``candidate`` (Avro has no framing, so reading a prefix with the prefix of the schema is exact),
  projected to the few candidate fields we use;
* the *tail*: the last three fields are always the science, template and difference cutouts. The
  history in between is not parsed: the science stamp is found by its gzip magic, the cutout
  record around it is re-read forward, and the chain of three cutouts must end exactly at the end
  of the record; gunzip later checks each stamp's CRC32. Its cost does not grow with the history.

Anything unexpected (another field layout, a codec other than null, a chain that does not close,
a stamp that does not gunzip) goes to the general path, a projected fastavro read of the whole
record, so the fast path never changes what is decoded, only how fast (tests compare both on every
real alert).
"""

from __future__ import annotations

import copy
import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro import parse_schema, schemaless_reader

from consumer.errors import AlertDecodeError

MAGIC = b"Obj\x01"
SYNC_SIZE = 16

# Top-level fields kept by the projection; cutoutTemplate is not read (the model uses science and
# difference only). candidate sub-fields: what the output record and cutout padding need. Never
# ssdistnr/drb/rb: those fields made the asteroid/bogus labels (see docs/model.md, label leakage).
_TOP_FIELDS = ("objectId", "candid", "candidate", "cutoutScience", "cutoutDifference")
_CANDIDATE_FIELDS = ("jd", "fid", "candid", "ra", "dec", "xpos", "ypos", "magpsf", "sigmapsf", "isdiffpos")


@dataclass(frozen=True, slots=True)
class Alert:
    """The decoded part of one ZTF alert. Cutouts stay as the gzipped FITS bytes of the packet."""

    candid: int
    object_id: str
    jd: float
    fid: int
    ra: float
    dec: float
    xpos: float | None
    ypos: float | None
    magpsf: float | None
    isdiffpos: str | None
    schema_version: str
    science: bytes | None
    difference: bytes | None


@dataclass(frozen=True, slots=True)
class _SchemaPlan:
    writer: Any  # parsed writer schema
    reader: Any  # parsed projected reader schema, or None when no projection was possible
    version: str
    # fast path (None when the layout does not allow it): prefix schemas and, for each of the three
    # trailing cutout fields, (branch index of the cutout record or None if not a union, null branch)
    prefix_writer: Any = None
    prefix_reader: Any = None
    tail: tuple[tuple[int | None, int | None], ...] | None = None


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Avro zig-zag varint. Hand-written: it runs a handful of times per message on the header."""
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


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_long(buf, pos)
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
        count, pos = _read_long(buf, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _read_long(buf, pos)  # block size in bytes, unused
        if count > 1024:
            raise AlertDecodeError("implausible metadata map", reason="not_avro")
        for _ in range(count):
            key, pos = _read_bytes(buf, pos)
            value, pos = _read_bytes(buf, pos)
            meta[key] = value
    if pos + SYNC_SIZE > len(buf):
        raise AlertDecodeError("container header truncated", reason="truncated")
    schema = meta.get(b"avro.schema")
    if not schema:
        raise AlertDecodeError("container has no avro.schema", reason="not_avro")
    codec = meta.get(b"avro.codec", b"null").decode("ascii", "replace")
    return ContainerHeader(schema, codec, buf[pos : pos + SYNC_SIZE], pos + SYNC_SIZE)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    for f in schema.get("fields", ()):
        if f.get("name") == name:
            return f
    return None


def _record_type(tp: Any) -> dict[str, Any] | None:
    """The record inside a field type (plain or a union with null)."""
    if isinstance(tp, dict) and tp.get("type") == "record":
        return tp
    if isinstance(tp, list):
        for t in tp:
            if isinstance(t, dict) and t.get("type") == "record":
                return t
    return None


def _projection(writer: dict[str, Any]) -> dict[str, Any]:
    reader = copy.deepcopy(writer)
    reader["fields"] = [f for f in reader["fields"] if f["name"] in _TOP_FIELDS]
    cand = _field(reader, "candidate")
    rec = _record_type(cand["type"]) if cand else None
    if rec is not None:
        rec["fields"] = [f for f in rec["fields"] if f["name"] in _CANDIDATE_FIELDS]
    return reader


_CUTOUT_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def _branches(tp: Any) -> tuple[int | None, int | None] | None:
    """(record branch, null branch) of a cutout field type; None if it is neither record nor union."""
    if not isinstance(tp, list):
        return (None, None) if tp != "null" else None
    rec = [i for i, t in enumerate(tp) if t != "null"]
    nul = [i for i, t in enumerate(tp) if t == "null"]
    if len(rec) != 1 or len(tp) > 2 or rec[0] > 60:
        return None
    return rec[0], (nul[0] if nul else None)


def _fast_layout(writer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]] | None:
    """Prefix writer/reader schemas and the cutout tail layout, when the record ends with the three
    cutouts and every field we read comes before anything we skip."""
    names = [f["name"] for f in writer["fields"]]
    if tuple(names[-3:]) != _CUTOUT_FIELDS or "candidate" not in names:
        return None
    cut = names.index("candidate") + 1
    prefix = dict(writer)
    prefix["fields"] = [dict(f) for f in writer["fields"][:cut]]
    cand = prefix["fields"][-1]
    if isinstance(cand["type"], dict) and cand["type"].get("type") == "record":
        # Stop reading inside candidate after the last field we use: the rest of the record (~90
        # fields) need not be parsed either, since the tail search does not need to know where
        # the candidate ends.
        cfields = cand["type"]["fields"]
        last = max(i for i, f in enumerate(cfields) if f["name"] in _CANDIDATE_FIELDS)
        cand["type"] = dict(cand["type"], fields=cfields[: last + 1])
    if "objectId" not in names[:cut]:
        return None
    tail = tuple(_branches(f["type"]) for f in writer["fields"][-3:])
    if any(t is None for t in tail):
        return None
    return prefix, _projection(prefix), tail


def _check_alert_schema(writer: Any) -> None:
    """Any record schema with the ZTF fields we read is accepted (by name, so Spark-written
    'topLevelRecord' files read too); anything else is an unknown schema."""
    if not isinstance(writer, dict) or writer.get("type") != "record":
        raise AlertDecodeError("writer schema is not a record", reason="unknown_schema")
    missing = [n for n in ("objectId", "candidate", "cutoutScience", "cutoutDifference") if not _field(writer, n)]
    cand = _field(writer, "candidate")
    rec = _record_type(cand["type"]) if cand else None
    if rec is None:
        missing.append("candidate(record)")
    else:
        missing += [f"candidate.{n}" for n in ("jd", "fid", "ra", "dec") if not _field(rec, n)]
    if missing:
        raise AlertDecodeError(f"writer schema lacks ZTF alert fields {missing}", reason="unknown_schema")


class SchemaCache:
    """Parsed writer schemas by their exact JSON bytes (a stream carries a handful). Bounded, so a
    stream of garbage with ever-new schemas cannot grow memory without end."""

    def __init__(self, max_entries: int = 64) -> None:
        self._plans: OrderedDict[bytes, _SchemaPlan] = OrderedDict()
        self._max = max_entries
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
        self.misses += 1
        try:
            writer_json = json.loads(schema_json)
        except (ValueError, UnicodeDecodeError) as e:
            raise AlertDecodeError(f"writer schema is not JSON: {e}", reason="not_avro") from e
        try:
            _check_alert_schema(writer_json)
        except (KeyError, TypeError, AttributeError) as e:  # a JSON that is no Avro schema at all
            raise AlertDecodeError(f"writer schema is malformed: {e!r}", reason="unknown_schema") from e
        try:
            writer = parse_schema(writer_json)
        except Exception as e:  # fastavro raises several types for invalid schemas
            raise AlertDecodeError(f"invalid writer schema: {e}", reason="unknown_schema") from e
        try:
            reader = parse_schema(_projection(writer_json))
        except Exception:
            reader = None  # named-type references broke by the projection: decode everything
        version = str(writer_json.get("version") or writer_json.get("doc", "")[:16] or "unknown")
        fast = None
        try:
            layout = _fast_layout(writer_json)
            if layout is not None:
                fast = (parse_schema(layout[0]), parse_schema(layout[1]), layout[2])
        except Exception:
            fast = None
        plan = _SchemaPlan(writer, reader, version, *(fast or (None, None, None)))
        self._plans[schema_json] = plan
        self._last = (schema_json, plan)
        if len(self._plans) > self._max:
            self._plans.popitem(last=False)
        return plan


def _stamp(cutout: Any) -> bytes | None:
    if cutout is None:
        return None
    if isinstance(cutout, dict):
        data = cutout.get("stampData")
        return bytes(data) if data is not None else None
    return None


def alert_from_record(rec: dict[str, Any], schema_version: str) -> Alert:
    """Decoded Avro record (dict) -> Alert. Shared by the fast and the fallback path."""
    cand = rec.get("candidate")
    if not isinstance(cand, dict):
        raise AlertDecodeError("record has no candidate", reason="missing_field")
    candid = rec.get("candid")
    if candid is None:
        candid = cand.get("candid")
    object_id = rec.get("objectId")
    if candid is None or not object_id:
        raise AlertDecodeError("record lacks candid or objectId", reason="missing_field", candid=candid)
    for name in ("jd", "fid", "ra", "dec"):
        if cand.get(name) is None:
            raise AlertDecodeError(f"candidate.{name} is null", reason="missing_field", candid=candid)
    return Alert(
        candid=int(candid),
        object_id=str(object_id),
        jd=float(cand["jd"]),
        fid=int(cand["fid"]),
        ra=float(cand["ra"]),
        dec=float(cand["dec"]),
        xpos=cand.get("xpos"),
        ypos=cand.get("ypos"),
        magpsf=cand.get("magpsf"),
        isdiffpos=cand.get("isdiffpos"),
        schema_version=schema_version,
        science=_stamp(rec.get("cutoutScience")),
        difference=_stamp(rec.get("cutoutDifference")),
    )


def _decode_full(message: bytes) -> list[Alert]:
    """The slow, general path: fastavro's own container reader (any codec, any block layout)."""
    try:
        reader = fastavro.reader(io.BytesIO(message))
        version = str(reader.writer_schema.get("version", "unknown"))
        _check_alert_schema(reader.writer_schema)
        records = list(reader)
    except AlertDecodeError:
        raise
    except Exception as e:
        raise AlertDecodeError(f"Avro decoding failed: {type(e).__name__}: {e}", reason="truncated") from e
    return [alert_from_record(r, version) for r in records]


_GZIP_MAGIC = b"\x1f\x8b\x08"
_MAX_TAIL_TRIES = 16
_VLEN_ORDER = {1: (1, 2, 3), 2: (2, 1, 3), 3: (3, 1, 2)}


def _cutout_at(buf: bytes, pos: int, end: int, layout: tuple[int | None, int | None]) -> tuple[bytes | None, int]:
    """Read one cutout field forward (union branch, fileName, stampData); ValueError if it does not fit."""
    branch, null_branch = layout
    if branch is not None:
        idx, pos = _read_long(buf, pos)
        if idx == null_branch:
            return None, pos
        if idx != branch:
            raise ValueError("union branch")
    n, pos = _read_long(buf, pos)
    if n < 0 or pos + n > end:
        raise ValueError("fileName")
    pos += n
    m, pos = _read_long(buf, pos)
    if m < 0 or pos + m > end:
        raise ValueError("stampData")
    return buf[pos : pos + m], pos + m


def _plausible_gzip_fits(stamp: bytes | None) -> bool:
    """gzip magic, and an ISIZE trailer that is a whole number of 2880-byte FITS blocks."""
    if stamp is None or len(stamp) < 18 or stamp[:3] != _GZIP_MAGIC:
        return False
    isize = int.from_bytes(stamp[-4:], "little")
    return isize > 0 and isize % 2880 == 0


def _tail_chain(buf: bytes, start: int, end: int, tail: tuple[Any, ...]) -> tuple[bytes, bytes] | None:
    """Science and difference stamps if the three cutout fields parse from ``start`` to exactly ``end``."""
    try:
        sci, pos = _cutout_at(buf, start, end, tail[0])
        _tmpl, pos = _cutout_at(buf, pos, end, tail[1])
        dif, pos = _cutout_at(buf, pos, end, tail[2])
    except (ValueError, AlertDecodeError):
        return None
    if pos != end or not _plausible_gzip_fits(sci) or not _plausible_gzip_fits(dif):
        return None
    return sci, dif  # type: ignore[return-value]


def _find_tail(buf: bytes, lo: int, end: int, tail: tuple[Any, ...]) -> tuple[bytes, bytes] | None:
    """Locate the cutout fields without parsing the history before them. Hand-written, since this
    is the hot path: a memchr-speed search for the science stamp's gzip magic, then the record
    around it is read backwards (stampData length, fileName and its length, union branch) and
    checked forwards to the exact end of the record."""
    sci_branch = tail[0][0]
    h = buf.find(_GZIP_MAGIC, lo, end)
    tries = 0
    while h != -1 and tries < _MAX_TAIL_TRIES:
        tries += 1
        # The varint of the stamp length (stamps are < 2 MB) ends at h: its last byte is < 0x80
        # and the bytes before it with the high bit set continue it; since the fileName before it
        # is ASCII, that length is tried first (the others stay, for a non-ASCII fileName).
        natural = 1
        while natural < 3 and h - natural - 1 >= lo and buf[h - natural - 1] >= 0x80:
            natural += 1
        for vlen in _VLEN_ORDER[natural]:
            q = h - vlen
            if q <= lo:
                break
            try:
                length, after = _read_long(buf, q)
            except AlertDecodeError:
                continue
            if after != h or length < 18 or h + length > end:
                continue
            for n in range(min(q - lo, 256)):  # length of fileName, whose bytes end at q
                s1 = q - n - 1
                two = 2 * n
                if n < 64:
                    if buf[s1] != two:
                        continue
                    fstart = s1
                else:
                    if s1 - 1 < lo or buf[s1 - 1] != (two & 0x7F) | 0x80 or buf[s1] != two >> 7:
                        continue
                    fstart = s1 - 1
                if sci_branch is not None:
                    fstart -= 1
                    if fstart < lo or buf[fstart] != 2 * sci_branch:
                        continue
                found = _tail_chain(buf, fstart, end, tail)
                if found is not None:
                    return found
        h = buf.find(_GZIP_MAGIC, h + 1, end)
    return None


def _decode_fast(message: bytes, buf: io.BytesIO, pos: int, end: int, plan: _SchemaPlan) -> Alert | None:
    buf.seek(pos)
    try:
        rec = schemaless_reader(buf, plan.prefix_writer, plan.prefix_reader)
    except Exception:
        return None
    stamps = _find_tail(message, buf.tell(), end, plan.tail)  # type: ignore[arg-type]
    if stamps is None:
        return None
    rec["cutoutScience"] = {"stampData": stamps[0]}
    rec["cutoutDifference"] = {"stampData": stamps[1]}
    try:
        return alert_from_record(rec, plan.version)
    except AlertDecodeError:
        return None


def decode_alerts(message: bytes, cache: SchemaCache, fast: bool = True) -> list[Alert]:
    """All alerts in one container (the ZTF stream has exactly one; archive files have many).
    ``fast=False`` forces the general path (used when a fast-path stamp fails to gunzip)."""
    header = read_container_header(message)
    plan = cache.plan(header.schema_json)
    if header.codec != "null":
        return _decode_full(message)
    alerts: list[Alert] = []
    pos = header.body_offset
    buf = io.BytesIO(message)
    while pos < len(message):
        count, pos = _read_long(message, pos)
        size, pos = _read_long(message, pos)
        end = pos + size
        if count < 0 or size < 0 or end + SYNC_SIZE > len(message):
            raise AlertDecodeError("block runs past the end of the message", reason="truncated")
        if message[end : end + SYNC_SIZE] != header.sync:
            raise AlertDecodeError("sync marker mismatch", reason="truncated")
        if count == 1 and fast and plan.tail is not None:
            alert = _decode_fast(message, buf, pos, end, plan)
            if alert is not None:
                cache.fast_hits += 1
                alerts.append(alert)
                pos = end + SYNC_SIZE
                continue
            cache.fast_misses += 1
        buf.seek(pos)
        for _ in range(count):
            try:
                rec = schemaless_reader(buf, plan.writer, plan.reader)
            except Exception as e:
                raise AlertDecodeError(
                    f"record decoding failed: {type(e).__name__}: {e}", reason="truncated"
                ) from e
            alerts.append(alert_from_record(rec, plan.version))
        if buf.tell() != end:
            raise AlertDecodeError("record length disagrees with its block size", reason="truncated")
        pos = end + SYNC_SIZE
    if not alerts:
        raise AlertDecodeError("container holds no record", reason="no_records")
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

