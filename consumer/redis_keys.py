"""Every Redis key the consumer writes and its readers look up, in one place (README, "Redis
keys"): the sink (consumer/redis_sink.py), the similarity query (consumer/vector_index.py) and
peek all name keys through these functions.

Vector sets are per model, quantisation and bucket of processing time: Redis expires keys, not
set members, so a bucket's set expires TTL after the bucket's end (``expire_at``) and a query
searches the buckets that can still exist (``live_buckets``)."""

from __future__ import annotations


def survey_prefix(prefix: str, survey: str) -> str:
    """The key prefix of a survey's results: ZTF's keys stay where they always were
    (``{prefix}:cand:...``), every other survey's get its name (``{prefix}:lsst:cand:...``), so
    Rubin ids can never collide with ZTF candids and each survey is scanned or dropped alone."""
    return prefix if survey == "ztf" else f"{prefix}:{survey}"


def candid_key(prefix: str, candid: int) -> str:
    return f"{prefix}:cand:{candid}"


def candid_glob(prefix: str) -> str:
    """SCAN pattern of every candid hash under ``prefix``."""
    return f"{prefix}:cand:*"


def object_key(prefix: str, object_id: str) -> str:
    return f"{prefix}:obj:{object_id}"


def embedding_key(prefix: str, candid: int) -> str:
    """The embedding's own key, where the server has no vector sets."""
    return f"{prefix}:emb:{candid}"


def index_key(prefix: str, model: str, quantisation: str, bucket: int) -> str:
    """``model`` is "name:version", as in the hashes' ``model`` field."""
    return f"{prefix}:vec:{model}:{quantisation}:{bucket}"


def bucket_start(processed_at_ms: int, bucket_seconds: int) -> int:
    s = processed_at_ms // 1000
    return s - s % bucket_seconds


def expire_at(bucket: int, bucket_seconds: int, ttl_seconds: int) -> int:
    return bucket + bucket_seconds + ttl_seconds


def live_buckets(now_s: float, bucket_seconds: int, ttl_seconds: int) -> list[int]:
    """Bucket starts whose sets may still exist at ``now_s``, newest first."""
    b = int(now_s) - int(now_s) % bucket_seconds
    out = []
    while expire_at(b, bucket_seconds, ttl_seconds) > now_s:
        out.append(b)
        b -= bucket_seconds
    return out
