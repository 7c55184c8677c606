from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_local_yaml_loads() -> None:
    cfg = load_config(ROOT / "config" / "local.yaml", env={})
    assert cfg.kafka.input_topics == ("ztf-alerts",)
    assert cfg.batching.max_batch == 512


def test_unknown_keys_are_rejected_with_their_path() -> None:
    with pytest.raises(ConfigError, match=r"kafka: unknown key\(s\) \['bootstrap'\]"):
        parse_config({"kafka": {"bootstrap": "x"}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"kafak": {}})


@pytest.mark.parametrize(
    "data",
    [
        {"batching": {"max_batch": "10"}},
        {"batching": {"max_batch": 0}},
        {"model": {"device": "tpu"}},
        {"redis": {"tls": "yes"}},
        {"kafka": {"input_topics": []}},
    ],
)
def test_bad_values_are_rejected(data) -> None:
    with pytest.raises(ConfigError):
        parse_config(data)


def test_env_overrides_endpoints_and_secrets_only() -> None:
    env = {
        "STAMPSTREAM_KAFKA_BOOTSTRAP_SERVERS": "broker:9093",
        "STAMPSTREAM_KAFKA_SASL_PASSWORD": "s3cret",
        "STAMPSTREAM_REDIS_URL": "rediss://r:6380/1",
        "STAMPSTREAM_BATCHING_MAX_BATCH": "7",  # not an endpoint or secret: ignored
    }
    cfg = parse_config({"kafka": {"security": {"protocol": "SASL_SSL"}}}, env)
    assert cfg.kafka.bootstrap_servers == "broker:9093"
    assert cfg.kafka.security.sasl_password == "s3cret"
    assert cfg.kafka.security.protocol == "SASL_SSL"
    assert cfg.redis.url == "rediss://r:6380/1"
    assert cfg.batching.max_batch == 512
    assert "s3cret" not in repr(cfg)


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(AttributeError):
        cfg.kafka.group_id = "x"  # type: ignore[misc]
