"""Both config roots: every key of the shipped files really lands (values chosen unlike the
defaults), unknown keys and wrong types are refused with their path, env overrides endpoints and
secrets only, and each program's root refuses the other's sections."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import (
    ConfigError,
    ConsumerConfig,
    TrainerConfig,
    load_consumer_config,
    load_trainer_config,
    parse_consumer_config,
    parse_trainer_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _leaves(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in d.items():
        out += _leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]
    return out


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


@pytest.mark.parametrize(
    ("path", "load", "default"),
    [
        ("config/local.yaml", lambda p: load_consumer_config(p, env={}), ConsumerConfig()),
        ("config/remote-example.yaml", lambda p: load_consumer_config(p, env={}), ConsumerConfig()),
        ("config/rubin-example.yaml", lambda p: load_consumer_config(p, env={}), ConsumerConfig()),
        ("config/rubin-model.yaml", load_trainer_config, TrainerConfig()),
        ("config/default-model.yaml", load_trainer_config, TrainerConfig()),
    ],
)
def test_every_key_of_the_shipped_files_lands(path: str, load: Any, default: Any) -> None:
    data = yaml.safe_load((ROOT / path).read_text())
    cfg = load(ROOT / path)
    leaves = _leaves(data)
    for keys, value in leaves:
        got = _get(cfg, keys)
        assert got == (tuple(value) if isinstance(value, list) else value), keys
    assert any(_get(cfg, k) != _get(default, k) for k, _ in leaves), f"{path} sets nothing but defaults"


def test_values_unlike_the_defaults_land() -> None:
    cfg = parse_consumer_config({"batching": {"max_batch": 7, "pipeline": False}, "redis": {"ttl_seconds": 60}})
    assert (cfg.batching.max_batch, cfg.batching.pipeline, cfg.redis.ttl_seconds) == (7, False, 60)
    assert ConsumerConfig().batching.max_batch != 7


def test_unknown_keys_are_rejected_with_their_path() -> None:
    with pytest.raises(ConfigError, match=r"kafka: unknown key\(s\) \['bootstrap'\]"):
        parse_consumer_config({"kafka": {"bootstrap": "x"}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_consumer_config({"kafak": {}})


def test_each_program_validates_only_its_own_root() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainer'\]"):
        parse_consumer_config({"trainer": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['kafka'\]"):
        parse_trainer_config({"kafka": {}})


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
def test_bad_consumer_values_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_consumer_config(data)


@pytest.mark.parametrize(
    "data",
    [
        {"autoencoder": {"latent_dim": 0}},
        {"autoencoder": {"channels": [8]}},
        {"autoencoder": {"kind": "gan"}},
        {"lr": "fast"},
        {"latent_dim": 8},  # architecture fields live under autoencoder
        {"head": {"max_features": 0.0}},
        {"head": {"max_features": 1.5}},
        {"head": {"fusion_views": 1.5}},
        {"head": {"fusion_views": 0.1}},  # views without class offsets would change nothing
        {"head": {"early_nulls": 1.0}},  # a copy with every field null
        {"head": {"early_nulls_weight": 0.0}},
        {"contrastive_temperature": 0.0},
        {"projection_dim": -1},
        {"view_shift": 6},
    ],
)
def test_bad_trainer_values_are_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_trainer_config(data)


def test_fusion_views_come_with_class_offsets() -> None:
    cfg = parse_trainer_config({"head": {"fusion_views": 0.1, "fusion_offsets": True}})
    assert cfg.head.fusion_views == 0.1 and cfg.head.fusion_offsets
    assert not parse_trainer_config({}).head.fusion_offsets  # the shipped default


def test_trainer_config_embeds_the_architecture_and_round_trips() -> None:
    cfg = parse_trainer_config({"autoencoder": {"kind": "vae", "latent_dim": 9, "channels": [8, 16]}, "lr": 0.5})
    assert cfg.autoencoder.kind == "vae" and cfg.autoencoder.channels == (8, 16)
    assert parse_trainer_config(cfg.to_dict()) == cfg
    assert cfg.with_overrides(latent_dim=3, seed=4).autoencoder.latent_dim == 3


def test_env_overrides_endpoints_and_secrets_only() -> None:
    env = {
        "STAMPSTREAM_KAFKA_BOOTSTRAP_SERVERS": "broker:9093",
        "STAMPSTREAM_KAFKA_SASL_PASSWORD": "s3cret",
        "STAMPSTREAM_REDIS_URL": "rediss://r:6380/1",
        "STAMPSTREAM_BATCHING_MAX_BATCH": "99",  # not an endpoint or secret: ignored
    }
    cfg = parse_consumer_config({"kafka": {"security": {"protocol": "SASL_SSL"}}, "batching": {"max_batch": 7}}, env)
    assert cfg.kafka.bootstrap_servers == "broker:9093"
    assert cfg.kafka.security.sasl_password == "s3cret"
    assert cfg.kafka.security.protocol == "SASL_SSL"
    assert cfg.redis.url == "rediss://r:6380/1"
    assert cfg.batching.max_batch == 7
    assert "s3cret" not in repr(cfg)


def test_config_is_frozen() -> None:
    cfg = parse_consumer_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kafka.group_id = "x"  # type: ignore[misc]


def test_topic_patterns_must_be_regular_expressions() -> None:
    cfg = parse_consumer_config({"kafka": {"input_topics": ["^lsst-alerts-v.*", "ztf-alerts"]}})
    assert cfg.kafka.input_topics[0] == "^lsst-alerts-v.*"
    with pytest.raises(ConfigError, match="regular expression"):
        parse_consumer_config({"kafka": {"input_topics": ["^lsst-alerts-v(.*"]}})


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("metrics:\n  host: 0.0.0.0\nbatching:\n  max_batch: 8\nmetrics:\n  port: 9108\n")
    with pytest.raises(ConfigError, match="'metrics' given twice"):
        load_consumer_config(path, env={})
