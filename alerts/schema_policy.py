"""The writer-schema policy, checked once per distinct schema before any record is decoded (and
before fastavro parses it: a self-referencing record nested 20,000 levels deep crashed the
process inside fastavro's parser).

Rules: size cap; nesting depth cap (measured on the raw bytes, before JSON parsing); no recursive
named types; no references to undefined names; fixed sizes that are ints in 0..2^31 - 1; no
arrays or maps whose items can take zero bytes (a count of 2^62 such items is read in no bytes at
all: a hang); the ZTF fields the service reads present with the expected types. Every official
ZTF schema (1.8 to 4.02) passes these rules (the unit tests run them on one alert of every writer
schema); anything else is judged by the rules alone. All checks are iterative: no input can
exhaust Python's stack.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from fastavro import parse_schema

from alerts.errors import AlertDecodeError
from alerts.limits import DecodeLimits

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
# A fixed type's size is an int in Avro's Java implementation, which reads no larger value.
MAX_FIXED_SIZE = 2**31 - 1


class SchemaPolicyError(AlertDecodeError):
    """A writer schema the service refuses to decode with (reason ``schema_policy``)."""

    reason = "schema_policy"


def json_depth(raw: bytes) -> int:
    """Maximal nesting of [ and { in JSON text (strings skipped), without parsing it."""
    depth = best = 0
    in_string = escaped = False
    for b in raw:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            best = max(best, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return best


def check_raw(schema_json: bytes, limits: DecodeLimits) -> None:
    if len(schema_json) > limits.max_schema_bytes:
        raise SchemaPolicyError(f"writer schema of {len(schema_json)} bytes (limit {limits.max_schema_bytes})")
    depth = json_depth(schema_json)
    if depth > limits.max_schema_depth:
        raise SchemaPolicyError(f"writer schema nested {depth} deep (limit {limits.max_schema_depth})")


class RefusedSchemas:
    """Writer schemas the policy refused, by a key (a hash of the JSON, or a schema id), so that a
    flood of one bad schema costs one check; bounded (the oldest is forgotten)."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._errors: OrderedDict[Hashable, AlertDecodeError] = OrderedDict()

    def check(self, key: Hashable) -> None:
        """Raise the remembered error again (a fresh one of the same type and reason)."""
        e = self._errors.get(key)
        if e is not None:
            raise type(e)(str(e), reason=e.reason)

    def remember(self, key: Hashable, e: AlertDecodeError) -> None:
        self._errors[key] = e
        if len(self._errors) > self.limit:
            self._errors.popitem(last=False)


def checked_schema(
    schema_json: bytes, limits: DecodeLimits, rules: Callable[[Any], None], not_json: str = "not_avro"
) -> tuple[Any, Any]:
    """A writer schema through the policy: the raw checks (size, depth) before parsing, the
    survey's ``rules`` on the JSON, then fastavro's parse -> (the JSON, the parsed schema). Every
    failure is a named AlertDecodeError (``not_json`` for text that is no JSON at all)."""
    check_raw(schema_json, limits)
    try:
        writer_json = json.loads(schema_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AlertDecodeError(f"writer schema is not JSON: {e}", reason=not_json) from e
    try:
        rules(writer_json)
    except SchemaPolicyError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a JSON that is no Avro schema at all
        raise AlertDecodeError(f"writer schema is malformed: {e!r}", reason="unknown_schema") from e
    try:
        writer = parse_schema(writer_json)
    except Exception as e:  # fastavro raises several types for invalid schemas
        raise AlertDecodeError(f"invalid writer schema: {e}", reason="unknown_schema") from e
    return writer_json, writer


def _fullname(t: Mapping[str, Any], namespace: str) -> tuple[str, str]:
    name = str(t.get("name", ""))
    ns = str(t.get("namespace", namespace) or "")
    full = name if "." in name or not ns else f"{ns}.{name}"
    return full, (full.rsplit(".", 1)[0] if "." in full else ns)


def check_structure(schema: Any) -> None:
    """Named types defined before use and never inside themselves; no zero-byte array/map items."""
    defined: dict[str, Mapping[str, Any]] = {}
    # (type, enclosing namespace, names of the records being defined around it)
    stack: list[tuple[Any, str, frozenset[str]]] = [(schema, "", frozenset())]
    arrays: list[tuple[Any, str]] = []
    while stack:
        t, ns, open_names = stack.pop()
        if isinstance(t, str):
            if t in _PRIMITIVES:
                continue
            candidates = {t, f"{ns}.{t}" if ns else t}
            if candidates & open_names:
                raise SchemaPolicyError(f"recursive named type {t!r}")
            if not candidates & set(defined) and t.rsplit(".", 1)[-1] not in {k.rsplit(".", 1)[-1] for k in defined}:
                raise SchemaPolicyError(f"reference to an undefined type {t!r}")
            continue
        if isinstance(t, list):
            stack.extend((b, ns, open_names) for b in reversed(t))  # document order: first branch first
            continue
        if not isinstance(t, Mapping):
            raise SchemaPolicyError(f"not a schema: {type(t).__name__}")
        kind = t.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            full, inner_ns = _fullname(t, ns)
            if full in defined:
                raise SchemaPolicyError(f"type {full!r} defined twice")
            defined[full] = t
            # fastavro takes any fixed size; 2^63 overflowed the compiled layout's int64 tables (an
            # OverflowError past every named error), -1 or 1.5 failed only at decoding.
            if kind == "fixed" and not (type(t.get("size")) is int and 0 <= t["size"] <= MAX_FIXED_SIZE):
                raise SchemaPolicyError(f"fixed {full!r} of size {t.get('size')!r:.40} (0..{MAX_FIXED_SIZE} allowed)")
            if kind in ("record", "error"):
                fields = t.get("fields")
                if not isinstance(fields, list):
                    raise SchemaPolicyError(f"record {full!r} without a field list")
                inside = open_names | {full}
                for f in reversed(fields):  # document order: a name is defined before its uses
                    if not isinstance(f, Mapping) or "type" not in f:
                        raise SchemaPolicyError(f"malformed field in {full!r}")
                    stack.append((f["type"], inner_ns, inside))
            continue
        if kind in ("array", "map"):
            items = t.get("items" if kind == "array" else "values")
            arrays.append((items, ns))
            stack.append((items, ns, open_names))
            continue
        if isinstance(kind, str | list | Mapping):
            stack.append((kind, ns, open_names))
            continue
        raise SchemaPolicyError(f"malformed type {t!r:.80}")
    for items, ns in arrays:
        if _can_be_empty(items, ns, defined):
            raise SchemaPolicyError("an array or map whose items can take zero bytes")


def _resolve(t: Any, ns: str, defined: Mapping[str, Mapping[str, Any]]) -> Any:
    if isinstance(t, str) and t not in _PRIMITIVES:
        for key in (t, f"{ns}.{t}" if ns else t):
            if key in defined:
                return defined[key]
        short = t.rsplit(".", 1)[-1]
        return next((v for k, v in defined.items() if k.rsplit(".", 1)[-1] == short), t)
    return t


def _can_be_empty(t: Any, ns: str, defined: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a value of type t can be encoded in zero bytes (iteratively; records only nest)."""
    stack = [t]
    seen = 0
    while stack:
        seen += 1
        if seen > 100_000:
            return True  # implausibly large: refuse
        cur = _resolve(stack.pop(), ns, defined)
        if cur == "null":
            continue
        if isinstance(cur, str | list):
            return False  # primitives take >= 1 byte except null; a union index takes >= 1 byte
        if isinstance(cur, Mapping):
            kind = cur.get("type")
            if kind == "fixed":
                if int(cur.get("size", 0)) > 0:
                    return False
                continue
            if kind in ("record", "error"):
                stack.extend(f["type"] for f in cur.get("fields", ()) if isinstance(f, Mapping))
                continue
            if kind in ("array", "map", "enum") or kind in _PRIMITIVES - {"null"}:
                return False
            if kind == "null":
                continue
            stack.append(kind)
            continue
        return False
    return True


def field_of(schema: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The field of a record schema with this name, or None."""
    for f in schema.get("fields", ()):
        if isinstance(f, dict) and f.get("name") == name:
            return f
    return None


def record_of(tp: Any) -> dict[str, Any] | None:
    """The record inside a field type (plain or a union with null)."""
    for t in _branches(tp):
        if isinstance(t, dict) and t.get("type") == "record":
            return t
    return None


def check_alert_fields(writer: Any) -> None:
    """The ZTF fields the service reads are there, by name (so Spark-written 'topLevelRecord'
    files read too); anything else is an unknown schema."""
    if not isinstance(writer, dict) or writer.get("type") != "record":
        raise AlertDecodeError("writer schema is not a record", reason="unknown_schema")
    missing = [n for n in ("objectId", "candidate", "cutoutScience", "cutoutDifference") if not field_of(writer, n)]
    cand = field_of(writer, "candidate")
    rec = record_of(cand["type"]) if cand else None
    if rec is None:
        missing.append("candidate(record)")
    else:
        missing += [f"candidate.{n}" for n in ("jd", "fid", "ra", "dec") if not field_of(rec, n)]
    if missing:
        raise AlertDecodeError(f"writer schema lacks ZTF alert fields {missing}", reason="unknown_schema")


def _branches(t: Any) -> list[Any]:
    return t if isinstance(t, list) else [t]


def _type_name(t: Any) -> str:
    if isinstance(t, Mapping):
        return str(t.get("type"))
    return str(t)


def check_ztf_types(schema: Mapping[str, Any]) -> None:
    """The fields the service reads, with their types: objectId string, candid long (or int),
    candidate a record whose jd/ra/dec are doubles (or floats) and fid an int."""

    def types(t: Any) -> set[str]:
        return {_type_name(b) for b in _branches(t)} - {"null"}

    top = {f.get("name"): f.get("type") for f in schema.get("fields", ()) if isinstance(f, Mapping)}
    if not types(top.get("objectId")) <= {"string"}:
        raise SchemaPolicyError("objectId is not a string")
    if "candid" in top and not types(top["candid"]) <= {"long", "int"}:
        raise SchemaPolicyError("candid is not an integer")
    cand = field_of(schema, "candidate")
    rec = record_of(cand["type"]) if cand else None
    if rec is None:
        return  # reported as a missing field by the decoder
    cfields = {f.get("name"): f.get("type") for f in rec.get("fields", ()) if isinstance(f, Mapping)}
    for name in ("jd", "ra", "dec"):
        if name in cfields and not types(cfields[name]) <= {"double", "float"}:
            raise SchemaPolicyError(f"candidate.{name} is not a number")
    if "fid" in cfields and not types(cfields["fid"]) <= {"int", "long"}:
        raise SchemaPolicyError("candidate.fid is not an integer")
    if "candid" in cfields and not types(cfields["candid"]) <= {"long", "int"}:
        raise SchemaPolicyError("candidate.candid is not an integer")
