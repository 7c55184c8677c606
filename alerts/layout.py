"""Writer schema -> the layout the fast decoder follows: the top-level record as a sequence of
segments, each either a run of *flat* fields (primitives and unions of primitives; nested records
are inlined, since Avro records have no framing) or a *branching* field (a union, record or array
whose branches are null, a flat record, or an array of flat records: ZTF's ``prv_candidates``,
``fp_hists`` and the cutouts). A schema with anything else (maps, nested arrays, deeper nesting)
has no layout and is read by fastavro (the general path).

Pure: JSON in, plans out. The plans name the columns to keep; everything else is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from alerts.flat_reader import B_ARRAY, B_NULL, B_RECORD, K_FIXED, MAX_BRANCHES, PRIMITIVE_KINDS, PackedLayout

MAX_DEPTH = 32


class _NotFlat(Exception):
    pass


@dataclass
class _Leaf:
    path: str
    kinds: list[int]
    sizes: list[int]
    union: bool


class _Names:
    """Named types (records, enums, fixed) by full and short name, registered as they are met
    (Avro defines a name before it is referenced)."""

    def __init__(self) -> None:
        self.types: dict[str, Mapping[str, Any]] = {}

    def register(self, t: Mapping[str, Any], namespace: str) -> str:
        name = str(t.get("name", ""))
        ns = str(t.get("namespace", namespace) or "")
        full = name if "." in name or not ns else f"{ns}.{name}"
        self.types.setdefault(full, t)
        self.types.setdefault(name.rsplit(".", 1)[-1], t)
        return full.rsplit(".", 1)[0] if "." in full else ns

    def resolve(self, name: str, namespace: str) -> Mapping[str, Any] | None:
        for key in (name, f"{namespace}.{name}" if namespace else name, name.rsplit(".", 1)[-1]):
            if key in self.types:
                return self.types[key]
        return None


def _primitive(t: Any, names: _Names, ns: str) -> tuple[int, int] | None:
    """(kind, fixed size) of a type that is read as one value, or None."""
    if isinstance(t, str):
        if t in PRIMITIVE_KINDS:
            return PRIMITIVE_KINDS[t], 0
        ref = names.resolve(t, ns)
        return None if ref is None else _primitive(dict(ref), names, ns)
    if isinstance(t, Mapping):
        tt = t.get("type")
        if tt == "enum":
            names.register(t, ns)
            return PRIMITIVE_KINDS["enum"], 0
        if tt == "fixed":
            names.register(t, ns)
            size = t.get("size")
            if not isinstance(size, int) or size < 0:
                raise _NotFlat("fixed without a size")
            return K_FIXED, size
        if isinstance(tt, str) and tt in PRIMITIVE_KINDS and tt not in ("enum",):
            return PRIMITIVE_KINDS[tt], 0  # {"type": "long", "logicalType": ...}
    return None


def _flatten(t: Any, path: str, names: _Names, ns: str, out: list[_Leaf], depth: int) -> None:
    """Append the leaves of a flat type; raises _NotFlat for anything else."""
    if depth > MAX_DEPTH:
        raise _NotFlat("nesting deeper than MAX_DEPTH")
    prim = _primitive(t, names, ns)
    if prim is not None:
        out.append(_Leaf(path, [prim[0]], [prim[1]], False))
        return
    if isinstance(t, list):
        if not 0 < len(t) <= MAX_BRANCHES:
            raise _NotFlat("union too wide")
        kinds, sizes = [], []
        for b in t:
            p = _primitive(b, names, ns)
            if p is None:
                raise _NotFlat("union of complex types")
            kinds.append(p[0])
            sizes.append(p[1])
        out.append(_Leaf(path, kinds, sizes, True))
        return
    rec = names.resolve(t, ns) if isinstance(t, str) else t
    if isinstance(rec, Mapping) and rec.get("type") == "record" and isinstance(rec.get("fields"), list):
        inner = names.register(rec, ns) if "name" in rec else ns
        for f in rec["fields"]:
            if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
                raise _NotFlat("malformed field")
            _flatten(f.get("type"), f"{path}.{f['name']}" if path else f["name"], names, inner, out, depth + 1)
        return
    raise _NotFlat(f"{path}: not a flat type")


def _flat_leaves(t: Any, prefix: str, names: _Names, ns: str) -> list[_Leaf]:
    leaves: list[_Leaf] = []
    _flatten(t, prefix, names, ns, leaves, 1)
    return leaves


class _Builder:
    def __init__(self, top_columns: tuple[str, ...], item_field: str, item_columns: tuple[str, ...]) -> None:
        self.top = {c: i for i, c in enumerate(top_columns)}
        self.item_field = item_field
        self.items = {c: i for i, c in enumerate(item_columns)}
        self.plans: list[tuple[list[_Leaf], dict[str, int]]] = []
        self.segments: list[tuple[bool, list[tuple[int, int]]]] = []  # (union, [(kind, plan)])
        self.item_seg = -1

    def plan(self, leaves: list[_Leaf], columns: dict[str, int]) -> int:
        self.plans.append((leaves, columns))
        return len(self.plans) - 1

    def flat_run(self, leaves: list[_Leaf]) -> None:
        self.segments.append((False, [(B_RECORD, self.plan(leaves, self.top))]))

    def branching(self, name: str, branches: list[Any], union: bool, names: _Names, ns: str) -> None:
        out: list[tuple[int, int]] = []
        for t in branches:
            if t == "null":
                out.append((B_NULL, -1))
            elif isinstance(t, Mapping) and t.get("type") == "array":
                cols = self.items if name == self.item_field else {}
                out.append((B_ARRAY, self.plan(_flat_leaves(t.get("items"), "", names, ns), cols)))
            else:
                out.append((B_RECORD, self.plan(_flat_leaves(t, name, names, ns), self.top)))
        if name == self.item_field and any(k == B_ARRAY for k, _ in out):
            self.item_seg = len(self.segments)
        self.segments.append((union, out))

    def pack(self) -> PackedLayout:
        leaves = [leaf for plan, _ in self.plans for leaf in plan]
        n = len(leaves)
        nb = np.zeros(n, np.int64)
        kinds = np.zeros((n, MAX_BRANCHES), np.int64)
        sizes = np.zeros((n, MAX_BRANCHES), np.int64)
        outcol = np.full(n, -1, np.int64)
        starts, stops = [], []
        i = 0
        for plan, columns in self.plans:
            starts.append(i)
            for leaf in plan:
                nb[i] = len(leaf.kinds) if leaf.union else 0
                kinds[i, : len(leaf.kinds)] = leaf.kinds
                sizes[i, : len(leaf.sizes)] = leaf.sizes
                outcol[i] = columns.get(leaf.path, -1)
                i += 1
            stops.append(i)
        s = len(self.segments)
        seg_union = np.array([u for u, _ in self.segments], np.int64)
        seg_nbr = np.array([len(b) for _, b in self.segments], np.int64)
        br_kind = np.zeros((s, MAX_BRANCHES), np.int64)
        br_plan = np.zeros((s, MAX_BRANCHES), np.int64)
        for j, (_u, branches) in enumerate(self.segments):
            for k, (kind, plan_index) in enumerate(branches):
                br_kind[j, k] = kind
                br_plan[j, k] = max(plan_index, 0)
        return PackedLayout(
            seg_union, seg_nbr, br_kind, br_plan, np.array(starts, np.int64), np.array(stops, np.int64),
            nb, kinds, sizes, outcol, len(self.top), self.item_seg, len(self.items),
        )  # fmt: skip


def compile_layout(
    writer: Mapping[str, Any], top_columns: tuple[str, ...], item_field: str, item_columns: tuple[str, ...]
) -> PackedLayout | None:
    """The packed layout of a top-level record schema. Kept: ``top_columns`` (dotted paths of flat
    fields, e.g. ``candidate.jd`` or ``cutoutScience.stampData``) and, for the array field
    ``item_field``, the ``item_columns`` of its items. None when the schema has a shape the fast
    reader does not follow."""
    names = _Names()
    ns = names.register(writer, "") if "name" in writer else ""
    b = _Builder(top_columns, item_field, item_columns)
    run: list[_Leaf] = []
    try:
        for f in writer.get("fields", ()):
            if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
                return None
            name, t = f["name"], f.get("type")
            try:
                run += _flat_leaves(t, name, names, ns)
                continue
            except _NotFlat:
                pass
            if run:
                b.flat_run(run)
                run = []
            if isinstance(t, list):
                if not 0 < len(t) <= MAX_BRANCHES:
                    return None
                b.branching(name, t, True, names, ns)
            else:
                b.branching(name, [names.resolve(t, ns) if isinstance(t, str) else t], False, names, ns)
        if run:
            b.flat_run(run)
    except (_NotFlat, TypeError, AttributeError):
        return None
    if not b.segments:
        return None
    return b.pack()
