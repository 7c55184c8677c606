"""Throughput benchmark through the real broker, all paths on the same messages in one run.

    python bench/throughput.py [--n 20000] [--device cpu|cuda|auto] [--out bench/results]

Replays the alerts of ../shared/ztf/alerts (generated ones without it), repeated to at least N
messages, into a fresh topic, then times on the same broker and messages:
  (a) floor   - consume + gunzip of the science and difference cutouts, nothing else
  (b) naive   - fastavro.reader per message, gzip + astropy per cutout (as in ZTF's example code),
                the same model and sinks, results written with fastavro
  (c) ours    - `consumer run` end to end, both sinks, as 1 process and as 2 processes in one group
and the decode cost per alert with 0 and 100 prv_candidates entries; then the Rubin row: the
Rubin wire messages of ../shared/rubin (generated ones without it) through
  (d) ours, Rubin - `consumer run`, 1 process, Rubin's bundle, both sinks
and their cost per alert by stage and history length. Prints a Markdown table and writes JSON.
Ratios are taken within the run, since machines are noisy. ``--rubin-only``: the Rubin part alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from corpus import corpus_messages, rubin_messages  # noqa: E402
from tqdm import tqdm

from alerts.cutouts import (  # noqa: E402
    StampPixels,  # noqa: E402
    centre_crop,
    gunzip,
)
from alerts.decoder import SchemaCache, alert_from_record, decode_alert  # noqa: E402
from alerts.features import alert_features  # noqa: E402
from config import KafkaConfig, parse_consumer_config  # noqa: E402
from consumer.batches import GoodAlert, Source, build_results  # noqa: E402
from consumer.clients import consumer_settings, produce, producer_settings, redis_client  # noqa: E402
from consumer.inference import ModelRunner  # noqa: E402
from consumer.kafka_sink import KafkaSink, Outgoing  # noqa: E402
from consumer.redis_sink import RedisSink  # noqa: E402
from consumer.results import ResultEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BATCH = 512


def produce_all(bootstrap: str, topic: str, templates: list[bytes], n: int, partitions: int) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
        f.result(30)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "compression.type": "lz4", "batch.size": 1_000_000})
    total = max(n, len(templates))
    for i in tqdm(range(total), desc="replay", unit="alert"):
        t = i % len(templates)
        produce(p, topic, templates[t], key=str(t).encode())
    assert p.flush(120) == 0
    return total


def _listener(port: int) -> psutil.Process | None:
    """The local process listening on a TCP port (the broker, Redis), if it can be seen."""
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                return psutil.Process(c.pid)
    return None


class CpuMeter:
    """CPU seconds of the broker and of Redis over one phase, and of this process: on a small
    machine the broker and Redis share the cores with the consumer, and these figures show where
    the cores went (a path that uses less CPU per alert leaves more to the others)."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.procs = {name: _listener(port) for name, port in ports.items()}
        self.seconds: dict[str, float] = {}

    @staticmethod
    def _cpu(p: psutil.Process | None) -> float:
        if p is None:
            return float("nan")
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        return float("nan")

    def __enter__(self) -> CpuMeter:
        self._t0 = {n: self._cpu(p) for n, p in self.procs.items()} | {"bench": time.process_time()}
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = {n: self._cpu(p) - self._t0[n] for n, p in self.procs.items()}
        self.seconds["bench"] = time.process_time() - self._t0["bench"]

    def shares(self, path_s: float | None = None) -> dict[str, float]:
        """CPU seconds of the path (this process unless given), the broker and Redis."""
        path = self.seconds["bench"] if path_s is None else path_s
        return {"path": path, "broker": self.seconds["broker"], "redis": self.seconds["redis"]}


def _consumer(bootstrap: str, topic: str) -> Consumer:
    """The same client settings as `consumer run`, in a fresh group: every path gets the same client."""
    kafka = KafkaConfig(bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:8]}")
    c = Consumer(consumer_settings(kafka))
    c.subscribe([topic])
    return c


def floor_path(bootstrap: str, topic: str, total: int, locations: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Consume + gunzip of both cutouts (their byte ranges known in advance), nothing else."""
    c = _consumer(bootstrap, topic)
    seen, t0 = 0, None
    with tqdm(total=total, desc="(a) floor", unit="alert") as bar:
        while seen < total:
            # never ask for more than is left: the last call would wait out its timeout
            msgs = c.consume(num_messages=min(BATCH, total - seen), timeout=1.0)
            if msgs and t0 is None:
                t0 = time.perf_counter()
            for m in msgs:
                v = m.value()
                s0, l0, s1, l1 = locations[int(m.key())]
                gunzip(v[s0 : s0 + l0])
                gunzip(v[s1 : s1 + l1])
            seen += len(msgs)
            bar.update(len(msgs))
    elapsed = time.perf_counter() - t0
    c.close()
    return {"alerts": seen, "seconds": elapsed}


def naive_path(bootstrap: str, topic: str, total: int, cfg_data: dict[str, Any], device: str) -> dict[str, Any]:
    """A straightforward pipeline: a fresh fastavro reader per message, Python's gzip and astropy
    per cutout (the way ZTF's alert-reading example opens a stamp), then the same model and sinks
    as ours, batch by batch, each result encoded by fastavro's schemaless_writer."""
    import fastavro
    from astropy.io import fits

    cfg = parse_consumer_config(cfg_data)
    runner = ModelRunner(cfg.model.bundle_path, device)
    ksink = KafkaSink(Producer(producer_settings(cfg.kafka)))
    rsink = RedisSink(redis_client(cfg.redis), cfg.redis.key_prefix + "naive", 600)
    enc = ResultEncoder()
    c = _consumer(bootstrap, topic)
    seen, t0 = 0, None
    stage = {"decode": 0.0, "infer": 0.0, "publish": 0.0}
    with tqdm(total=total, desc="(b) naive", unit="alert") as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while seen < total:
            # never ask for more than is left: the last call would wait out its timeout
            msgs = c.consume(num_messages=min(BATCH, total - seen), timeout=1.0)
            if not msgs:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            ta = time.perf_counter()
            good = []
            for m in msgs:
                reader = fastavro.reader(io.BytesIO(m.value()))
                rec = next(iter(reader))
                cand = rec["candidate"]
                crops = []
                for key in ("cutoutScience", "cutoutDifference"):
                    # As ZTF's own alert-reading example does: gzip module, then astropy.
                    with gzip.open(io.BytesIO(rec[key]["stampData"]), "rb") as f, fits.open(io.BytesIO(f.read())) as hdul:
                        crops.append(centre_crop(np.array(hdul[0].data), cand["xpos"], cand["ypos"])[0])
                alert = alert_from_record(rec, str(reader.writer_schema.get("version", "")))
                feats = alert_features(alert)
                good.append(GoodAlert(alert, StampPixels(np.stack(crops), False, (0.0, 0.0)), feats, Source(m.topic(), m.partition(), m.offset())))
            tb = time.perf_counter()
            z, ps, p = runner.predict(np.stack([g.stamp.pixels for g in good]), np.stack([g.features for g in good]))
            tc = time.perf_counter()
            model, meta = runner.snapshot()
            results = build_results(good, z, ps, p, [meta] * len(good), int(time.time() * 1000))
            ksink.send([Outgoing(cfg.kafka.output_topic + "-naive", str(r.candid).encode(), enc.encode_with_fastavro(r)) for r in results], 60)
            rsink.write(results)
            last: dict[tuple[str, int], int] = {}
            for m in msgs:
                last[(m.topic(), m.partition())] = max(last.get((m.topic(), m.partition()), -1), m.offset())
            c.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()], asynchronous=False)
            td = time.perf_counter()
            stage["decode"] += tb - ta
            stage["infer"] += tc - tb
            stage["publish"] += td - tc
            seen += len(msgs)
            bar.update(len(msgs))
    elapsed = time.perf_counter() - t0
    c.close()
    return {"alerts": seen, "seconds": elapsed, "stage_s": stage}


def _run_name(procs: int, index: str, workers: int) -> str:
    """Key of a (c) run in the results: ours_1, ours_2, ours_1_noindex, ours_1_workers2."""
    return f"ours_{procs}" + ("_noindex" if index == "off" else "") + (f"_workers{workers}" if workers else "")


def ours(config_path: Path, processes: int, total: int, workdir: Path) -> dict[str, Any]:
    """`consumer run` as real processes in one group; RSS sampled from outside every 0.2 s."""
    env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    procs, stats_files = [], []
    for i in range(processes):
        sf = workdir / f"stats-{processes}-{i}.json"
        args = ["--stats-json", str(sf)]
        args += ["--max-alerts", str(total)] if processes == 1 else ["--idle-exit", "5"]
        log = open(workdir / f"consumer-{processes}-{i}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, "-m", "consumer.cli", "run", "--config", str(config_path), *args],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        stats_files.append(sf)
    samples: list[list[tuple[float, float]]] = [[] for _ in procs]

    def sample() -> None:
        ps = [psutil.Process(p.pid) for p in procs]
        while any(p.poll() is None for p in procs):
            for i, pp in enumerate(ps):
                with contextlib.suppress(psutil.Error):
                    samples[i].append((time.time(), pp.memory_info().rss / 2**20))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"consumer exited {p.returncode}; see {workdir}")
    th.join()
    stats = [json.loads(f.read_text()) for f in stats_files]
    t0 = min(s["first_message_at"] for s in stats if s["first_message_at"])
    t1 = max(s["last_batch_at"] for s in stats if s["last_batch_at"])
    n = sum(s["alerts_in"] for s in stats)
    stage: dict[str, float] = {}
    for s in stats:
        for k, v in s["stage_s"].items():
            stage[k] = stage.get(k, 0.0) + v
    mem = []
    for s, smp in zip(stats, samples, strict=True):
        window = [(t, r) for t, r in smp if s["first_message_at"] and s["first_message_at"] <= t <= s["last_batch_at"]]
        q = max(1, len(window) // 4)
        mem.append({
            "peak_rss_mb": s["peak_rss_mb"],
            "first_quarter_rss_mb": float(np.mean([r for _, r in window[:q]])) if window else None,
            "last_quarter_rss_mb": float(np.mean([r for _, r in window[-q:]])) if window else None,
        })  # fmt: skip
    cpu = sum(s["cpu_s"] for s in stats)  # the consumers' own, first message to last batch
    return {"alerts": n, "seconds": t1 - t0, "stage_s": stage, "memory": mem, "cpu_s": cpu,
            "out": sum(s["alerts_out"] for s in stats), "dead": sum(s["dead_letters"] for s in stats)}  # fmt: skip


def prv_cost(templates: list[bytes]) -> dict[str, Any]:
    """decode (+cutouts, +features) cost of one real alert re-encoded with 0, 20 (the corpus median)
    and 100 history entries."""
    import fastavro

    from alerts.framing import ContainerFramer
    from alerts.message import decode_message

    for msg in templates:
        r = fastavro.reader(io.BytesIO(msg))
        rec = next(iter(r))
        if rec.get("prv_candidates"):
            break
    schema = fastavro.parse_schema(r.writer_schema)
    framer = ContainerFramer(r.metadata["avro.schema"].encode())
    messages = {}
    for n in (0, 20, 100):
        rec2 = dict(rec, prv_candidates=(rec["prv_candidates"] * 100)[:n] if n else [])
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, rec2)
        messages[n] = framer.frame(buf.getvalue())
    cache = SchemaCache()
    paths = {"ours_decode_us": lambda m: decode_alert(m, cache),
             "ours_decode_cutouts_us": lambda m: decode_message(m, cache),
             "ours_decode_cutouts_features_us": lambda m: alert_features(decode_message(m, cache)[0]),
             "general_path_decode_us": lambda m: decode_alert(m, cache, fast=False),
             "fastavro_reader_us": lambda m: list(fastavro.reader(io.BytesIO(m)))}  # fmt: skip
    # Best of 7 rounds of 100 calls, the two history lengths interleaved: the machine's noise
    # (other tenants, the broker's GC) only ever adds time.
    best: dict[tuple[int, str], float] = {}
    for _ in range(7):
        for n, msg in messages.items():
            for label, fn in paths.items():
                fn(msg)
                t = time.perf_counter()
                for _ in range(100):
                    fn(msg)
                us = (time.perf_counter() - t) / 100 * 1e6
                best[(n, label)] = min(best.get((n, label), us), us)
    out: dict[str, Any] = {}
    for (n, label), us in best.items():
        out.setdefault(f"prv={n}", {})[label] = us
    for n, msg in messages.items():
        out[f"prv={n}"]["message_bytes"] = len(msg)
    return out


def rubin_cost(templates: list[bytes]) -> dict[str, Any]:
    """Per Rubin alert (µs, best of 5 rounds over all templates): decode, + cutouts (no gunzip:
    uncompressed FITS), + features; the general path (fastavro) beside them. Grouped by history
    length (prvDiaSources entries)."""
    from alerts.message import decode_rubin_message
    from alerts.rubin import RubinSchemaCache, decode_rubin
    from alerts.rubin_features import rubin_features

    cache = RubinSchemaCache()
    groups: dict[str, list[bytes]] = {}
    for m in templates:
        n = len(decode_rubin(m, cache).history)
        groups.setdefault("0" if n == 0 else "1-99" if n < 100 else ">=100", []).append(m)
    paths = {"decode_us": lambda m: decode_rubin(m, cache),
             "decode_cutouts_us": lambda m: decode_rubin_message(m, cache),
             "decode_cutouts_features_us": lambda m: rubin_features(decode_rubin_message(m, cache)[0]),
             "general_path_decode_us": lambda m: decode_rubin(m, cache, fast=False)}  # fmt: skip
    out: dict[str, Any] = {}
    for g, msgs in sorted(groups.items()):
        row: dict[str, Any] = {"alerts": len(msgs), "mean_history": float(np.mean([len(decode_rubin(m, cache).history) for m in msgs])),
                               "mean_bytes": float(np.mean([len(m) for m in msgs]))}  # fmt: skip
        for label, fn in paths.items():
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for m in msgs:
                    fn(m)
                best = min(best, (time.perf_counter() - t) / len(msgs) * 1e6)
            row[label] = best
        out[f"history {g}"] = row
    return out


def rubin_table(res: dict[str, Any]) -> str:
    r = res["ours_rubin"]
    lines = ["Rubin alerts (d): " + res["rubin_source"], "",
             "| path | alerts | alerts/s | µs/alert | CPU µs/alert: path / broker / Redis | peak RSS MiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    rss = "/".join(f"{m['peak_rss_mb']:.0f}" for m in r.get("memory", [])) or "-"
    cpu = " / ".join(f"{1e6 * r['cpu_s'][k] / r['alerts']:.0f}" for k in ("path", "broker", "redis"))
    lines.append(f"| (d) ours, Rubin, 1 process | {r['alerts']} | {r['alerts'] / r['seconds']:.0f} | "
                 f"{1e6 * r['seconds'] / r['alerts']:.0f} | {cpu} | {rss} |")  # fmt: skip
    stage, n = r["stage_s"], r["alerts"]
    lines += ["", "| " + " | ".join(stage) + " |", "|" + "---|" * len(stage),
              "| " + " | ".join(f"{1e6 * v / n:.0f}" for v in stage.values()) + " |", "",
              "| Rubin history | alerts | mean entries | mean bytes | decode | + cutouts | + features | general path: decode |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, v in res["rubin_cost"].items():
        lines.append(f"| {k} | {v['alerts']} | {v['mean_history']:.0f} | {v['mean_bytes']:.0f} | {v['decode_us']:.0f} | "
                     f"{v['decode_cutouts_us']:.0f} | {v['decode_cutouts_features_us']:.0f} | {v['general_path_decode_us']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def table(res: dict[str, Any]) -> str:
    rows = [("(a) floor: consume + gunzip", res["floor"]), ("(b) naive pipeline", res["naive"]),
            ("(c) ours, 1 process", res["ours_1"]), ("(c) ours, 2 processes", res["ours_2"]),
            ("(c) ours, 1 process, similarity index off", res["ours_1_noindex"])]  # fmt: skip
    rows += [(f"(c) ours, 1 process, {k.rsplit('workers', 1)[1]} decode workers (CPU: main process only)", res[k])
             for k in res if k.startswith("ours_1_workers")]  # fmt: skip
    lines = ["| path | alerts | alerts/s | µs/alert | CPU µs/alert: path / broker / Redis | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        rss = "/".join(f"{m['peak_rss_mb']:.0f}" for m in r.get("memory", [])) or "-"
        cpu = " / ".join(f"{1e6 * r['cpu_s'][k] / r['alerts']:.0f}" for k in ("path", "broker", "redis"))
        lines.append(f"| {name} | {r['alerts']} | {r['alerts'] / r['seconds']:.0f} | {1e6 * r['seconds'] / r['alerts']:.0f} | {cpu} | {rss} |")
    rt = res["ratios"]
    lines += ["", "| ratio | value | target |", "|---|---|---|",
              f"| (c) / (a) alerts/s | {rt['ours_over_floor']:.2f} | ≥ 0.5 |",
              f"| (c) / (b) alerts/s | {rt['ours_over_naive']:.1f} | ≥ 10 |",
              f"| 2 processes / 1 process | {rt['two_over_one']:.2f} | ≥ 1.7 |",
              f"| (c) index on / off alerts/s | {rt['index_on_over_off']:.2f} | |", ""]  # fmt: skip
    stage = res["ours_1"]["stage_s"]
    n = res["ours_1"]["alerts"]
    lines += ["Stage breakdown of (c), 1 process (µs/alert; infer runs on a worker thread, overlapped):", "",
              "| " + " | ".join(stage) + " |", "|" + "---|" * len(stage),
              "| " + " | ".join(f"{1e6 * v / n:.0f}" for v in stage.values()) + " |", ""]  # fmt: skip
    m = res["ours_1"]["memory"][0]
    lines += [f"Memory of (c), 1 process: peak {m['peak_rss_mb']:.0f} MiB; mean RSS first quarter "
              f"{m['first_quarter_rss_mb']:.0f} MiB, last quarter {m['last_quarter_rss_mb']:.0f} MiB.", ""]
    lines += ["Cost per alert by history length (µs): decode only, decode + both cutouts to tensors, and the",
              "fused classifier's inputs (decode + cutouts + features):", "",
              "| history | ours: decode | ours: decode + cutouts | ours: + features | general path: decode | fastavro.reader: decode |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for k, v in res["prv_candidates"].items():
        lines.append(f"| {k} ({v['message_bytes']} B) | {v['ours_decode_us']:.0f} | {v['ours_decode_cutouts_us']:.0f} "
                     f"| {v['ours_decode_cutouts_features_us']:.0f} | {v['general_path_decode_us']:.0f} | {v['fastavro_reader_us']:.0f} |")
    return "\n".join(lines)


def run_rubin(a: argparse.Namespace, tag: str, work: Path) -> dict[str, Any]:
    """(d): the Rubin templates repeated to --rubin-n messages in a topic of their own, through
    `consumer run` with Rubin's bundle; and their cost per alert by stage."""
    import yaml

    templates, source = rubin_messages()
    topic = f"bench-rubin-{tag}"
    total = produce_all(a.bootstrap, topic, templates, a.rubin_n, a.partitions)
    data = {
        "kafka": {"bootstrap_servers": a.bootstrap, "group_id": f"bench-rubin-{tag}", "input_topics": [topic],
                  "output_topic": f"bench-rubin-out-{tag}", "dead_letter_topic": f"bench-rubin-dlq-{tag}"},
        "redis": {"url": a.redis, "key_prefix": f"bench{tag}", "ttl_seconds": 600},
        "batching": {"max_batch": BATCH, "max_wait_ms": 100},
        "model": {"device": "cpu", "bundle_path": a.bundle, "torch_threads": a.torch_threads},
        "metrics": {"port": 0, "log_format": "text", "progress_interval_s": 10},
    }  # fmt: skip
    cfg_path = work / "config-rubin.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    print(f"(d) ours, Rubin alerts ({source}), 1 process ...", flush=True)
    ports = {"broker": int(a.bootstrap.split(",")[0].rsplit(":", 1)[-1]), "redis": urlparse(a.redis).port or 6379}
    with CpuMeter(ports) as meter:
        r = ours(cfg_path, 1, total, work)
    r["cpu_s"] = meter.shares(r["cpu_s"])
    return {"ours_rubin": r, "rubin_source": f"{total} messages of {len(templates)} {source}", "rubin_cost": rubin_cost(templates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="at least this many messages")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--bootstrap", default=f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}")
    ap.add_argument("--redis", default=f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-stack", action="store_true", help="do not run deploy/local/stack.sh up")
    ap.add_argument("--bundle", default=str(ROOT / "model" / "bundles" / "default.npz"),
                    help="model bundle of (b) and (c): the shipped default (.npz, ONNX Runtime) or a .pt (torch)")
    ap.add_argument("--torch-threads", type=int, default=0, help="model.torch_threads of (c); 0: the CPUs minus one")
    ap.add_argument("--decode-workers", type=int, default=0,
                    help="also run (c) with 1 process decoding in this many worker processes (its CPU column counts the main process only)")
    ap.add_argument("--quick", action="store_true", help="only (a) and (c) with 1 process: for development, not for the docs")
    ap.add_argument("--history-only", action="store_true", help="only the cost-by-history-length table (no broker)")
    ap.add_argument("--rubin-only", action="store_true", help="only the Rubin row (d) and its cost table")
    ap.add_argument("--rubin-n", type=int, default=5000, help="Rubin messages of (d), the templates repeated")
    a = ap.parse_args()
    if not a.no_stack and not a.history_only:
        subprocess.run([str(ROOT / "deploy" / "local" / "stack.sh"), "up"], check=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    templates, source = corpus_messages()
    if a.history_only:
        print(json.dumps(prv_cost(templates), indent=1))
        return 0
    tag = uuid.uuid4().hex[:6]
    if a.rubin_only:
        res_r = run_rubin(a, tag, work)
        print(rubin_table(res_r))
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        (out / f"rubin-{stamp}.json").write_text(json.dumps(res_r, indent=1))
        return 0
    reps = -(-a.n // len(templates))
    topic = f"bench-in-{tag}"
    total = produce_all(a.bootstrap, topic, templates, reps * len(templates), a.partitions)
    cache = SchemaCache()
    locations = []
    for msg in templates:
        al = decode_alert(msg, cache)
        s0, s1 = msg.rfind(al.science), msg.rfind(al.difference)
        locations.append((s0, len(al.science), s1, len(al.difference)))
    cfg_data = {
        "kafka": {"bootstrap_servers": a.bootstrap, "group_id": f"bench-ours-{tag}", "input_topics": [topic],
                  "output_topic": f"bench-out-{tag}", "dead_letter_topic": f"bench-dlq-{tag}"},
        "redis": {"url": a.redis, "key_prefix": f"bench{tag}", "ttl_seconds": 600},
        "batching": {"max_batch": BATCH, "max_wait_ms": 100},
        "model": {"device": a.device, "bundle_path": a.bundle, "torch_threads": a.torch_threads},
        "metrics": {"port": 0, "log_format": "text", "progress_interval_s": 10},
    }  # fmt: skip
    res: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "source": source, "messages": total,
        "device": a.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
    }  # fmt: skip
    # the local broker and Redis, if they run here (remote ones show as nan)
    ports = {"broker": int(a.bootstrap.split(",")[0].rsplit(":", 1)[-1]), "redis": urlparse(a.redis).port or 6379}
    with CpuMeter(ports) as meter:
        res["floor"] = floor_path(a.bootstrap, topic, total, locations)
    res["floor"]["cpu_s"] = meter.shares()
    if not a.quick:
        with CpuMeter(ports) as meter:
            res["naive"] = naive_path(a.bootstrap, topic, total, cfg_data, a.device)
        res["naive"]["cpu_s"] = meter.shares()
    import yaml

    # (c) with the config's similarity index (on where Redis has vector sets), and once more
    # without it, so the index's cost shows in the same run
    # (--decode-workers N: once more, 1 process decoding in N worker processes)
    runs = [(1, "auto", 0), (1, "off", 0)] if a.quick else [(1, "auto", 0), (2, "auto", 0), (1, "off", 0)]
    runs += [(1, "auto", a.decode_workers)] if a.decode_workers else []
    for procs, index, workers in runs:
        data = json.loads(json.dumps(cfg_data))
        data["kafka"]["group_id"] = f"bench-ours{procs}{index}{workers}-{tag}"
        data["redis"]["index"] = {"mode": index}
        data["batching"]["decode_workers"] = workers
        name = _run_name(procs, index, workers)
        cfg_path = work / f"config-{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        print(f"(c) ours, {procs} process(es), similarity index {index}, decode workers {workers} ...", flush=True)
        with CpuMeter(ports) as meter:
            res[name] = ours(cfg_path, procs, total, work)
        res[name]["cpu_s"] = meter.shares(res[name]["cpu_s"])
    if a.quick:
        r = {k: res[k]["alerts"] / res[k]["seconds"] for k in ("floor", *(_run_name(*r) for r in runs))}
        print(json.dumps({k: round(v) for k, v in r.items()} | {"ours_over_floor": r["ours_1"] / r["floor"],
                          "rss_mb": {k: round(v) for k, v in res["ours_1"]["memory"][0].items()},
                          "cpu_us": {k: {c: round(v / res[k]["alerts"] * 1e6) for c, v in res[k]["cpu_s"].items()} for k in ("floor", "ours_1")},
                          "ours_stage_us": {k: round(v / res["ours_1"]["alerts"] * 1e6) for k, v in res["ours_1"]["stage_s"].items()}}))  # fmt: skip
        return 0
    res["prv_candidates"] = prv_cost(templates)
    rate = {k: res[k]["alerts"] / res[k]["seconds"] for k in ("floor", "naive", "ours_1", "ours_2")}
    res["ratios"] = {
        "ours_over_floor": rate["ours_1"] / rate["floor"],
        "ours_over_naive": rate["ours_1"] / rate["naive"],
        "two_over_one": rate["ours_2"] / rate["ours_1"],
        "index_on_over_off": rate["ours_1"] / (res["ours_1_noindex"]["alerts"] / res["ours_1_noindex"]["seconds"]),
    }
    res |= run_rubin(a, tag, work)
    text = table(res) + "\n\n" + rubin_table(res)
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"throughput-{stamp}.json").write_text(json.dumps(res, indent=1))
    (out / f"throughput-{stamp}.md").write_text(f"{res['date']}, {res['machine']}, device {a.device}, {total} messages of {source}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
