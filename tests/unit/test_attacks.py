"""Every crafted attack of tests/attacks.py, decoded in-process: its named reason, quickly."""

from __future__ import annotations

import time

import pytest
from attacks import all_attacks

from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.message import decode_any
from alerts.rubin import RubinSchemaCache


@pytest.mark.parametrize(("name", "message", "reason"), all_attacks(2_400_000_000_000_008_000))
def test_attack_is_a_named_dead_letter(name: str, message: bytes, reason: str) -> None:
    t = time.monotonic()
    with pytest.raises(BadAlertError) as e:
        decode_any(message, SchemaCache(), RubinSchemaCache())  # what the daemon calls
    assert e.value.reason == reason, name
    assert time.monotonic() - t < 5.0, f"{name} took {time.monotonic() - t:.1f}s"
