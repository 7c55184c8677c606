"""The poison tier: every attack class of tests/attacks.py produced among real alerts through the
real broker; `consumer run` must dead-letter each with its reason, bring every good alert out in
both sinks, exit 0 when caught up, and stay within time and memory bounds."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import fastavro
import pytest
from attacks import all_attacks
from conftest import Stack

from alerts.decoder import SchemaCache, decode_alert

from .helpers import create_topic, outcome, produce, run_consumer

pytestmark = pytest.mark.integration

MAX_SECONDS = 240  # the whole run, joining the group included
MAX_PEAK_RSS_MB = 1500  # the pod's memory limit


def _recoded(message: bytes, codec: str) -> bytes:
    """The same alert in a container of another codec: deflate (the codec Avro's specification
    requires readers to read) or snappy (Spark's default)."""
    reader = fastavro.reader(io.BytesIO(message))
    buf = io.BytesIO()
    fastavro.writer(buf, reader.writer_schema, list(reader), codec=codec)
    return buf.getvalue()


@pytest.mark.parametrize("decode_workers", [0, 2])
def test_every_attack_is_dead_lettered_and_every_good_alert_comes_out(
    stack: Stack, corpus: list[bytes], tmp_path: Path, decode_workers: int
) -> None:
    """(decode_workers 2: the same, decoded in spawned worker processes, consumer/decoding.py.)"""
    good_msgs = corpus[:: max(1, len(corpus) // 120)][:120]
    # every 20th good alert as a producer may also write it: in a deflate or a snappy container
    good_msgs = [_recoded(m, ("deflate", "snappy")[i // 20 % 2]) if i % 20 == 0 else m for i, m in enumerate(good_msgs)]
    attacks = all_attacks(2_400_000_000_000_010_000)
    # interleave: one attack after every 12 good alerts
    values: list[bytes] = []
    it = iter(attacks)
    for i, m in enumerate(good_msgs):
        values.append(m)
        if i % 12 == 11:
            nxt = next(it, None)
            if nxt is not None:
                values.append(nxt[1])
    values += [a[1] for a in it]
    cache = SchemaCache()
    good = {decode_alert(m, cache).candid for m in good_msgs}
    cfg_path, data = stack.config(tmp_path, kafka={"dead_letter_max_bytes": 200_000},
                                  batching={"decode_workers": decode_workers})  # fmt: skip
    topic = data["kafka"]["input_topics"][0]
    create_topic(stack.bootstrap, topic, 2)
    produce(stack.bootstrap, topic, values)

    stats_path = tmp_path / "stats.json"
    t = time.monotonic()
    rc = run_consumer(cfg_path, "--idle-exit", "5", "--stats-json", str(stats_path), log_path=tmp_path / "c.log",
                      timeout=MAX_SECONDS + 60)  # fmt: skip
    took = time.monotonic() - t
    log = (tmp_path / "c.log").read_text()
    assert rc == 0, log[-3000:]
    assert took < MAX_SECONDS
    stats = json.loads(stats_path.read_text())
    assert stats["peak_rss_mb"] < MAX_PEAK_RSS_MB, stats["peak_rss_mb"]

    o = outcome(cfg_path)
    assert set(o.output_candids) == good == o.redis_candids, "every good alert in both sinks"
    reasons = sorted(h["reason"].decode() for _, h in o.dead_letters)
    assert reasons == sorted(reason for _, _, reason in attacks), reasons
    assert o.committed == o.end_offsets
    print(f"\npoison tier ({decode_workers} decode workers): {len(attacks)} attacks among {len(good)} alerts, {took:.1f}s, peak RSS "
          f"{stats['peak_rss_mb']:.0f} MiB, reasons {reasons}")  # fmt: skip
