"""Similar-alert search over the published embeddings: a Redis 8 vector set (HNSW) fed by the
consumer's Redis sink, and the query behind ``consumer similar``.

Layout (README, "Redis keys"; named in consumer/redis_keys.py): one vector set per model and
bucket of processing time,

    {prefix}:vec:{model name}:{model version}:{quantisation}:{bucket start, unix seconds}

element = the candid, vector = the embedding (float32, cosine), attributes = JSON
``{"objectId", "class", "p", "jd"}`` (what a query shows and filters on, so a neighbour is complete
even after its hash expired). Why these choices (docs/similarity.md, measured by
bench/similarity.py):

- *Per model and quantisation*: embeddings of two encoders live in different spaces; a
  hot-reloaded bundle starts new sets and a query searches the sets of its own alert's model. A
  set refuses vectors of another quantisation, so a changed setting starts new sets too.
- *Per bucket* (a day by default): Redis expires keys, not set members. The bucket's key expires
  TTL after the bucket's end (EXPIREAT), so the index follows the alerts' TTL to within a bucket,
  and a week of TTL is ~8 sets per model (also the natural shard unit, docs/similarity.md).
- *Redis 8 vector sets* rather than a module or an in-process index: built into Redis 8 (no module
  to load), fed in the same batch script as the hashes (one round trip, atomic, idempotent: VADD of
  a known candid updates it), and any client with the URL can query it. On Redis 7 the sink
  writes plain hashes, as before (``redis.index.mode: auto``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from config.consumer import VectorIndexConfig
from consumer.redis_keys import (
    bucket_start,
    candid_key,
    embedding_key,
    index_key,
    live_buckets,
    object_key,
    survey_prefix,
)
from consumer.results import Result

QUANT_ARG = {"noquant": "NOQUANT", "q8": "Q8", "bin": "BIN"}
_OBJECT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what may be put into a FILTER expression
_CLASS = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class IndexUnavailable(RuntimeError):
    """``redis.index.mode: on`` but the server has no vector sets (Redis < 8)."""


class NotFound(LookupError):
    """The query alert is not in Redis (never processed, or expired)."""


def attributes(r: Result) -> bytes:
    """The JSON a neighbour carries (and a FILTER reads). Formatted, not json.dumps'd (a third of
    the index's client cost in bench/similarity.py): objectId has passed the decoder's pattern and
    the class names are the bundle's; anything else is escaped by json.dumps (test: equal JSON)."""
    oid, cls = r.object_id, r.predicted_class
    if not (_OBJECT_ID.match(oid) and _CLASS.match(cls)):
        oid, cls = json.dumps(oid)[1:-1], json.dumps(cls)[1:-1]
    p = r.predicted_probability
    return b'{"objectId":"%s","class":"%s","p":%.6f,"jd":%r}' % (oid.encode(), cls.encode(), p, r.jd)


def server_has_vector_sets(client: redis.Redis) -> bool:
    """VCARD of a key that does not exist: 0 with vector sets, "unknown command" without."""
    try:
        client.execute_command("VCARD", "stampstream:probe:no-such-set")  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        return False
    return True


def resolve_index(client: redis.Redis, cfg: VectorIndexConfig) -> VectorIndexConfig | None:
    """The index settings the sink uses against this server: None where it does not index."""
    if cfg.mode == "off":
        return None
    if server_has_vector_sets(client):
        return cfg
    if cfg.mode == "on":
        raise IndexUnavailable("redis.index.mode is 'on' but the server has no vector sets (VADD): Redis >= 8 needed")
    return None


@dataclass(frozen=True)
class Neighbour:
    candid: int
    object_id: str
    predicted_class: str
    probability: float
    jd: float
    similarity: float  # cosine similarity of the embeddings, -1..1
    distance: float  # cosine distance, 1 - similarity

    def as_dict(self) -> dict[str, Any]:
        return {
            "candid": self.candid, "objectId": self.object_id, "class": self.predicted_class,
            "probability": self.probability, "jd": self.jd, "similarity": self.similarity, "distance": self.distance,
        }  # fmt: skip


@dataclass(frozen=True)
class SimilarAnswer:
    candid: int
    object_id: str
    model: str
    neighbours: list[Neighbour]
    searched_sets: int


def filter_expression(exclude_object: str | None, cls: str | None) -> str | None:
    """A vector-set FILTER over the attributes; only validated literals go into it."""
    parts = []
    if exclude_object is not None:
        if not _OBJECT_ID.match(exclude_object):
            raise ValueError(f"not an object id: {exclude_object!r}")
        parts.append(f'.objectId != "{exclude_object}"')
    if cls is not None:
        if not _CLASS.match(cls):
            raise ValueError(f"not a class name: {cls!r}")
        parts.append(f'.class == "{cls}"')
    return " and ".join(parts) or None


def _triples(reply: Sequence[Any] | dict[Any, Any]) -> list[tuple[Any, Any, Any]]:
    """The raw reply (name, score, attributes, ...) or redis-py's parsed form {name: [score, attributes]}."""
    if isinstance(reply, dict):
        return [(name, v[0], v[1]) for name, v in reply.items()]
    return [(reply[i], reply[i + 1], reply[i + 2]) for i in range(0, len(reply) - 2, 3)]


def parse_vsim_reply(reply: Sequence[Any] | dict[Any, Any]) -> list[Neighbour]:
    """``VSIM ... WITHSCORES WITHATTRIBS`` -> neighbours. Redis reports cosine as a score in 0..1,
    (1 + cos) / 2."""
    out = []
    for name, score_raw, attrs in _triples(reply):
        score = float(score_raw)
        a = json.loads(attrs) if attrs else {}
        cos = 2.0 * score - 1.0
        out.append(
            Neighbour(
                int(name), str(a.get("objectId", "")), str(a.get("class", "")), float(a.get("p", float("nan"))),
                float(a.get("jd", float("nan"))), cos, 1.0 - cos,
            )
        )  # fmt: skip
    return out


def similar(
    client: redis.Redis,
    prefix: str,
    cfg: VectorIndexConfig,
    ttl_seconds: int,
    *,
    candid: int | None = None,
    object_id: str | None = None,
    k: int = 10,
    cls: str | None = None,
    include_same_object: bool = False,
    now_s: float | None = None,
    survey: str = "ztf",
) -> SimilarAnswer:
    """The ``k`` alerts most similar to one alert (by candid, or an object's latest alert), over
    every live set of that alert's model; its own object is left out unless asked for.
    Raises NotFound when the alert is not in Redis."""
    if (candid is None) == (object_id is None):
        raise ValueError("give exactly one of candid and object_id")
    prefix = survey_prefix(prefix, survey)
    if not server_has_vector_sets(client):
        raise IndexUnavailable("this Redis has no vector sets (Redis >= 8 needed): nothing to search")
    if object_id is not None:  # the object's pointer to its latest alert
        okey = object_key(prefix, object_id)
        latest = client.hget(okey, "candid")
        if latest is None:
            raise NotFound(f"{okey} is not in Redis (never processed, or expired)")
        candid = int(latest)
    assert candid is not None
    key = candid_key(prefix, candid)
    oid, model, processed = client.hmget(key, ["objectId", "model", "processed_at"])
    if oid is None or model is None or processed is None:
        raise NotFound(f"{key} is not in Redis (never processed, or expired)")
    qid = oid.decode() if isinstance(oid, bytes) else str(oid)
    model_s = model.decode() if isinstance(model, bytes) else str(model)
    emb = read_embedding(client, prefix, cfg, candid, model_s, int(processed))
    if emb is None:
        raise NotFound(f"the embedding of {candid} is not in Redis (indexed by another setting, or expired)")
    flt = filter_expression(None if include_same_object or not qid else qid, cls)
    pipe = client.pipeline(transaction=False)
    buckets = live_buckets(time.time() if now_s is None else now_s, cfg.bucket_seconds, ttl_seconds)
    # With its own object allowed, the query alert itself comes back too (dropped below): one more
    count = k + (1 if include_same_object else 0)
    for b in buckets:
        args: list[Any] = ["VSIM", index_key(prefix, model_s, cfg.quantisation, b), "FP32", emb.tobytes(),
                           "WITHSCORES", "WITHATTRIBS"]  # fmt: skip
        args += ["COUNT", count, "EF", max(cfg.query_ef, count)]
        if flt:
            args += ["FILTER", flt]
        pipe.execute_command(*args)  # type: ignore[no-untyped-call]
    found: list[Neighbour] = []
    for reply in pipe.execute():  # a missing set answers an empty list
        found += parse_vsim_reply(reply or [])
    found = [n for n in found if n.candid != candid]
    found.sort(key=lambda n: -n.similarity)
    return SimilarAnswer(candid, qid, model_s, found[:k], len(buckets))


def read_embedding(
    client: redis.Redis, prefix: str, cfg: VectorIndexConfig, candid: int, model: str, processed_at_ms: int
) -> np.ndarray | None:
    """An alert's stored embedding (float32): from its vector set (the bucket of its processing
    time), or from ``{prefix}:emb:{candid}`` where the sink wrote no index."""
    raw = client.get(embedding_key(prefix, candid))
    if raw is not None:
        return np.frombuffer(raw, dtype="<f4").copy()  # type: ignore[arg-type]
    key = index_key(prefix, model, cfg.quantisation, bucket_start(processed_at_ms, cfg.bucket_seconds))
    try:
        values = client.execute_command("VEMB", key, str(candid))  # type: ignore[no-untyped-call]
    except redis.ResponseError:  # no vector sets on this server
        return None
    if not values:
        return None
    return np.array([float(v) for v in values], dtype="<f4")


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (indices), for the recall measurement and the tests."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    out = []
    for i in range(0, len(q), 64):  # 64 queries at a time: (64, N) similarities, not (Q, N)
        sims = q[i : i + 64] @ v.T
        top = np.argpartition(-sims, kth=min(k, sims.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)
