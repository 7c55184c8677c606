"""alerts.synthetic.relabelled (a real alert made into another, for the night benchmark) against
fastavro's reading of the message: only candid, candidate.candid and objectId change."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.decoder import SchemaCache, decode_alert
from alerts.synthetic import make_alert, relabelled

# candids whose zig-zag varint takes 9 bytes, as every ZTF candid's does
NINE_BYTES = st.integers(min_value=2**55, max_value=2**62 - 1)
OBJECT_IDS = st.from_regex(r"ZTF[0-9]{2}[a-z]{7}", fullmatch=True)


def _record(message: bytes) -> dict[str, Any]:
    return dict(next(fastavro.reader(io.BytesIO(message))))  # type: ignore[arg-type]


_CACHE = SchemaCache()


def _check(message: bytes, new_candid: int, new_oid: str) -> None:
    before = _record(message)
    old = (before["candid"], before["objectId"])
    after_bytes = relabelled(message, old, (new_candid, new_oid))
    after = _record(after_bytes)
    assert (after["candid"], after["candidate"]["candid"], after["objectId"]) == (new_candid, new_candid, new_oid)
    after["candid"], after["objectId"] = before["candid"], before["objectId"]
    after["candidate"] = dict(after["candidate"], candid=before["candidate"]["candid"])
    assert repr(after) == repr(before)  # repr: NaN pixels or fields compare unequal to themselves
    alert = decode_alert(after_bytes, _CACHE)  # the consumer's fast path reads it too
    assert (alert.candid, alert.object_id) == (new_candid, new_oid)


@settings(max_examples=60, deadline=None)
@given(old=NINE_BYTES, new=NINE_BYTES, oid=OBJECT_IDS, n_prv=st.integers(0, 5))
def test_only_the_ids_change(old: int, new: int, oid: str, n_prv: int) -> None:
    _check(make_alert(old, n_prv=n_prv).message, new, oid)


def test_every_corpus_alert_can_be_relabelled(corpus: list[bytes]) -> None:
    """The night benchmark relabels every alert it replays (real ones where ../shared is there)."""
    for i, message in enumerate(corpus):
        _check(message, 2**61 + 7919 * i, f"ZTF30{i:07d}"[:12])


def test_values_of_another_length_are_refused() -> None:
    g = make_alert(2**60)
    with pytest.raises(ValueError, match="as many bytes"):
        relabelled(g.message, (g.candid, g.object_id), (5, g.object_id))
    with pytest.raises(ValueError, match="as many bytes"):
        relabelled(g.message, (g.candid, g.object_id), (g.candid, g.object_id + "x"))
    with pytest.raises(ValueError, match="not found"):
        relabelled(g.message, (g.candid + 1, g.object_id), (g.candid + 2, g.object_id))
