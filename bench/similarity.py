"""Similar-alert search benchmark: the Redis 8 vector index as the consumer feeds it.

    python bench/similarity.py [--n-synthetic 1000000] [--queries 1000] [--out bench/results]

On a private Redis 8 server (the one deploy/local/stack.sh installs), with the index settings of
the consumer's config (``redis.index``, defaults unless --config):

  1. real embeddings - the shipped bundle's z of every alert of ../shared/ztf/alerts (generated
     alerts without it), indexed through the consumer's own Redis sink: recall@10 against exact
     cosine search, query latency p50/p99, and label purity of the 10 nearest neighbours of each
     labelled alert among the labelled alerts of *other* objects (exact search), against chance;
  2. the consumer's added cost - the Redis sink writing 512-alert batches with and without the
     index, same server: client CPU per alert (packing the command) and wall time per alert
     (what the consumer waits for: Redis inserting into the HNSW graph);
  3. N synthetic vectors (default 1,000,000) of the embedding's dimension, drawn from a Gaussian
     with the real embeddings' mean and covariance: insert rate, index memory per vector
     (``used_memory``), recall@10 and p50/p99 query latency at several query EFs;
  4. Redis memory per alert (``used_memory``) of the sink's layout, plain and with the index, as
     the consumer writes it (realistic field values, two alerts per object by default), split by
     key kind (``MEMORY USAGE``), and the vector set's memory per element at each setting Redis
     offers (stored precision, M, with and without attributes): the floor any per-alert index has.

Prints Markdown and writes JSON; figures go to docs/similarity.md (1-3) and docs/benchmarks.md
(4, "Redis memory") with the date and command. ``--memory-only`` runs part 4 alone (~2 min).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus import SHARED, corpus_messages, decode_corpus  # noqa: E402

from config import load_consumer_config  # noqa: E402
from config.consumer import RedisConfig, VectorIndexConfig  # noqa: E402
from consumer.redis_keys import index_key  # noqa: E402
from consumer.redis_sink import RedisSink  # noqa: E402
from consumer.results import Result  # noqa: E402
from consumer.vector_index import QUANT_ARG, attributes, exact_neighbours, parse_vsim_reply  # noqa: E402

K = 10


def redis8_binary() -> str:
    out = subprocess.run([str(ROOT / "deploy/local/stack.sh"), "redis8-path"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@contextlib.contextmanager
def private_server() -> Iterator[redis.Redis]:
    """A Redis 8 server of our own on a free port, stopped on leaving."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([redis8_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        r = redis.Redis(port=port, socket_timeout=600)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis 8 did not start")
        yield r
    finally:
        proc.terminate()
        proc.wait(30)


def real_embeddings(limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(z, candid, objectId, label or -1, class names) of the corpus, by the shipped bundle."""
    import csv

    import torch

    from model.bundle import load_bundle
    from model.preprocess import normalise

    bundle = load_bundle(ROOT / "model" / "bundles" / "default.pt")
    names = tuple(bundle.class_names)
    labels: dict[int, int] = {}
    if (SHARED.parent / "labels.csv").is_file():
        with open(SHARED.parent / "labels.csv", newline="") as fh:
            labels = {int(r["candid"]): names.index(r["label"]) for r in csv.DictReader(fh) if r.get("label") in names}
    d = decode_corpus(corpus_messages()[0], limit)
    x = normalise(d.raw)
    model = bundle.build_alert_model("cpu").eval()
    with torch.inference_mode():
        z = np.concatenate([
            model(torch.from_numpy(x[i : i + 256]), torch.from_numpy(d.features[i : i + 256]))[0].numpy()
            for i in range(0, len(x), 256)
        ])  # fmt: skip
    y = np.array([labels.get(int(c), -1) for c in d.candid], dtype=np.int64)
    return z.astype(np.float32), d.candid, d.object_id, y, names


def as_results(z: np.ndarray, candid: np.ndarray, objects: np.ndarray, now_ms: int) -> list[Result]:
    p = np.full(5, 0.2, np.float32)
    return [
        Result(candid=int(c), object_id=str(o), jd=2460000.5, fid=1, ra=0.0, dec=0.0, embedding=e, probabilities=p,
               class_names=("AGN", "SN", "VS", "asteroid", "bogus"), model_name="bench", model_version="1",
               cutout_padded=False, nan_fraction=(0.0, 0.0), alert_schema_version="4.02", processed_at_ms=now_ms,
               source_topic="t", source_partition=0, source_offset=i)  # fmt: skip
        for i, (e, c, o) in enumerate(zip(z, candid, objects, strict=True))
    ]


def query_stats(r: redis.Redis, key: str, exact: np.ndarray, queries: np.ndarray, ef: int,
                names: np.ndarray) -> dict[str, float]:  # fmt: skip
    """Recall@10 against ``exact`` (indices into ``names``) and latency of VSIM at this EF."""
    lat, hits = [], 0
    for q, want in zip(queries, exact, strict=True):
        t0 = time.perf_counter()
        reply = r.execute_command("VSIM", key, "FP32", q.astype("<f4").tobytes(), "WITHSCORES", "WITHATTRIBS",
                                  "COUNT", K, "EF", ef)  # fmt: skip
        lat.append(time.perf_counter() - t0)
        got = {n.candid for n in parse_vsim_reply(reply)}
        hits += len(got & {int(names[j]) for j in want})
    return {"ef": ef, "recall_at_10": hits / (K * len(queries)), "p50_ms": float(np.median(lat)) * 1e3,
            "p99_ms": float(np.quantile(lat, 0.99)) * 1e3, "queries": len(queries)}  # fmt: skip


def purity(z: np.ndarray, objects: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Same-label fraction of the 10 nearest labelled alerts of other objects (exact cosine)."""
    lab = np.flatnonzero(y >= 0)
    if len(lab) < 20:
        return {}
    zl, ol, yl = z[lab], objects[lab], y[lab]
    zn = zl / np.linalg.norm(zl, axis=1, keepdims=True)
    sims = zn @ zn.T
    same_obj = ol[:, None] == ol[None, :]
    sims[same_obj] = -np.inf
    nn = np.argsort(-sims, axis=1)[:, :K]
    pur = float((yl[nn] == yl[:, None]).mean())
    freq = np.bincount(yl) / len(yl)
    per_class = {int(c): float((yl[nn][yl == c] == c).mean()) for c in np.unique(yl)}
    return {"purity_at_10": pur, "chance": float((freq**2).sum()), "labelled": len(lab),
            "per_class": per_class}  # type: ignore[dict-item]  # fmt: skip


def consumer_cost(r: redis.Redis, results: list[Result], index: VectorIndexConfig, rounds: int) -> dict[str, float]:
    """µs per alert of the Redis sink, 512-alert batches, without and with the index."""
    out: dict[str, float] = {}
    batches = [results[i : i + 512] for i in range(0, len(results) - 511, 512)] or [results]
    n = sum(len(b) for b in batches) * rounds
    for name, ix in (("plain", None), ("indexed", index)):
        sink = RedisSink(r, f"cost{name}", 3600, ix)
        sink.write(batches[0])  # loads the script
        pack = wall = 0.0
        for _ in range(rounds):
            for b in batches:
                t0 = time.perf_counter()
                sink._pack(b)
                t1 = time.perf_counter()
                sink.write(b)
                wall += time.perf_counter() - t1
                pack += t1 - t0
        out[f"{name}_pack_us"] = pack / n * 1e6
        out[f"{name}_wall_us"] = wall / n * 1e6
    out["added_client_us"] = out["indexed_pack_us"] - out["plain_pack_us"]
    out["added_wall_us"] = out["indexed_wall_us"] - out["plain_wall_us"]
    return out


_INSERT = """
local q, ef, m = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV, 2 do
  redis.call('VADD', KEYS[1], 'FP32', ARGV[i], ARGV[i + 1], q, 'EF', ef, 'M', m)
end
return 1
"""


def synthetic(r: redis.Redis, z: np.ndarray, n: int, n_queries: int, index: VectorIndexConfig,
              efs: list[int], seed: int) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(seed)
    mean, cov = z.mean(0), np.cov(z.T)
    x = rng.multivariate_normal(mean, cov, size=n).astype("<f4")
    queries = rng.multivariate_normal(mean, cov, size=n_queries).astype("<f4")
    names = np.arange(n, dtype=np.int64)
    key = index_key("bench", "synthetic:1", index.quantisation, 0)
    insert = r.register_script(_INSERT)
    mem0 = int(r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    args0 = [QUANT_ARG[index.quantisation], index.ef_construction, index.m]
    for s in tqdm(range(0, n, 1000), desc=f"VADD {n:,} synthetic", unit_scale=1000, unit="vec"):
        args: list[Any] = list(args0)
        for i in range(s, min(n, s + 1000)):
            args += [x[i].tobytes(), str(i)]
        insert(keys=[key], args=args)
    insert_s = time.perf_counter() - t0
    mem = int(r.info("memory")["used_memory"]) - mem0
    exact = exact_neighbours(x, queries, K)
    rows = [query_stats(r, key, exact, queries, ef, names) for ef in tqdm(efs, desc="queries", unit="ef")]
    r.delete(key)
    return {"n": n, "insert_us_per_vector": insert_s / n * 1e6, "bytes_per_vector": mem / n, "queries": rows,
            "distribution": "Gaussian with the real embeddings' mean and covariance"}  # fmt: skip


def realistic_results(n: int, per_object: int, now_ms: int, seed: int = 0) -> list[Result]:
    """Results whose Redis fields are as long as real ones: 19-digit candids, ZTF object ids,
    full-precision jd/ra/dec, the fused classifier's fields and the shipped bundle's name."""
    from model.runtime import load_runtime

    shipped = load_runtime(ROOT / "model" / "bundles" / "default.npz")
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, shipped.latent_dim)).astype(np.float32)
    k = len(shipped.class_names)
    p = rng.dirichlet(np.full(k, 0.5), size=n).astype(np.float32)
    sp = rng.dirichlet(np.full(k, 0.5), size=n).astype(np.float32)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for i in range(n):
        o = i // per_object
        oid = "ZTF2" + str(o % 6) + "".join(letters[np.random.default_rng(o).integers(0, 26, 7)])
        out.append(Result(
            candid=2_400_000_000_000_000_000 + int(rng.integers(0, 10**17)), object_id=oid,
            jd=float(2460600.5 + rng.random() * 30), fid=int(rng.integers(1, 3)), ra=float(rng.random() * 360),
            dec=float(rng.random() * 120 - 30), embedding=z[i], probabilities=p[i],
            class_names=shipped.class_names, model_name=shipped.name,
            model_version=shipped.version, cutout_padded=False, nan_fraction=(0.0, 0.0), alert_schema_version="4.02",
            processed_at_ms=now_ms, source_topic="ztf", source_partition=0, source_offset=i,
            stamp_probabilities=sp[i], classifier="fused", features_version=1,
            ndethist=int(rng.integers(1, 1000)), jdstarthist=float(2459000.5 + rng.random() * 1600),
        ))  # fmt: skip
    return out


def _mean_usage(r: redis.Redis, pattern: str, sample: int = 300) -> tuple[float, int]:
    """Mean ``MEMORY USAGE`` of up to ``sample`` keys matching ``pattern`` and how many there are."""
    keys = list(r.scan_iter(pattern, count=10_000))
    used = [int(r.memory_usage(k, samples=0) or 0) for k in keys[:sample]]
    return (float(np.mean(used)) if used else 0.0), len(keys)


def layout_memory(r: redis.Redis, n: int, per_object: int, index: VectorIndexConfig, prefix: str,
                  ttl: int) -> list[dict[str, Any]]:  # fmt: skip
    """``used_memory`` per alert of what the sink writes, plain and indexed, split by kind of key
    (``MEMORY USAGE``). What MEMORY USAGE leaves out (each key's entries in the keyspace and expiry
    tables) is measured from the plain layout, where nothing else is left, and taken out of the
    indexed layout's rest, which leaves the vector set."""
    rows: list[dict[str, Any]] = []
    for name, ix in (("plain", None), ("indexed", index)):
        r.flushall()
        res = realistic_results(n, per_object, int(time.time() * 1000))
        sink = RedisSink(r, prefix, ttl, ix)
        sink.write(res[:1])  # loads the script
        r.flushall()
        mem0 = int(r.info("memory")["used_memory"])
        for i in range(0, n, 512):
            sink.write(res[i : i + 512])
        total = (int(r.info("memory")["used_memory"]) - mem0) / n
        split: dict[str, float] = {}
        keys = 0
        for kind, pattern in (("hash", "cand"), ("object pointer", "obj"), ("embedding key", "emb")):
            mean, count = _mean_usage(r, f"{prefix}:{pattern}:*")
            split[kind] = mean * count / n
            keys += count
        encoding = r.object("encoding", next(r.scan_iter(f"{prefix}:cand:*")))
        rows.append({"layout": name, "alerts": n, "alerts_per_object": per_object, "bytes_per_alert": total,
                     "split": split, "keys_per_alert": keys / n, "rest": total - sum(split.values()),
                     "hash_encoding": (encoding or b"").decode()})  # fmt: skip
    r.flushall()
    per_key = rows[0]["rest"] / rows[0]["keys_per_alert"]
    for row in rows:
        row["split"]["keyspace and expiry entries"] = per_key * row["keys_per_alert"]
        row["split"]["vector set"] = row["rest"] - per_key * row["keys_per_alert"]
    rows[0]["split"]["vector set"] = 0.0
    return rows


def element_memory(r: redis.Redis, n: int) -> list[dict[str, Any]]:
    """The vector set's ``used_memory`` per element at each setting, element named by a candid,
    with the sink's attributes or none."""
    res = realistic_results(n, 1, 0, seed=1)
    rows: list[dict[str, Any]] = []
    for quant in ("noquant", "q8", "bin"):
        for m in (4, 8, 16):
            for with_attrs in (True, False):
                r.flushall()
                mem0 = int(r.info("memory")["used_memory"])
                pipe = r.pipeline(transaction=False)
                for i, x in enumerate(res):
                    args: list[Any] = ["VADD", "v", "FP32", x.embedding.astype("<f4").tobytes(), str(x.candid),
                                       QUANT_ARG[quant], "EF", 40, "M", m]  # fmt: skip
                    if with_attrs:
                        args += ["SETATTR", attributes(x)]
                    pipe.execute_command(*args)  # type: ignore[no-untyped-call]
                    if i % 1000 == 999:
                        pipe.execute()
                pipe.execute()
                per = (int(r.info("memory")["used_memory"]) - mem0) / n
                rows.append({"quantisation": quant, "m": m, "attributes": with_attrs, "bytes_per_element": per})
    r.flushall()
    return rows


def memory_lines(layout: list[dict[str, Any]], elements: list[dict[str, Any]]) -> list[str]:
    kinds = list(layout[0]["split"])
    lines = [
        f"## Redis memory per alert ({layout[0]['alerts']:,} alerts, {layout[0]['alerts_per_object']} per object; `used_memory`)",
        "| layout | B/alert | " + " | ".join(kinds) + " | hash encoding |", "|---" * (len(kinds) + 3) + "|",
        *(f"| {row['layout']} | **{row['bytes_per_alert']:.0f}** | " + " | ".join(f"{row['split'][k]:.0f}" for k in kinds)
          + f" | {row['hash_encoding']} |" for row in layout),
        "", "Target: ≤ 600 B/alert with the index fed.", "",
        "## The vector set alone: memory per element by setting (element = a candid)",
        "| stored as | M | with the sink's attributes | without attributes |", "|---|---|---|---|",
    ]  # fmt: skip
    by = {(e["quantisation"], e["m"], e["attributes"]): e["bytes_per_element"] for e in elements}
    for quant, m in sorted({(e["quantisation"], e["m"]) for e in elements}, key=lambda t: (["noquant", "q8", "bin"].index(t[0]), t[1])):
        lines.append(f"| {quant} | {m} | {by[(quant, m, True)]:.0f} | {by[(quant, m, False)]:.0f} |")
    floor = min(elements, key=lambda e: e["bytes_per_element"])
    lines += ["", f"Cheapest element: {floor['bytes_per_element']:.0f} B ({floor['quantisation']}, M {floor['m']}, "
              f"{'with' if floor['attributes'] else 'no'} attributes)."]  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="consumer config whose redis.index settings to use")
    ap.add_argument("--n-synthetic", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--efs", default="50,100,200,400", help="query EFs to measure")
    ap.add_argument("--limit", type=int, default=None, help="at most this many real alerts")
    ap.add_argument("--cost-rounds", type=int, default=3)
    ap.add_argument("--memory-n", type=int, default=20_000, help="alerts for the memory part (0: skip it)")
    ap.add_argument("--per-object", type=int, default=2, help="alerts per object in the memory part")
    ap.add_argument("--memory-only", action="store_true", help="part 4 alone")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    redis_cfg = load_consumer_config(a.config, env={}).redis if a.config else RedisConfig()
    if a.memory_only:
        memory_main(a, redis_cfg)
        return
    index = redis_cfg.index
    efs = [int(e) for e in a.efs.split(",")]
    with private_server() as r:
        version = r.info("server")["redis_version"]
        z, candid, objects, y, class_names = real_embeddings(a.limit)
        now_ms = int(time.time() * 1000)
        res = as_results(z, candid, objects, now_ms)
        sink = RedisSink(r, "real", 3600, index)
        for i in range(0, len(res), 512):
            sink.write(res[i : i + 512])
        key = index_key("real", "bench:1", index.quantisation, (now_ms // 1000) // index.bucket_seconds * index.bucket_seconds)
        exact = exact_neighbours(z, z, K)
        real_rows = [query_stats(r, key, exact, z, ef, candid) for ef in efs]
        pur = purity(z, objects, y)
        cost = consumer_cost(r, (res * (1 + 4096 // max(1, len(res))))[:4096], index, a.cost_rounds)
        synth = synthetic(r, z, a.n_synthetic, a.queries, index, efs, 0) if a.n_synthetic else None
        memory = memory_parts(r, a, redis_cfg)
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "redis": version,
        "index": {"quantisation": index.quantisation, "m": index.m, "ef_construction": index.ef_construction},
        "real": {"n": len(z), "dim": int(z.shape[1]), "queries": real_rows, "purity": pur},
        "consumer_cost": cost,
        "synthetic": synth,
        "memory": memory,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "similarity.json").write_text(json.dumps(info, indent=1))
    lines = [
        f"# Similarity index, {info['date']}, Redis {version}, {info['machine']}",
        f"index: vector set, {index.quantisation}, M {index.m}, EF construction {index.ef_construction}",
        "",
        f"## Real embeddings ({len(z)} alerts, dim {z.shape[1]}), every alert as a query",
        "| query EF | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|",
        *(f"| {q['ef']} | {q['recall_at_10']:.3f} | {q['p50_ms']:.2f} | {q['p99_ms']:.2f} |" for q in real_rows),
    ]  # fmt: skip
    if pur:
        per = ", ".join(f"{class_names[c]} {v:.2f}" for c, v in pur["per_class"].items())  # type: ignore[union-attr]
        lines += ["", f"Label purity of the 10 nearest labelled alerts of other objects: {pur['purity_at_10']:.3f} "
                  f"(chance {pur['chance']:.3f}, {pur['labelled']} labelled alerts; {per})"]  # fmt: skip
    lines += [
        "", "## The consumer's added cost (Redis sink, 512-alert batches, same server)",
        "| | client CPU µs/alert (packing) | wall µs/alert (until Redis answers) |", "|---|---|---|",
        f"| plain hashes | {cost['plain_pack_us']:.1f} | {cost['plain_wall_us']:.1f} |",
        f"| + vector index | {cost['indexed_pack_us']:.1f} | {cost['indexed_wall_us']:.1f} |",
        f"| **added** | **{cost['added_client_us']:.1f}** | **{cost['added_wall_us']:.1f}** |",
    ]  # fmt: skip
    if synth:
        lines += [
            "", f"## {synth['n']:,} synthetic vectors ({synth['distribution']})",
            f"insert {synth['insert_us_per_vector']:.0f} µs/vector (server), index memory {synth['bytes_per_vector']:.0f} B/vector",
            "", "| query EF | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|",
            *(f"| {q['ef']} | {q['recall_at_10']:.3f} | {q['p50_ms']:.2f} | {q['p99_ms']:.2f} |" for q in synth["queries"]),
        ]  # fmt: skip
    if memory:
        lines += ["", *memory_lines(memory["layout"], memory["elements"])]
    (out / "similarity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def memory_parts(r: redis.Redis, a: argparse.Namespace, cfg: RedisConfig) -> dict[str, Any] | None:
    if not a.memory_n:
        return None
    layout = layout_memory(r, a.memory_n, a.per_object, cfg.index, cfg.key_prefix, cfg.ttl_seconds)
    return {"layout": layout, "elements": element_memory(r, a.memory_n)}


def memory_main(a: argparse.Namespace, cfg: RedisConfig) -> None:
    """Part 4 alone, on its own private server."""
    index = cfg.index
    with private_server() as r:
        version = r.info("server")["redis_version"]
        memory = memory_parts(r, a, cfg)
    assert memory is not None
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Redis memory, {date}, Redis {version}, index {index.quantisation} M {index.m}", "",
             *memory_lines(memory["layout"], memory["elements"])]  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redis-memory.json").write_text(json.dumps({"date": date, "redis": version, **memory}, indent=1))
    (out / "redis-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
