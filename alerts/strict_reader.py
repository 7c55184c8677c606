"""The byte source handed to fastavro's general path: every read returns exactly what was asked
or raises, and the number of reads is bounded by the bytes there are.

Why: fastavro's compiled reader does not check the length of what ``read`` returns for fixed-size
values. Given an array of doubles whose count says 2^62, it went on "reading" empty doubles past
the end of the message: a 73 KB message with a crafted writer schema held the GIL for minutes (found
by fuzzing mutated writer schemas, 2026-11-26; docs/faults.md). With this source a short read is
an EOFError at once, and since every read but a zero-length one consumes a byte, ``2 * len + 64``
reads is more than any well-formed record needs (a zero-length read follows a length prefix of at
least one byte); past that the record is refused too.

Cost: the general path reads through Python calls, 323 -> 812 us per real alert (measured on 400
alerts of ../shared/ztf). It serves only schemas without a compiled layout: 2 of the 2,143 real
alerts (the edge cases); every official schema takes the fast path (alerts/flat_reader.py)."""

from __future__ import annotations

from typing import IO, cast


class StrictReader:
    """A read-only view of ``data[start:]`` for ``fastavro.schemaless_reader``."""

    __slots__ = ("_data", "_pos", "_reads_left")

    def __init__(self, data: bytes, start: int = 0) -> None:
        self._data = memoryview(data)
        self._pos = start
        self._reads_left = 2 * (len(data) - start) + 64

    def read(self, n: int = -1) -> bytes:
        self._reads_left -= 1
        if self._reads_left < 0:
            raise EOFError("more reads than the record has bytes")
        pos = self._pos
        end = len(self._data) if n is None or n < 0 else pos + n
        if end > len(self._data):
            raise EOFError(f"{n} bytes asked at offset {pos}, {len(self._data) - pos} left")
        self._pos = end
        return bytes(self._data[pos:end])

    def tell(self) -> int:
        return self._pos


def strict_reader(data: bytes, start: int = 0) -> IO[bytes]:
    """A StrictReader typed as the file fastavro asks for (it calls ``read`` only; we call ``tell``)."""
    return cast(IO[bytes], StrictReader(data, start))
