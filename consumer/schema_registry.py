"""Rubin schema id -> writer schema, for ``alerts.rubin.RubinSchemaCache``: the schema registry
(confluent-kafka's client) when one is configured, the schemas of the lsst-alert-packet package
otherwise and whenever the registry cannot answer.

Why a fallback at all: a registry outage must not turn a night of alerts into dead letters when
the schema is one we ship. Why the registry first: a schema version newer than the installed
package is only known there. Each id is asked once (the cache above keeps the compiled schema); an
id nobody knows, and a registry that failed, are not asked again for ``retry_after_s``, so a flood
of messages with a bogus id costs one request per id and interval, not one per message, and
requests are capped per minute (``max_requests_per_minute``), so ever-new bogus ids cannot stall
the stream on registry round trips either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from alerts.rubin_schemas import packaged_schema
from config.consumer import SchemaRegistryConfig

log = logging.getLogger("stampstream.schemas")


class RubinSchemaSource:
    """Callable: schema id -> schema JSON bytes, or None when neither the registry nor the package
    has it. ``counts`` says where answers came from (for the logs and the tests)."""

    def __init__(
        self, cfg: SchemaRegistryConfig, client: Any = None, clock: Callable[[], float] = time.monotonic,
        packaged: Callable[[int], bytes | None] = packaged_schema,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.packaged = packaged
        self.client = client if client is not None else (self._client(cfg) if cfg.url else None)
        self._registry_down_until = 0.0
        self._unknown_until: dict[int, float] = {}
        self._requests: list[float] = []  # times of the requests of the last minute
        self.counts = {"registry": 0, "package": 0, "unknown": 0, "registry_errors": 0, "rate_limited": 0}

    @staticmethod
    def _client(cfg: SchemaRegistryConfig) -> Any:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        conf: dict[str, Any] = {"url": cfg.url, "timeout": cfg.timeout_s}
        if cfg.basic_auth_user_info:
            conf["basic.auth.user.info"] = cfg.basic_auth_user_info
        return SchemaRegistryClient(conf)

    def __call__(self, schema_id: int) -> bytes | None:
        now = self.clock()
        if self._unknown_until.get(schema_id, 0.0) > now:
            return None
        found = self._from_registry(schema_id, now)
        if found is None:
            found = self.packaged(schema_id)
            if found is not None:
                self.counts["package"] += 1
        else:
            self.counts["registry"] += 1
        if found is None:
            self.counts["unknown"] += 1
            self._unknown_until[schema_id] = now + self.cfg.retry_after_s
            if len(self._unknown_until) > 4096:  # bounded: forget the oldest
                self._unknown_until.pop(next(iter(self._unknown_until)))
            log.warning("no schema for Rubin schema id %d (registry %s, package: none)", schema_id,
                        self.cfg.url or "not configured")  # fmt: skip
        return found

    def _from_registry(self, schema_id: int, now: float) -> bytes | None:
        if self.client is None or now < self._registry_down_until:
            return None
        self._requests = [t for t in self._requests if t > now - 60.0]
        if len(self._requests) >= self.cfg.max_requests_per_minute:
            self.counts["rate_limited"] += 1
            return None
        self._requests.append(now)
        try:
            schema = self.client.get_schema(schema_id)
        except Exception as e:  # SchemaRegistryError (404, 5xx), connection errors, timeouts
            status = getattr(e, "http_status_code", None)
            if status == 404:
                log.info("schema registry does not know id %d", schema_id)
            else:
                self.counts["registry_errors"] += 1
                self._registry_down_until = now + self.cfg.retry_after_s
                log.warning("schema registry %s failed for id %d (%s: %s); using the packaged schemas for %.0f s",
                            self.cfg.url, schema_id, type(e).__name__, e, self.cfg.retry_after_s)  # fmt: skip
            return None
        if getattr(schema, "references", None):
            log.warning("registry schema %d has references, which this consumer does not follow", schema_id)
            return None
        text = getattr(schema, "schema_str", None)
        return text.encode() if isinstance(text, str) else None
