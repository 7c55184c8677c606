"""Client settings built from the config."""

from __future__ import annotations

import redis

from config import parse_consumer_config
from consumer.clients import consumer_settings, producer_settings, redis_client


def test_redis_tls_flag_with_a_plain_url_gives_a_tls_client() -> None:
    cfg = parse_consumer_config({"redis": {"url": "redis://example.invalid:6380/0", "tls": True}})
    client = redis_client(cfg.redis)  # no connection is made here
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    plain = redis_client(parse_consumer_config({"redis": {"url": "redis://example.invalid:6380/0"}}).redis)
    assert not issubclass(plain.connection_pool.connection_class, redis.SSLConnection)


def test_commits_are_manual_and_the_producer_is_idempotent() -> None:
    cfg = parse_consumer_config({"kafka": {"security": {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}}})
    c, p = consumer_settings(cfg.kafka), producer_settings(cfg.kafka)
    assert c["enable.auto.commit"] is False and c["enable.auto.offset.store"] is False
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    assert c["security.protocol"] == p["security.protocol"] == "SASL_SSL" and c["sasl.mechanism"] == "SCRAM-SHA-512"
