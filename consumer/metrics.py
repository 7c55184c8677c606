"""Prometheus counters and gauges of the consumer, and its HTTP endpoint (/metrics, /healthz, /readyz).

Each daemon owns its registry (not the global one) so that several consumers in one process, as in
the tests, do not share counters.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.alerts_in = Counter("stampstream_alerts_in", "Messages read from the input topics", registry=r)
        self.kafka_errors = Counter(
            "stampstream_kafka_errors", "Kafka error events delivered instead of messages", registry=r
        )
        self.kafka_client_errors = Counter(
            "stampstream_kafka_client_errors", "Error events of the Kafka client (e.g. broker down)", registry=r
        )
        self.produce_rejected = Counter(
            "stampstream_produce_rejected", "Messages the broker refused for good (to the dead-letter topic, or dropped)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.alerts_out = Counter("stampstream_alerts_out", "Results published to both sinks", registry=r)
        self.survey_alerts_out = Counter(
            "stampstream_survey_alerts_out", "Results published to both sinks, by survey (ztf, lsst)", ["survey"], registry=r
        )
        self.dead_letters = Counter(
            "stampstream_dead_letters", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "stampstream_batch_size", "Messages per micro-batch",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "stampstream_stage_seconds", "Seconds per batch spent in each stage", ["stage"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        self.lag = Gauge("stampstream_consumer_lag", "High watermark minus position", ["topic", "partition"], registry=r)
        self.sink_retries = Counter("stampstream_sink_retries", "Failed sink writes retried", ["sink"], registry=r)
        self.commit_failures = Counter("stampstream_commit_failures", "Offset commits that failed", registry=r)
        self.commits = Counter("stampstream_commits", "Offset commits that succeeded", registry=r)
        self.model_reload_failures = Counter(
            "stampstream_model_reload_failures", "Bundle reloads refused (old model kept)", registry=r
        )
        self.model_info = Gauge("stampstream_model_info", "Model in use", ["name", "version", "device"], registry=r)
        self.last_batch_time = Gauge("stampstream_last_batch_timestamp_seconds", "End of the last batch", registry=r)
        self.paused = Gauge("stampstream_paused", "1 while partitions are paused for a slow sink", registry=r)
        self.heartbeat = time.monotonic()
        self.ready = False

    def beat(self) -> None:
        self.heartbeat = time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    stale_after_s: float = 120.0
    timeout = 5.0  # seconds a client may take to send its request: a stuck client holds no thread

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.startswith("/metrics"):
            body, code, ctype = generate_latest(self.metrics.registry), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            alive = time.monotonic() - self.metrics.heartbeat < self.stale_after_s
            body, code, ctype = (b"ok\n" if alive else b"stale main loop\n"), (200 if alive else 503), "text/plain"
        elif self.path.startswith("/readyz"):
            ok = self.metrics.ready
            body, code, ctype = (b"ready\n" if ok else b"not ready\n"), (200 if ok else 503), "text/plain"
        else:
            body, code, ctype = b"not found\n", 404, "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet access log
        return


def serve(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; returns the server (port 0 picks a free one)."""
    handler = type("Handler", (_Handler,), {"metrics": metrics})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
