"""Rubin's wire form and its schemas: ``0x00``, a big-endian int32 schema id, then the schemaless
Avro body (Rubin's alert production code; Confluent's framing). The id is major·100 + minor
(9.0 -> 900, 10.0 -> 1000, 11.0 -> 1100); the registry subject ``lsst-alerts-v{major}.{minor}-value``
(or ``-v{major}`` from 11 on) is the broker's business, the id is ours.

The schemas ship in the ``lsst-alert-packet`` package on PyPI (every version 3.0–11.1), one file per
record type (``lsst.v9_0.alert.avsc`` refers to ``lsst.v9_0.diaSource`` by name). We read the files
only, never import its Python code (installed with ``--no-deps``: its dependencies are a database
toolkit we do not need), and inline the named types into one schema, as a registry serves it.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

from alerts.errors import AlertDecodeError

WIRE_MAGIC = 0x00
HEADER_SIZE = 5
MAX_SCHEMA_ID = 100_000  # a version below 1000.0: anything larger is not a Rubin id


def wire_schema_id(message: bytes) -> int:
    """The schema id of a Rubin wire message (AlertDecodeError if it is not one)."""
    if len(message) <= HEADER_SIZE or message[0] != WIRE_MAGIC:
        raise AlertDecodeError("not a schema-registry framed message (0x00 + schema id)", reason="bad_framing")
    schema_id = int.from_bytes(message[1:HEADER_SIZE], "big", signed=True)
    if not 0 < schema_id < MAX_SCHEMA_ID:
        raise AlertDecodeError(f"schema id {schema_id} out of range", reason="unknown_schema")
    return schema_id


def version_of(schema_id: int) -> str:
    """900 -> '9.0', 1100 -> '11.0'."""
    major, minor = divmod(schema_id, 100)
    return f"{major}.{minor}"


def _package_dir() -> Path | None:
    """The schema folder of lsst-alert-packet, found without importing the package."""
    try:
        spec = importlib.util.find_spec("lsst.alert.packet")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "schema"
    return path if path.is_dir() else None


def _inline(node: Any, folder: Path, prefix: str, seen: set[str], depth: int = 0) -> Any:
    """Replace each first reference to a named type defined in its own file by that file's
    schema (Avro: a name is defined once, later references stay names)."""
    if depth > 32:
        raise ValueError("schema files nest too deep")
    if isinstance(node, str):
        if node.startswith(prefix + ".") and node not in seen:
            path = folder / f"{node}.avsc"
            if path.is_file():
                seen.add(node)
                return _inline(json.loads(path.read_text()), folder, prefix, seen, depth + 1)
        return node
    if isinstance(node, list):
        return [_inline(n, folder, prefix, seen, depth + 1) for n in node]
    if isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            ns = node.get("namespace", prefix)
            seen.add(f"{ns}.{node['name']}" if "." not in node["name"] else node["name"])
        return {k: (_inline(v, folder, prefix, seen, depth + 1) if k in ("type", "items", "values", "fields") else v)
                for k, v in node.items()}  # fmt: skip
    return node


@cache
def packaged_schema(schema_id: int) -> bytes | None:
    """The official schema of ``schema_id`` from lsst-alert-packet, inlined, as compact JSON bytes;
    None when the package is not installed or has no such version."""
    base = _package_dir()
    if base is None:
        return None
    major, minor = divmod(schema_id, 100)
    folder = base / str(major) / str(minor)
    prefix = f"lsst.v{major}_{minor}"
    top = folder / f"{prefix}.alert.avsc"
    if not top.is_file():
        return None
    schema = _inline(json.loads(top.read_text()), folder, prefix, set())
    return json.dumps(schema, separators=(",", ":")).encode()


def packaged_ids() -> tuple[int, ...]:
    """Every schema id the installed package ships (for tests and the docs)."""
    base = _package_dir()
    if base is None:
        return ()
    ids = []
    for top in base.glob("*/*/lsst.v*_*.alert.avsc"):
        try:
            ids.append(int(top.parent.parent.name) * 100 + int(top.parent.name))
        except ValueError:
            continue
    return tuple(sorted(ids))
