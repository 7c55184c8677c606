"""Typed configuration (frozen dataclasses) loaded once from YAML; see settings.py."""

from config.settings import (
    BatchingConfig,
    Config,
    ConfigError,
    KafkaConfig,
    KafkaSecurity,
    MetricsConfig,
    ModelConfig,
    RedisConfig,
    TrainerConfig,
    load_config,
    parse_config,
)

__all__ = [
    "BatchingConfig",
    "Config",
    "ConfigError",
    "KafkaConfig",
    "KafkaSecurity",
    "MetricsConfig",
    "ModelConfig",
    "RedisConfig",
    "TrainerConfig",
    "load_config",
    "parse_config",
]
