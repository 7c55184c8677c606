"""The consumer daemon's configuration (``consumer run --config``): Kafka, Redis, batching, model,
metrics. Only endpoints and secrets may come from the environment (``ENV_OVERRIDES``), so that the
YAML in a ConfigMap stays the single source of behaviour."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from alerts.limits import DecodeLimits
from config.loader import ConfigError, build, read_yaml


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
    # Topic names, or regular expressions starting with ^ (e.g. "^lsst-alerts-v.*": Rubin names a
    # topic per major schema version).
    input_topics: tuple[str, ...] = ("ztf-alerts",)
    output_topic: str = "stampstream-embeddings"
    dead_letter_topic: str = "stampstream-dead-letters"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 45000
    # Static group membership (KIP-345): a restarted member with the same id gets its partitions
    # back at once instead of after a rebalance. Empty: dynamic membership. Set per replica (e.g.
    # from the pod name, STAMPSTREAM_KAFKA_GROUP_INSTANCE_ID).
    group_instance_id: str = ""
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
class VectorIndexConfig:
    """Similar-alert search (consumer/vector_index.py): every embedding also goes into a Redis 8
    vector set (HNSW), one per model and time bucket, so that the index expires with the alerts.
    Defaults chosen by bench/similarity.py (docs/similarity.md)."""

    # auto: index when the server has vector sets (Redis >= 8), plain hashes otherwise;
    # on: refuse to start without them; off: never index.
    mode: Literal["auto", "on", "off"] = "auto"
    # Stored precision of each vector: float32 (noquant), int8 (q8) or 1 bit (bin).
    quantisation: Literal["noquant", "q8", "bin"] = "noquant"
    m: int = 8  # HNSW links per node
    ef_construction: int = 40  # candidates explored per insert
    query_ef: int = 400  # candidates explored per query (consumer similar)
    # One vector set per bucket of processing time: a bucket's key expires TTL after the bucket's
    # end, so an indexed alert stays findable between TTL and TTL + bucket_seconds.
    bucket_seconds: int = 86400


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    password: str = field(default="", repr=False)
    tls: bool = False
    key_prefix: str = "stamp"
    ttl_seconds: int = 7 * 24 * 3600
    socket_timeout_s: float = 10.0
    index: VectorIndexConfig = VectorIndexConfig()


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
    # Decode + cutouts + features in this many spawned worker processes (0: in the main process;
    # a Rubin message's writer schema is still looked up there and sent along). Pays where one
    # consumer has cores of its own beyond ~2; on 2 shared cores it does not (docs/benchmarks.md).
    # A message that kills or hangs a worker becomes a dead letter.
    decode_workers: int = 0
    # After a consumer of this group on this host died mid-run (SIGKILL, OOM, a crash: its marker
    # file is left, consumer/crash_marker.py), decode this many batches in a worker process, so
    # that a message which crashes a decoding library becomes a dead letter instead of a crash
    # loop on its uncommitted offset. 0: off. (Moot with decode_workers > 0.)
    isolate_after_crash: int = 3
    # Seconds a decode worker may take over one chunk of a batch (up to 64 messages, normally
    # milliseconds) before it is taken as hung and killed: the batch is decoded again one message
    # per task, and a message that hangs its worker becomes a dead letter (decode_timeout) instead
    # of stalling the daemon, and its isolated restart, for ever. Decoding in the daemon's own
    # process, a batch that takes longer ends the process, so that its restart isolates the
    # message (consumer/decoding.py, hang_guard).
    decode_timeout_s: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    # .npz: the runtime bundle (ONNX Runtime, CPU, no torch in the process: ~430 MiB peak RSS
    # against ~900, the same rate on the CPU); .pt: the torch bundle (CUDA when there is a GPU,
    # bf16 on CPUs with native bf16). Both are made by `trainer export` (model/bundles/README.md).
    bundle_path: str = "model/bundles/default.npz"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reload_check_s: float = 10.0
    # Average the embedding over the 8 flips/rotations of the stamp (rotation-invariant pooling).
    # None: use what the bundle was trained with.
    tta_dihedral: bool | None = None
    # Threads of CPU inference (torch, or ONNX Runtime for a .npz runtime bundle). 0: the CPUs this process may use minus one (at least 1),
    # since the main thread needs a core of its own for decoding; torch's default (all of them)
    # made the consumer 20 % slower on 2 cores (docs/benchmarks.md). Set it to the container's CPU
    # limit minus one in Kubernetes, where the process sees the node's CPUs.
    torch_threads: int = 0
    # Reduced precision of CPU inference. A runtime bundle (.npz, the default): auto = its int8
    # graph where the bundle has one and this CPU reproduces it (self-check at load; 63 vs 172
    # µs/alert, published class = fp32 torch on every real alert, embedding cosine >= 0.999 mean),
    # else float32; int8 = require it (the bundle is refused otherwise). A torch bundle (.pt): auto =
    # bfloat16 autocast where the CPU computes bf16 natively (AVX512-BF16/AMX). fp32: the reference.
    cpu_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    # Loopback by default: the endpoint says nothing secret, but an open port is a choice to make
    # on purpose (the Kubernetes and compose configs set 0.0.0.0 for the probes).
    host: str = "127.0.0.1"
    port: int = 9108  # 0 disables the HTTP endpoint
    progress_interval_s: float = 30.0
    lag_interval_s: float = 15.0
    log_format: Literal["json", "text"] = "json"
    # Repeats of one Kafka client log line within this window are summarised in one line.
    client_log_interval_s: float = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class SchemaRegistryConfig:
    """Rubin's schemas by id (docs/rubin.md). Empty url: the schemas of the lsst-alert-packet
    package only. With a url, the registry first (each id asked once, then cached), the package's
    schema when the registry is unreachable or does not know the id."""

    url: str = ""
    # "user:password" for HTTP basic auth; a secret: from the environment only
    basic_auth_user_info: str = field(default="", repr=False)
    timeout_s: float = 5.0
    # After the registry failed, ask it again only after this long (the package answers meanwhile).
    retry_after_s: float = 60.0
    # At most this many registry requests per minute: a flood of messages with ever-new schema ids
    # must not stall the stream on registry round trips (the package answers beyond it).
    max_requests_per_minute: int = 30


@dataclass(frozen=True)
class RubinConfig:
    # The bundle of Rubin alerts (an encoder without a classifier until labelled Rubin alerts
    # exist: model/bundles/README.md): .npz runs on ONNX Runtime (CPU), .pt on torch (CUDA when
    # model.device finds a GPU). Empty: Rubin alerts become dead letters (reason
    # no_model_for_survey), to be replayed once a bundle is configured.
    bundle_path: str = "model/bundles/rubin.npz"
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()


@dataclass(frozen=True)
class ConsumerConfig:
    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    batching: BatchingConfig = BatchingConfig()
    model: ModelConfig = ModelConfig()
    metrics: MetricsConfig = MetricsConfig()
    # Bounds of decoding untrusted messages (alerts/limits.py): schema size and depth, array
    # lengths, allowed container codecs and inflate caps.
    decoding: DecodeLimits = DecodeLimits()
    # Rubin/LSST alerts on the same or their own topics (told apart per message by their framing).
    rubin: RubinConfig = RubinConfig()


# Environment variable -> (section path, field). Endpoints and secrets only.
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "STAMPSTREAM_KAFKA_BOOTSTRAP_SERVERS": (("kafka",), "bootstrap_servers"),
    "STAMPSTREAM_KAFKA_SASL_USERNAME": (("kafka", "security"), "sasl_username"),
    "STAMPSTREAM_KAFKA_SASL_PASSWORD": (("kafka", "security"), "sasl_password"),
    "STAMPSTREAM_KAFKA_SSL_CA_LOCATION": (("kafka", "security"), "ssl_ca_location"),
    # not an endpoint or a secret, but an identity that differs per replica (the pod's name)
    "STAMPSTREAM_KAFKA_GROUP_INSTANCE_ID": (("kafka",), "group_instance_id"),
    "STAMPSTREAM_REDIS_URL": (("redis",), "url"),
    "STAMPSTREAM_REDIS_PASSWORD": (("redis",), "password"),
    "STAMPSTREAM_SCHEMA_REGISTRY_URL": (("rubin", "schema_registry"), "url"),
    "STAMPSTREAM_SCHEMA_REGISTRY_USER_INFO": (("rubin", "schema_registry"), "basic_auth_user_info"),
}


def _validate(cfg: ConsumerConfig) -> None:
    b = cfg.batching
    if b.max_batch < 1 or b.max_wait_ms < 0:
        raise ConfigError("batching: max_batch must be >= 1 and max_wait_ms >= 0")
    if not 0 <= b.decode_workers <= 256:
        raise ConfigError("batching.decode_workers must be in 0..256")
    if b.isolate_after_crash < 0:
        raise ConfigError("batching.isolate_after_crash must be >= 0")
    if not b.decode_timeout_s > 0:
        raise ConfigError("batching.decode_timeout_s must be > 0")
    if not cfg.kafka.input_topics:
        raise ConfigError("kafka.input_topics: at least one topic")
    for topic in cfg.kafka.input_topics:
        if topic.startswith("^"):  # a pattern (librdkafka subscribes to every topic it matches)
            try:
                re.compile(topic)
            except re.error as e:
                raise ConfigError(f"kafka.input_topics: {topic!r} is not a regular expression: {e}") from e
    ix = cfg.redis.index
    if not (2 <= ix.m <= 512 and 1 <= ix.ef_construction <= 100_000 and 1 <= ix.query_ef <= 100_000):
        raise ConfigError("redis.index: m in 2..512, ef_construction and query_ef in 1..100000")
    if ix.bucket_seconds < 1:
        raise ConfigError("redis.index.bucket_seconds must be >= 1")


def _apply_env(cfg: ConsumerConfig, env: Mapping[str, str]) -> ConsumerConfig:
    for var, (path, name) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        parents: list[Any] = [cfg]
        for part in path:
            parents.append(getattr(parents[-1], part))
        node = dataclasses.replace(parents[-1], **{name: env[var]})
        for part, parent in zip(reversed(path), reversed(parents[:-1]), strict=True):
            node = dataclasses.replace(parent, **{part: node})
        cfg = node
    return cfg


def parse_consumer_config(data: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> ConsumerConfig:
    """Build a ConsumerConfig from already-parsed YAML (pure; ``env`` defaults to no overrides)."""
    cfg = build(ConsumerConfig, data or {})
    cfg = _apply_env(cfg, env or {})
    _validate(cfg)
    return cfg


def load_consumer_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> ConsumerConfig:
    """Read the YAML file (None: all defaults) and apply the environment overrides."""
    return parse_consumer_config(read_yaml(path), os.environ if env is None else env)
