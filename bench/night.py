"""A night of ZTF through the real broker and both sinks: one million distinct alerts by default.

    python bench/night.py [--n 1000000] [--rate 2000] [--kill-at 0.5] [--redis-outage 0.5:30] [--no-stack] [--keep]

Why: the throughput benchmark repeats the 2,134 real alerts, so its Redis holds 2,134 keys
whatever it replays, and its runs last seconds. A broker runs the consumer for whole nights of a
million alerts or more, where what matters is whether it keeps up all night, its memory stays
flat and Redis grows as docs/similarity.md says. Here every copy of a real alert (generated ones
without ../shared) gets a candid and an objectId of its own (``alerts.synthetic.relabelled``: the
same bytes otherwise), so each is a new hash, a new per-object entry and a new element of the
similarity index, kept for the production TTL (7 days).

The alerts arrive at --rate alerts/s while one `consumer run` reads them, as on a night (ZTF's
bursts pass 1,300 alerts/s); the input topic keeps its last 6 GB per partition, so the broker's
log stays bounded (a real alert is ~75 KB). ``--rate 0`` produces the whole night first and then
drains it, as after an outage: the consumer flat out, and ~75 GB of broker log for a million.

``--kill-at 0.5`` kills the consumer with SIGKILL halfway through the night and starts it again
(a static group member, as deploy/k8s runs it): the checks then say whether a crash lost or
doubled anything in Redis (the output topic may hold the batches in hand again: at least once).
``--redis-outage 0.5:30`` stops the local stack's Redis for 30 s halfway and starts it again on
its data: the consumer must pause, hold no more than its batches in hand, and catch up.

Sampled every 5 s from outside: alerts produced and committed (the group's offsets), the
consumer's RSS and CPU time, Redis's used memory. Printed per tenth of the night: the rate, the
lag behind the producer, the consumer's CPU, RSS and Redis memory; then the checks: every
candid's hash in Redis, N records in the output topic, no dead letter, offsets committed to the
end. Writes Markdown and JSON to --out. Without --keep the run's topics and Redis keys are
deleted at the end (~1.7 GB of Redis for a million alerts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
import yaml
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from corpus import corpus_messages  # noqa: E402
from tqdm import tqdm

from alerts.decoder import SchemaCache, decode_alert  # noqa: E402
from alerts.synthetic import relabelled  # noqa: E402
from consumer.clients import produce  # noqa: E402
from consumer.redis_keys import candid_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TTL = 7 * 24 * 3600
# A new candid per copy: the template's own plus copy x STEP (odd, so that two templates' copies
# collide only if their candids differ by a multiple of it; checked), 9 varint bytes as ZTF's.
STEP = 1_000_003
SAMPLE_S = 5.0


def ids(template: int, copy: int, candid: int, object_id: str, n_templates: int) -> tuple[int, str]:
    """Copy ``copy`` of a template: its candid moved by copy x STEP, its objectId's 7 letters
    replaced by a base-26 number unique to (template, copy); the year digits kept."""
    k = copy * n_templates + template
    letters = ""
    for _ in range(7):
        k, r = divmod(k, 26)
        letters = chr(ord("a") + r) + letters
    return candid + copy * STEP, object_id[:5] + letters


def templates_with_ids() -> tuple[list[bytes], list[tuple[int, str]], str]:
    messages, source = corpus_messages()
    cache = SchemaCache()
    alerts = [decode_alert(m, cache) for m in messages]
    return messages, [(a.candid, a.object_id) for a in alerts], source


class NightProducer(threading.Thread):
    """Produces n distinct alerts at ``rate`` alerts/s (0: as fast as it can), counting them."""

    def __init__(self, bootstrap: str, topic: str, n: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.n, self.rate = bootstrap, topic, n, rate
        self.messages, self.olds, self.source = templates_with_ids()
        k = len(self.messages)
        # every copy's candid (ids()), known before the night starts, and checked distinct
        i = np.arange(n)
        self.candids = np.array([c for c, _ in self.olds], dtype=np.int64)[i % k] + (i // k) * STEP
        if len(np.unique(self.candids)) != n:
            raise RuntimeError("two copies would share a candid: choose another STEP")
        self.produced, self.bytes = 0, 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e

    def _run(self) -> None:
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 20, "batch.size": 1_000_000})
        k = len(self.messages)
        t0 = time.monotonic()
        for i in range(self.n):
            if self.rate and i % 100 == 0:
                ahead = t0 + i / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            t, copy = i % k, i // k
            new = ids(t, copy, self.olds[t][0], self.olds[t][1], k)
            value = relabelled(self.messages[t], self.olds[t], new)
            produce(p, self.topic, value, key=new[1].encode())
            self.bytes += len(value)
            self.produced = i + 1
        if p.flush(300) != 0:
            raise RuntimeError("the producer could not deliver every alert")


def committed(bootstrap: str, group: str, topic: str, partitions: int, tries: int = 1) -> int | None:
    """Offsets the group has committed on the topic, summed (what the consumer has finished);
    None while the group's coordinator cannot answer (it is loading, or moving)."""
    for attempt in range(tries):
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            return sum(max(tp.offset, 0) for tp in got)
        except KafkaException:
            if attempt + 1 < tries:
                time.sleep(1)
        finally:
            c.close()
    return None


def high_watermarks(bootstrap: str, topic: str) -> int:
    """Records in a topic, summed over its partitions (0 for a topic nobody created)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"night-hw-{uuid.uuid4().hex[:6]}"})
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions)
    finally:
        c.close()


def run_night(cfg_path: Path, work: Path, producer: NightProducer, group: str, partitions: int,
              r: redis.Redis, backlog: bool, kill_at: float | None,
              redis_outage: RedisOutage | None) -> tuple[float, list[dict[str, float]], dict[str, float] | None]:  # fmt: skip
    """The producer and `consumer run` (until caught up), sampled every SAMPLE_S. With ``kill_at``
    the consumer is killed with SIGKILL once that fraction of the night is committed and started
    again, as a crash and its restart would; ``redis_outage`` is started once its fraction of the
    night is committed. Returns when the consumer started, the samples, and when the consumer was
    killed (and when commits resumed)."""
    bootstrap, topic, n = producer.bootstrap, producer.topic, producer.n
    if backlog:  # the whole night first, as after an outage
        producer.run()

    def start(i: int) -> subprocess.Popen[bytes]:
        with open(work / f"night-consumer-{i}.log", "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "run", "--config", str(cfg_path), "--idle-exit", "20",
                 "--stats-json", str(work / f"night-stats-{i}.json")],
                cwd=ROOT, env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    started = time.time()
    proc = start(0)
    if not backlog:
        producer.start()
    samples: list[dict[str, float]] = []
    killed: dict[str, float] | None = None
    cpu_before = 0.0  # CPU seconds of the killed process, at its last sample
    ps = psutil.Process(proc.pid)
    bar = tqdm(total=n, desc="consumer run", unit="alert")
    while proc.poll() is None:
        if producer.error is not None:
            proc.terminate()
            raise RuntimeError("the producer failed") from producer.error
        done = committed(bootstrap, group, topic, partitions)
        try:
            rss, cpu = ps.memory_info().rss / 2**20, ps.cpu_times()
        except psutil.Error:
            break
        if done is not None:
            samples.append({"t": time.time(), "produced": producer.produced, "committed": done, "rss_mb": rss,
                            "cpu_s": cpu_before + cpu.user + cpu.system,
                            "redis_mb": redis_mb(r)})  # fmt: skip
            bar.update(done - bar.n)
            if killed is None and kill_at is not None and done >= kill_at * n:
                proc.kill()
                proc.wait()
                killed = {"t": time.time(), "committed": float(done)}
                cpu_before = samples[-1]["cpu_s"]
                proc = start(1)
                ps = psutil.Process(proc.pid)
                continue
            if redis_outage is not None and redis_outage.ident is None and done >= redis_outage.at * n:
                redis_outage.start()
            if killed is not None and "resumed_after_s" not in killed and done > killed["committed"]:
                killed["resumed_after_s"] = time.time() - killed["t"]
        time.sleep(SAMPLE_S if killed is None or "resumed_after_s" in killed else 0.5)
    bar.close()
    if proc.wait() != 0:
        raise RuntimeError(f"consumer exited {proc.returncode}; see {work}/night-consumer-*.log")
    if producer.error is not None:
        raise RuntimeError("the producer failed") from producer.error
    last = dict(samples[-1]) | {"t": time.time(), "committed": committed(bootstrap, group, topic, partitions, tries=30) or 0}
    samples.append(last | {"redis_mb": redis_mb(r)})
    if redis_outage is not None and redis_outage.ident is not None:
        redis_outage.join()
    return started, samples, killed


def redis_mb(r: redis.Redis) -> float:
    """Redis's used memory, NaN while it is down (the outage of --redis-outage)."""
    try:
        return int(r.info("memory")["used_memory"]) / 2**20
    except redis.RedisError:
        return float("nan")


class RedisOutage(threading.Thread):
    """Stops the local stack's Redis for ``seconds`` and starts it again on its data (its
    append-only file), as `deploy/local/stack.sh stop|start redis` does in the fault tests; the
    night starts it once the fraction ``at`` of its alerts is committed."""

    def __init__(self, at: float, seconds: float) -> None:
        super().__init__(daemon=True)
        self.at, self.seconds = at, seconds
        self.times: dict[str, float] = {}

    def run(self) -> None:
        stack = str(ROOT / "deploy" / "local" / "stack.sh")
        self.times["stopped"] = time.time()
        subprocess.run([stack, "stop", "redis"], check=True, capture_output=True)
        time.sleep(self.seconds)
        subprocess.run([stack, "start", "redis"], check=True, capture_output=True)
        self.times["back"] = time.time()


def outage_effect(samples: list[dict[str, float]], down: dict[str, float]) -> dict[str, float]:
    """The largest lag after Redis stopped, and how long after it came back the lag was down to
    what it was before the outage."""
    before = [s["produced"] - s["committed"] for s in samples if s["t"] < down["stopped"]]
    usual = max(before[-6:]) if before else 0.0
    after = [s for s in samples if s["t"] >= down["stopped"]]
    caught = next((s["t"] for s in after if s["t"] >= down.get("back", float("inf")) and s["produced"] - s["committed"] <= usual), float("nan"))
    return {"max_lag": max((s["produced"] - s["committed"] for s in after), default=0.0),
            "caught_up_after_s": caught - down.get("back", float("nan"))}  # fmt: skip


def tenths(samples: list[dict[str, float]], n: int, t_start: float) -> list[dict[str, float]]:
    """Per tenth of the night (by alerts committed): its rate, the lag behind the producer and the
    consumer's CPU over it, RSS and Redis memory at its end (the first sample past it)."""
    rows, prev = [], {"t": t_start, "committed": 0.0, "cpu_s": samples[0]["cpu_s"]}
    for k in range(1, 11):
        s = next((s for s in samples if s["committed"] >= n * k // 10), samples[-1])
        dt_s = max(s["t"] - prev["t"], 1e-9)
        rows.append({"tenth": k, "alerts": s["committed"], "alerts_per_s": (s["committed"] - prev["committed"]) / dt_s,
                     "lag": s["produced"] - s["committed"], "cpu_percent": 100 * (s["cpu_s"] - prev["cpu_s"]) / dt_s,
                     "rss_mb": s["rss_mb"], "redis_mb": s["redis_mb"]})  # fmt: skip
        prev = s
    return rows


def missing_in_redis(r: redis.Redis, prefix: str, candids: list[int]) -> int:
    missing = 0
    for i in range(0, len(candids), 10_000):
        pipe = r.pipeline(transaction=False)
        for c in candids[i : i + 10_000]:
            pipe.exists(candid_key(prefix, c))
        missing += sum(1 for e in pipe.execute() if not e)
    return missing


def clean(bootstrap: str, topics: list[str], r: redis.Redis, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.delete_topics(topics).values():
        try:
            f.result(60)
        except Exception as e:  # noqa: BLE001 - a topic never created (no dead letters) is fine
            print(f"delete: {e}", file=sys.stderr)
    for keys in _batched(r.scan_iter(match=f"{prefix}:*", count=10_000), 10_000):
        r.unlink(*keys)


def _batched(it: Any, n: int) -> Any:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def table(res: dict[str, Any]) -> str:
    lines = ["| tenth | alerts done | alerts/s in it | lag behind the producer | consumer CPU % | consumer RSS MiB | Redis used MiB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in res["tenths"]:
        lines.append(f"| {t['tenth']} | {t['alerts']:,} | {t['alerts_per_s']:,.0f} | {t['lag']:,} | {t['cpu_percent']:.0f} "
                     f"| {t['rss_mb']:.0f} | {t['redis_mb']:.0f} |")  # fmt: skip
    s, c = res["summary"], res["checks"]
    arrival = "as fast as it could, before the consumer started" if not res["rate"] else f"at {res['rate']:,} alerts/s"
    k = res["killed"]
    killed = "" if k is None else (f" The consumer was killed (SIGKILL) after {k['committed']:,.0f} alerts and started again; "
                                   f"commits resumed {k.get('resumed_after_s', float('nan')):.1f} s later.")  # fmt: skip
    o = res.get("redis_outage")
    if o:
        killed += (f" Redis was stopped for {o['back'] - o['stopped']:.0f} s (back on its data after a restart); the lag "
                   f"peaked at {o['max_lag']:,.0f} alerts and was back to its usual level {o['caught_up_after_s']:.0f} s "
                   f"after Redis returned.")  # fmt: skip
    lines += [
        "",
        f"{res['n']:,} distinct alerts ({res['gb_sent']:.1f} GB) of {res['source']}, produced {arrival}, "
        f"all committed {s['consume_s']:.0f} s after the consumer started (**{s['alerts_per_s']:,.0f} alerts/s**; the last tenth at "
        f"{s['rate_last_over_first']:.2f}× the first's rate); consumer CPU {s['cpu_us_per_alert']:.0f} µs/alert; "
        f"peak RSS {s['peak_rss_mb']:.0f} MiB (RSS last tenth − first tenth: {s['rss_growth_mb']:+.0f} MiB); "
        f"Redis +{s['redis_bytes_per_alert']:,.0f} B/alert.{killed}",
        f"Checks: hashes missing in Redis {c['missing_in_redis']}, output records {c['output_records']:,} "
        f"(expected {res['n']:,}), dead letters {c['dead_letters']}, committed {c['committed']:,} of {res['n']:,}.",
    ]
    return "\n".join(lines)


def create_input_topic(bootstrap: str, topic: str, partitions: int, backlog: bool) -> None:
    """The night's topic; paced, it keeps its last 6 GB per partition (256 MB segments, deleted
    5 s after retention drops them instead of 60), so the broker's log stays bounded while the
    consumer keeps up: ~9 GB per partition at 2,000 alerts/s with the local stack's retention
    check every 30 s (deploy/local/stack.sh). The checks would show an alert that retention took
    before the consumer read it."""
    config = {} if backlog else {"retention.bytes": str(6 << 30), "segment.bytes": str(256 << 20), "file.delete.delay.ms": "5000"}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config)]).values():
        f.result(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="distinct alerts in the night")
    ap.add_argument("--rate", type=float, default=2000, help="alerts/s of the producer; 0: the whole night first (a backlog)")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--bootstrap", default=f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}")
    ap.add_argument("--redis", default=f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0")
    ap.add_argument("--bundle", default=str(ROOT / "model" / "bundles" / "default.npz"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-stack", action="store_true", help="do not run deploy/local/stack.sh up")
    ap.add_argument("--keep", action="store_true", help="keep the run's topics and Redis keys")
    ap.add_argument("--redis-outage", default=None, metavar="FRACTION:SECONDS",
                    help="stop the local stack's Redis for SECONDS once FRACTION of the night is committed")
    ap.add_argument("--kill-at", type=float, default=None,
                    help="kill the consumer with SIGKILL once this fraction of the night is committed, and start it again")
    a = ap.parse_args()
    backlog = a.rate <= 0
    state = Path(os.environ.get("STACK_STATE", ROOT / ".stack"))
    # the broker's log: ~75 KB per real alert, all of them in a backlog, ~9 GB per partition paced
    need = 1.2 * (a.n * 75_000 if backlog else min(a.n * 75_000, a.partitions * 9e9))
    free = shutil.disk_usage(state if state.exists() else ROOT).free
    if free < need:
        print(f"needs ~{need / 1e9:.0f} GB free for the broker's log, has {free / 1e9:.0f} GB", file=sys.stderr)
        return 2
    if not a.no_stack:
        subprocess.run([str(ROOT / "deploy" / "local" / "stack.sh"), "up"], check=True)
    out = Path(a.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    topic, group, prefix = f"night-in-{tag}", f"night-{tag}", f"night{tag}"
    topics = [topic, f"night-out-{tag}", f"night-dlq-{tag}"]
    r = redis.Redis.from_url(a.redis)
    create_input_topic(a.bootstrap, topic, a.partitions, backlog)
    producer = NightProducer(a.bootstrap, topic, a.n, a.rate)
    cfg = {
        # a static member, as deploy/k8s runs it (the pod's name): a restarted consumer takes its
        # partitions back at once instead of after the dead member's session timeout (45 s)
        "kafka": {"bootstrap_servers": a.bootstrap, "group_id": group, "input_topics": [topic],
                  "output_topic": topics[1], "dead_letter_topic": topics[2], "group_instance_id": f"{group}-0"},
        "redis": {"url": a.redis, "key_prefix": prefix, "ttl_seconds": TTL},
        "model": {"bundle_path": a.bundle},
        "metrics": {"port": 0, "log_format": "text", "progress_interval_s": 60},
    }  # fmt: skip
    cfg_path = work / f"night-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    redis_before = int(r.info("memory")["used_memory"])
    try:
        at, _, seconds = (a.redis_outage or "").partition(":")
        outage = RedisOutage(float(at), float(seconds)) if a.redis_outage else None
        t_start, samples, killed = run_night(cfg_path, work, producer, group, a.partitions, r, backlog, a.kill_at, outage)
        down = None if outage is None else outage.times
        redis_after = int(r.info("memory")["used_memory"])
        stats = json.loads((work / f"night-stats-{0 if killed is None else 1}.json").read_text())
        t_done = next(s["t"] for s in samples if s["committed"] >= a.n)
        rows = tenths(samples, a.n, t_start)
        res: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "n": a.n, "rate": a.rate,
            "source": producer.source, "gb_sent": producer.bytes / 1e9, "killed": killed,
            "redis_outage": None if down is None else down | outage_effect(samples, down),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "tenths": rows,
            "summary": {
                "consume_s": t_done - t_start,
                "alerts_per_s": a.n / (t_done - t_start),
                "rate_last_over_first": rows[-1]["alerts_per_s"] / rows[0]["alerts_per_s"],
                "cpu_us_per_alert": samples[-1]["cpu_s"] / a.n * 1e6,
                "peak_rss_mb": max([stats["peak_rss_mb"], *(s["rss_mb"] for s in samples)]),
                "rss_growth_mb": rows[-1]["rss_mb"] - rows[0]["rss_mb"],
                "redis_bytes_per_alert": (redis_after - redis_before) / a.n,
            },
            "checks": {
                "missing_in_redis": missing_in_redis(r, prefix, producer.candids.tolist()),
                "output_records": high_watermarks(a.bootstrap, topics[1]),
                "dead_letters": high_watermarks(a.bootstrap, topics[2]),
                "committed": committed(a.bootstrap, group, topic, a.partitions, tries=30),
            },
            "consumer_stats": stats,
        }  # fmt: skip
    finally:
        if not a.keep:
            clean(a.bootstrap, topics, r, prefix)
    text = table(res)
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"night-{stamp}.json").write_text(json.dumps(res | {"samples": samples}, indent=1))
    (out / f"night-{stamp}.md").write_text(f"{res['date']}, {res['machine']}\n\n{text}\n")
    c = res["checks"]
    return 0 if c["missing_in_redis"] == 0 and c["committed"] == a.n and c["dead_letters"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
