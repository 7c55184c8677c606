"""Rate-limited logging for the Kafka client: during a 12 s broker outage librdkafka wrote 347
ERROR lines (one per reconnect try, every ~50 ms). The first occurrence of a message passes; its
repeats within ``interval_s`` are counted and reported as one summary line when the interval is
over. The outage still shows in the metrics (``stampstream_kafka_client_errors_total``)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

_DIGITS = re.compile(r"\d+")


class RateLimitFilter(logging.Filter):
    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # key -> (window start, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage())[:120])
        now = self.clock()
        start, suppressed = self._seen.get(key, (None, 0))
        if start is None or now - start >= self.interval_s:
            self._seen[key] = (now, 0)
            if suppressed:
                record.msg = f"{record.getMessage()} (and {suppressed} more like it in the last {now - start:.0f}s)"  # type: ignore[operator]
                record.args = ()
            if len(self._seen) > 10_000:
                self._seen.clear()
            return True
        self._seen[key] = (start, suppressed + 1)
        return False
