from __future__ import annotations

import logging

from consumer.log_limit import RateLimitFilter


def test_repeats_are_summarised_once_per_interval() -> None:
    now = [0.0]
    f = RateLimitFilter(30.0, clock=lambda: now[0])
    log = logging.getLogger("test.rate")
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log.handlers[:] = [Keep()]
    log.addFilter(f)
    log.propagate = False
    for i in range(347):
        now[0] = i * 0.035  # a 12 s outage, a line every ~35 ms
        log.error("Connect to ipv4#127.0.0.1:%d failed: Connection refused (after %dms in state CONNECT)", 9092, i)
    log.error("another message")
    now[0] = 40.0
    log.error("Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 1ms in state CONNECT)")
    assert len(records) == 3
    assert "346 more like it" in records[2] and records[1] == "another message"
