"""The one typed configuration of the service, read once from YAML.

Why frozen dataclasses and not a dict: a typo in a key of a config that runs all night must fail at
start, not silently fall back to a default, so unknown keys are rejected and every value is checked
against its declared type. Only endpoints and secrets may come from the environment
(see ``ENV_OVERRIDES``), so that the YAML in a ConfigMap stays the single source of behaviour.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """The YAML file does not describe a valid configuration (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class KafkaSecurity:
    """Passed through to librdkafka; secrets come from the environment, never from the YAML."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "stampstream"
    input_topics: tuple[str, ...] = ("ztf-alerts",)
    output_topic: str = "stampstream-embeddings"
    dead_letter_topic: str = "stampstream-dead-letters"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 45000
    max_poll_interval_ms: int = 300000
    # Producer back-pressure: librdkafka's local queue; when it is full we flush before producing more.
    producer_queue_max_messages: int = 100000
    producer_linger_ms: int = 20
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    # A dead letter keeps the raw message; larger ones are cut to this size (header: original size),
    # so that one huge bad message can never block the stream on the broker's message size limit.
    dead_letter_max_bytes: int = 900_000
    flush_timeout_s: float = 30.0
    security: KafkaSecurity = KafkaSecurity()


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    password: str = field(default="", repr=False)
    tls: bool = False
    key_prefix: str = "stamp"
    ttl_seconds: int = 7 * 24 * 3600
    socket_timeout_s: float = 10.0


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 512
    max_wait_ms: int = 200
    # Overlap: infer batch N on a worker thread while batch N+1 is consumed and decoded, and read
    # Redis' answer to batch N-1 after that (three batches in hand at most). Off: one batch at a
    # time, strictly sequential.
    pipeline: bool = True
    # Sink retries: exponential backoff between these bounds, forever (the partitions are paused
    # meanwhile), because giving up would mean either losing results or committing unprocessed offsets.
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0


@dataclass(frozen=True)
class ModelConfig:
    bundle_path: str = "model/bundles/default.pt"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reload_check_s: float = 10.0
    # Average the embedding over the 8 flips/rotations of the stamp (rotation-invariant pooling).
    # None: use what the bundle was trained with.
    tta_dihedral: bool | None = None
    # Threads of torch's CPU inference. 0: the CPUs this process may use minus one (at least 1),
    # since the main thread needs a core of its own for decoding; torch's default (all of them)
    # made the consumer 20 % slower on 2 cores (docs/benchmarks.md). Set it to the container's CPU
    # limit minus one in Kubernetes, where the process sees the node's CPUs.
    torch_threads: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "0.0.0.0"
    port: int = 9108  # 0 disables the HTTP endpoint
    progress_interval_s: float = 30.0
    lag_interval_s: float = 15.0
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class TrainerConfig:
    model_kind: Literal["ae", "vae"] = "ae"
    latent_dim: int = 42
    # Conv channels of the encoder's two stages (the decoder mirrors them). The inference cost
    # grows with their square: (16, 32) costs a quarter of (32, 64) (docs/model.md, docs/benchmarks.md).
    channels: tuple[int, int] = (32, 64)
    kl_weight: float = 1e-3
    batch_size: int = 100
    lr: float = 3.33e-5
    max_epochs: int = 300
    patience: int = 15
    augment: Literal["none", "flips_rotations", "flips_rotations_tiles"] = "flips_rotations"
    tile_grid: int = 3
    # Extra objective beside reconstruction: "none" (the study); "invariance": the z of two views
    # (flip/rotation + noise) of a stamp are pulled together; "contrastive": NT-Xent over the batch.
    extra_objective: Literal["none", "invariance", "contrastive"] = "none"
    extra_weight: float = 0.1
    probe_epochs: int = 200  # full-batch L-BFGS iterations
    # L2 penalty of the probe, chosen on the validation objects among these values
    probe_l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    seed: int = 0
    labels_csv: str = ""  # empty: labels.csv found beside the alerts folder, if any
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = 0


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    batching: BatchingConfig = BatchingConfig()
    model: ModelConfig = ModelConfig()
    metrics: MetricsConfig = MetricsConfig()
    trainer: TrainerConfig = TrainerConfig()


# Environment variable -> (section path, field). Endpoints and secrets only.
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "STAMPSTREAM_KAFKA_BOOTSTRAP_SERVERS": (("kafka",), "bootstrap_servers"),
    "STAMPSTREAM_KAFKA_SASL_USERNAME": (("kafka", "security"), "sasl_username"),
    "STAMPSTREAM_KAFKA_SASL_PASSWORD": (("kafka", "security"), "sasl_password"),
    "STAMPSTREAM_KAFKA_SSL_CA_LOCATION": (("kafka", "security"), "ssl_ca_location"),
    "STAMPSTREAM_REDIS_URL": (("redis",), "url"),
    "STAMPSTREAM_REDIS_PASSWORD": (("redis",), "password"),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(v, args[0], f"{where}[]") for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    b = cfg.batching
    if b.max_batch < 1 or b.max_wait_ms < 0:
        raise ConfigError("batching: max_batch must be >= 1 and max_wait_ms >= 0")
    if not cfg.kafka.input_topics:
        raise ConfigError("kafka.input_topics: at least one topic")
    if cfg.trainer.latent_dim < 1:
        raise ConfigError("trainer.latent_dim must be >= 1")
    if len(cfg.trainer.channels) != 2 or min(cfg.trainer.channels) < 1:
        raise ConfigError("trainer.channels must be two positive integers")


def _apply_env(cfg: Config, env: Mapping[str, str]) -> Config:
    for var, (path, name) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        parents = [cfg]
        for part in path:
            parents.append(getattr(parents[-1], part))
        node = dataclasses.replace(parents[-1], **{name: env[var]})
        for part, parent in zip(reversed(path), reversed(parents[:-1]), strict=True):
            node = dataclasses.replace(parent, **{part: node})
        cfg = node
    return cfg


def parse_config(data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from already-parsed YAML (pure; ``env`` defaults to no overrides)."""
    cfg = _build(Config, data or {}, "")
    cfg = _apply_env(cfg, env or {})
    _validate(cfg)
    return cfg


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (None: all defaults) and apply the environment overrides."""
    data: Any = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return parse_config(data, os.environ if env is None else env)
