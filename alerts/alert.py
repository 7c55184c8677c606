"""The decoded alert: identifiers, the allowlisted candidate fields, the 30-day history and the two
cutouts the model reads. Plain data; both decoding paths build it, and compare equal on the same
message (NaN compares equal to NaN here: a null field is NaN in both)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alerts.allowlist import CANDIDATE_FIELDS

_INDEX = {name: i for i, name in enumerate(CANDIDATE_FIELDS)}


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and values, NaN equal to NaN (a null field is NaN on both decoding paths)."""
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


class FieldsEqual:
    """Equality of a frozen dataclass field by field, numpy fields by ``same_array`` (NaN equal
    to NaN): what both decoding paths are held to."""

    __slots__ = ()
    __dataclass_fields__: dict[str, object]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in self.__dataclass_fields__:
            a, b = getattr(self, f), getattr(other, f)
            if not (same_array(a, b) if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else a == b):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


class ArrayColumns(FieldsEqual):
    """A frozen dataclass whose fields are all numpy columns of one length (a history)."""

    __slots__ = ()

    def __len__(self) -> int:
        first = next(iter(self.__dataclass_fields__))
        return int(getattr(self, first).shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class History(ArrayColumns):
    """``prv_candidates``, one row per entry in the packet's order. Detections have a finite
    ``magpsf``; non-detections (upper limits) have NaN there and their limit in ``diffmaglim``.
    ``positive``: 1 where isdiffpos reads positive, 0 where negative, -1 where null or neither
    (``sign_of``)."""

    jd: np.ndarray  # float64
    fid: np.ndarray  # float64 (NaN where null)
    magpsf: np.ndarray
    sigmapsf: np.ndarray
    diffmaglim: np.ndarray
    positive: np.ndarray  # int8

    @staticmethod
    def empty() -> History:
        z = np.zeros(0)
        return History(z, z, z, z, z, np.zeros(0, np.int8))


# How isdiffpos is written, by its first character. ZTF writes 't'/'f' (schemas 1.8-4.02) or '1'/'0'
# (some of its early packets). A packet rebuilt from a broker's export may carry that broker's
# encoding: ALeRCE stores the sign as 1/-1, so its rows come back as "1"/"-1"; "T"/"F" and "+" are
# the other spellings of the same two values. Read as unknown (-1, a NaN feature) the negative
# differences of such a packet would reach a branch learnt for no sign at all.
POSITIVE_SIGNS = "tT1+"
NEGATIVE_SIGNS = "fF0-"


def sign_of(isdiffpos: str | bytes | None) -> int:
    """isdiffpos -> 1 (positive difference), 0 (negative), -1 (unknown), by its first character
    (``POSITIVE_SIGNS``, ``NEGATIVE_SIGNS``)."""
    if isdiffpos is None or len(isdiffpos) == 0:
        return -1
    c = isdiffpos[0]
    c = chr(c) if isinstance(c, int) else c
    return 1 if c in POSITIVE_SIGNS else 0 if c in NEGATIVE_SIGNS else -1


def count_or_none(v: float) -> int | None:
    """A count read into a float column -> int, or None where null, NaN or outside Avro's int
    (what an output field of type int can carry)."""
    return int(v) if math.isfinite(v) and 0 <= v <= 2**31 - 1 and v == int(v) else None


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True, slots=True, eq=False)
class Alert(FieldsEqual):
    """One ZTF alert as the service uses it. ``candidate`` holds the values of
    ``allowlist.CANDIDATE_FIELDS`` in that order (float64; NaN where null or absent from the writer
    schema). Cutouts stay as the gzipped FITS bytes of the packet."""

    candid: int
    object_id: str
    schema_version: str
    candidate: np.ndarray
    isdiffpos: str | None
    history: History
    science: bytes | None
    difference: bytes | None

    survey = "ztf"

    def value(self, name: str) -> float:
        return float(self.candidate[_INDEX[name]])

    def _optional(self, name: str) -> float | None:
        v = self.value(name)
        return None if np.isnan(v) else v

    @property
    def jd(self) -> float:
        return self.value("jd")

    @property
    def fid(self) -> int:
        return int(self.value("fid"))

    @property
    def ra(self) -> float:
        return self.value("ra")

    @property
    def dec(self) -> float:
        return self.value("dec")

    @property
    def xpos(self) -> float | None:
        return self._optional("xpos")

    @property
    def ypos(self) -> float | None:
        return self._optional("ypos")

    @property
    def magpsf(self) -> float | None:
        return self._optional("magpsf")

    @property
    def ndethist(self) -> int | None:
        """Detections of the object so far, this one included (ZTF: same field and readout
        channel, since the survey began). The published classes need the object's history
        (docs/model.md, "New objects"), so results carry it."""
        return count_or_none(self.value("ndethist"))

    @property
    def jdstarthist(self) -> float | None:
        """Julian date of the object's first detection."""
        return finite_or_none(self.value("jdstarthist"))
