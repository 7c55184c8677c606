"""Typed configuration (frozen dataclasses) loaded once from YAML. Two roots, one per program:
``ConsumerConfig`` (config/consumer.py) for the daemon and ``TrainerConfig`` (config/trainer.py)
for the offline trainer; each program validates only its own."""

from config.consumer import (
    BatchingConfig,
    ConsumerConfig,
    KafkaConfig,
    KafkaSecurity,
    MetricsConfig,
    ModelConfig,
    RedisConfig,
    load_consumer_config,
    parse_consumer_config,
)
from config.loader import ConfigError
from config.trainer import TrainerConfig, load_trainer_config, parse_trainer_config

__all__ = [
    "BatchingConfig",
    "ConfigError",
    "ConsumerConfig",
    "KafkaConfig",
    "KafkaSecurity",
    "MetricsConfig",
    "ModelConfig",
    "RedisConfig",
    "TrainerConfig",
    "load_consumer_config",
    "load_trainer_config",
    "parse_consumer_config",
    "parse_trainer_config",
]
