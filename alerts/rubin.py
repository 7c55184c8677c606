"""bytes -> RubinAlert: one Rubin/LSST wire message (``0x00`` + schema id + schemaless Avro body,
``rubin_schemas.py``) to the allowlisted fields (allowlist.py), the history and the two cutouts.

Two paths that give equal alerts (tests compare them on every real alert of ../shared/rubin and on
generated 11.x alerts):

* **fast** (a schema with a layout, ``layout.py``): the same compiled flat reader as ZTF's
  (``flat_reader.py``), keeping only the allowlisted columns, bounded by ``max_array_items``.
  Why: a real Rubin alert carries hundreds of history entries of ~100 fields (``prvDiaSources``
  and ``prvDiaForcedSources``); fastavro reads one of ../shared/rubin in ~3 ms.
* **general** (schemas without a layout): fastavro's schemaless reader.

The writer schema is not in the message: ``RubinSchemaCache`` gets it by id from a lookup the
caller injects (the consumer: schema registry, then the packaged schemas; everyone else: the
packaged schemas), checks it by the same schema policy as ZTF's and compiles it once. Pure given
the cache: no I/O here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastavro import schemaless_reader

from alerts.alert import ArrayColumns, FieldsEqual, count_or_none, finite_or_none
from alerts.allowlist import RUBIN_HISTORY_FIELDS, RUBIN_OBJECT_FIELDS, RUBIN_SOURCE_FIELDS
from alerts.decoder import check_history_length, field_bytes, field_text
from alerts.errors import AlertDecodeError
from alerts.flat_reader import ERR_TOO_MANY, ERROR_TEXT, PackedLayout, Rows, read_record
from alerts.layout import compile_layout
from alerts.limits import DecodeLimits
from alerts.rubin_schemas import HEADER_SIZE, packaged_schema, version_of, wire_schema_id
from alerts.schema_policy import (
    RefusedSchemas,
    SchemaPolicyError,
    check_structure,
    checked_schema,
    field_of,
    record_of,
)
from alerts.strict_reader import strict_reader

SURVEY = "lsst"
BANDS = "ugrizy"  # band code = index + 1 (u=1 ... y=6); 0: unknown
_SOURCE_INDEX = {n: i for i, n in enumerate(RUBIN_SOURCE_FIELDS)}
_OBJECT_INDEX = {n: i for i, n in enumerate(RUBIN_OBJECT_FIELDS)}
_TOP_COLUMNS = (
    "diaSourceId", "diaSource.diaObjectId", "diaSource.band", "cutoutScience", "cutoutDifference",
    *(f"diaSource.{n}" for n in RUBIN_SOURCE_FIELDS), *(f"diaObject.{n}" for n in RUBIN_OBJECT_FIELDS),
)  # fmt: skip
_SOURCE_ID, _OBJECT_ID, _BAND, _SCIENCE, _DIFFERENCE, _FIRST_SOURCE = range(6)
_FIRST_OBJECT = _FIRST_SOURCE + len(RUBIN_SOURCE_FIELDS)
_HISTORY = {n: i for i, n in enumerate(RUBIN_HISTORY_FIELDS)}
_REQUIRED_SOURCE = ("diaSourceId", "midpointMjdTai", "ra", "dec", "band")


_BAND_OF_BYTE = np.zeros(256, np.int8)  # first byte of a one-letter band -> its code
for _k, _b in enumerate(BANDS):
    _BAND_OF_BYTE[ord(_b)] = _k + 1


def band_code(band: str | None) -> int:
    return BANDS.index(band) + 1 if band is not None and len(band) == 1 and band in BANDS else 0


@dataclass(frozen=True, slots=True, eq=False)
class RubinHistory(ArrayColumns):
    """``prvDiaSources``, one row per entry in the packet's order (earlier detections; flux in nJy)."""

    mjd: np.ndarray  # float64
    band: np.ndarray  # int8 band code (0: unknown)
    flux: np.ndarray  # psfFlux, float64, NaN where null
    flux_err: np.ndarray

    @staticmethod
    def empty() -> RubinHistory:
        z = np.zeros(0)
        return RubinHistory(z, np.zeros(0, np.int8), z, z)


@dataclass(frozen=True, slots=True, eq=False)
class RubinAlert(FieldsEqual):
    """One Rubin alert as the service uses it. ``source`` holds ``RUBIN_SOURCE_FIELDS`` of the
    diaSource in that order (float64, NaN where null; booleans 0/1), ``obj`` the
    ``RUBIN_OBJECT_FIELDS`` of the diaObject (NaN without one). Cutouts stay as the packet's
    uncompressed FITS bytes. ``candid``/``object_id``/``jd``/``fid``/``ra``/``dec`` answer like a
    ZTF alert's, so results and sinks treat both alike."""

    dia_source_id: int
    dia_object_id: int | None  # None: no diaObject (null or 0 in the packet: e.g. a solar-system source)
    schema_version: str
    source: np.ndarray
    obj: np.ndarray
    band: str
    history: RubinHistory
    science: bytes | None
    difference: bytes | None

    survey = SURVEY

    def value(self, name: str) -> float:
        return float(self.source[_SOURCE_INDEX[name]])

    @property
    def candid(self) -> int:
        return self.dia_source_id

    @property
    def object_id(self) -> str:
        return "" if self.dia_object_id is None else str(self.dia_object_id)

    @property
    def mjd(self) -> float:
        return self.value("midpointMjdTai")

    @property
    def jd(self) -> float:
        return self.mjd + 2_400_000.5

    @property
    def fid(self) -> int:
        return band_code(self.band)

    @property
    def ra(self) -> float:
        return self.value("ra")

    @property
    def dec(self) -> float:
        return self.value("dec")

    @property
    def ndethist(self) -> int | None:
        """ZTF's name for it: the diaObject's ``nDiaSources`` (None without a diaObject)."""
        return count_or_none(float(self.obj[_OBJECT_INDEX["nDiaSources"]]))

    @property
    def jdstarthist(self) -> float | None:
        """The diaObject's ``firstDiaSourceMjdTai`` as a Julian date, like ZTF's ``jdstarthist``."""
        mjd = finite_or_none(float(self.obj[_OBJECT_INDEX["firstDiaSourceMjdTai"]]))
        return None if mjd is None else mjd + 2_400_000.5


# ---- schemas ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RubinPlan:
    writer: Any  # parsed writer schema (general path)
    version: str
    layout: PackedLayout | None
    schema_json: bytes  # what it was compiled from (the daemon hands it to its decode workers)


def check_rubin_fields(writer: Any) -> None:
    """The fields the service reads, present with a usable shape: a top-level record with
    ``diaSourceId`` and a ``diaSource`` record holding the required fields."""
    if not isinstance(writer, dict) or writer.get("type") != "record" or not isinstance(writer.get("fields"), list):
        raise SchemaPolicyError("writer schema is not a record")
    source = field_of(writer, "diaSource")
    rec = record_of(source["type"]) if source else None
    if field_of(writer, "diaSourceId") is None or rec is None:
        raise SchemaPolicyError("writer schema lacks diaSourceId or the diaSource record")
    missing = [n for n in _REQUIRED_SOURCE if field_of(rec, n) is None]
    if missing:
        raise SchemaPolicyError(f"diaSource lacks {missing}")


def _rubin_rules(writer: Any) -> None:
    check_rubin_fields(writer)
    check_structure(writer)


def compile_rubin(schema_json: bytes, schema_id: int, limits: DecodeLimits) -> RubinPlan:
    """The schema policy as for ZTF (schema_policy.py), then fastavro's parse and our layout."""
    writer_json, writer = checked_schema(schema_json, limits, _rubin_rules, not_json="unknown_schema")
    layout = compile_layout(writer_json, _TOP_COLUMNS, "prvDiaSources", RUBIN_HISTORY_FIELDS)
    return RubinPlan(writer, version_of(schema_id), layout, schema_json)


SchemaLookup = Callable[[int], bytes | None]


class RubinSchemaCache:
    """Compiled Rubin schemas by id, from ``lookup`` (id -> schema JSON bytes, or None when it has
    none; default: the packaged schemas of lsst-alert-packet). Bounded in entries; a schema refused
    by the policy is remembered (bounded too), so a flood of one bad id costs one check. An id the
    lookup does not know is asked again next time: the lookup bounds its own retries
    (consumer/schema_registry.py)."""

    def __init__(self, limits: DecodeLimits | None = None, lookup: SchemaLookup | None = None) -> None:
        self.limits = limits or DecodeLimits()
        self.lookup: SchemaLookup = lookup or packaged_schema
        self._plans: OrderedDict[int, RubinPlan] = OrderedDict()
        self._refused = RefusedSchemas()
        self.misses = 0

    def plan(self, schema_id: int) -> RubinPlan:
        plan = self._plans.get(schema_id)
        if plan is not None:
            return plan
        self._refused.check(schema_id)
        self.misses += 1
        schema_json = self.lookup(schema_id)
        if schema_json is None:  # not remembered: the lookup may know it later (a registry back up)
            raise AlertDecodeError(f"no schema for id {schema_id}", reason="unknown_schema")
        try:
            plan = compile_rubin(schema_json, schema_id, self.limits)
        except AlertDecodeError as e:
            self._refused.remember(schema_id, e)
            raise
        self._plans[schema_id] = plan
        while len(self._plans) > self.limits.max_schema_cache_entries:
            self._plans.popitem(last=False)
        return plan


# ---- decoding --------------------------------------------------------------------------------


def _num(v: Any) -> float:
    return np.nan if v is None else float(v)


def _checked(
    source_id: Any, object_id: Any, band: Any, source: np.ndarray, obj: np.ndarray, version: str,
    history: RubinHistory, science: bytes | None, difference: bytes | None,
) -> RubinAlert:
    """The value checks both paths share (as ZTF's: a non-finite time or an odd id would pin or
    break a sink entry)."""
    if source_id is None:
        raise AlertDecodeError("record lacks diaSourceId", reason="missing_field")
    source_id = int(source_id)
    if band is None:
        raise AlertDecodeError("diaSource.band is null", reason="missing_field", candid=source_id)
    # Rubin writes diaObjectId 0 for a source without an object (a solar-system source)
    alert = RubinAlert(source_id, int(object_id) or None if object_id is not None else None, version, source, obj,
                       str(band), history, science, difference)  # fmt: skip
    mjd, ra, dec = alert.mjd, alert.ra, alert.dec
    problems = []
    if not (source_id > 0 and (alert.dia_object_id is None or alert.dia_object_id > 0)):
        problems.append(f"diaSourceId {source_id} / diaObjectId {alert.dia_object_id}")
    if not (math.isfinite(mjd) and 40_000.0 < mjd < 100_000.0):
        problems.append(f"midpointMjdTai {mjd}")
    if not band_code(alert.band):
        problems.append(f"band {alert.band[:8]!r}")
    if not (0.0 <= ra <= 360.0 and -90.0 <= dec <= 90.0):
        problems.append(f"ra/dec {ra}/{dec}")
    if problems:
        raise AlertDecodeError("values out of range: " + ", ".join(problems), reason="bad_value", candid=source_id)
    return alert


def _history_from_list(prv: Any) -> RubinHistory:
    if not prv:
        return RubinHistory.empty()
    return RubinHistory(
        np.array([_num(e.get("midpointMjdTai")) for e in prv], dtype=np.float64),
        np.array([band_code(e.get("band")) for e in prv], dtype=np.int8),
        np.array([_num(e.get("psfFlux")) for e in prv], dtype=np.float64),
        np.array([_num(e.get("psfFluxErr")) for e in prv], dtype=np.float64),
    )


def rubin_alert_from_record(rec: dict[str, Any], version: str) -> RubinAlert:
    """Decoded Avro record (dict) -> RubinAlert (the general path)."""
    src = rec.get("diaSource")
    if not isinstance(src, dict):
        raise AlertDecodeError("record has no diaSource", reason="missing_field")
    found = rec.get("diaObject")
    obj: dict[str, Any] = found if isinstance(found, dict) else {}
    source = np.array([_num(src.get(n)) for n in RUBIN_SOURCE_FIELDS], dtype=np.float64)
    objv = np.array([_num(obj.get(n)) for n in RUBIN_OBJECT_FIELDS], dtype=np.float64)
    sci, dif = rec.get("cutoutScience"), rec.get("cutoutDifference")
    return _checked(
        rec.get("diaSourceId"), src.get("diaObjectId"), src.get("band"), source, objv, version,
        _history_from_list(rec.get("prvDiaSources")),
        None if sci is None else bytes(sci), None if dif is None else bytes(dif),
    )  # fmt: skip


def _history_from_rows(buf: np.ndarray, items: Rows) -> RubinHistory:
    n = items.vals.shape[0]
    if n == 0:
        return RubinHistory.empty()
    i = _HISTORY["band"]
    one = items.lens[:, i] == 1  # a band is one letter; anything else is unknown (0)
    first = np.where(one, buf[np.where(one, items.ints[:, i], 0)], 0)
    v = items.vals
    return RubinHistory(
        v[:, _HISTORY["midpointMjdTai"]].copy(), np.where(one, _BAND_OF_BYTE[first], 0).astype(np.int8),
        v[:, _HISTORY["psfFlux"]].copy(), v[:, _HISTORY["psfFluxErr"]].copy(),
    )  # fmt: skip


def _decode_fast(message: bytes, plan: RubinPlan, max_items: int) -> RubinAlert:
    assert plan.layout is not None
    buf = np.frombuffer(message, dtype=np.uint8)
    pos, err, top, items = read_record(buf, HEADER_SIZE, len(message), plan.layout, max_items)
    if err:
        reason = "too_large" if err == ERR_TOO_MANY else "truncated"
        raise AlertDecodeError(f"record: {ERROR_TEXT.get(err, 'bad record')}", reason=reason)
    if pos != len(message):
        raise AlertDecodeError("bytes after the record", reason="truncated")
    source_id = int(top.ints[0, _SOURCE_ID]) if top.lens[0, _SOURCE_ID] >= 0 else None
    object_id = int(top.ints[0, _OBJECT_ID]) if top.lens[0, _OBJECT_ID] >= 0 else None
    band = field_text(message, top, _BAND)
    return _checked(
        source_id, object_id, band, top.vals[0, _FIRST_SOURCE:_FIRST_OBJECT].copy(), top.vals[0, _FIRST_OBJECT:].copy(),
        plan.version, _history_from_rows(buf, items), field_bytes(message, top, _SCIENCE), field_bytes(message, top, _DIFFERENCE),
    )  # fmt: skip


def _decode_general(message: bytes, plan: RubinPlan, max_items: int) -> RubinAlert:
    bio = strict_reader(message, HEADER_SIZE)
    try:
        rec = schemaless_reader(bio, plan.writer, None)
    except Exception as e:
        raise AlertDecodeError(f"record decoding failed: {type(e).__name__}: {e}", reason="truncated") from e
    if bio.tell() != len(message):
        raise AlertDecodeError("bytes after the record", reason="truncated")
    if not isinstance(rec, dict):
        raise AlertDecodeError("the decoded datum is not a record", reason="unknown_schema")
    check_history_length(rec.get("prvDiaSources"), max_items)
    return rubin_alert_from_record(rec, plan.version)


def decode_rubin(message: bytes, cache: RubinSchemaCache, fast: bool = True) -> RubinAlert:
    """One Rubin wire message -> RubinAlert; AlertDecodeError (named reason) on bad input."""
    plan = cache.plan(wire_schema_id(message))
    if fast and plan.layout is not None:
        return _decode_fast(message, plan, cache.limits.max_array_items)
    return _decode_general(message, plan, cache.limits.max_array_items)
