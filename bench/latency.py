"""Latency under a steady stream: a paced producer at several rates, `consumer run` end to end.

    python bench/latency.py [--rates 500,1000,2000] [--seconds 30] [--out bench/results]

For each rate, on the local stack (started if needed) and a fresh topic: `consumer run` (1 process,
the local config's batching) is started and warmed up with a few hundred alerts; then a producer
sends the real alerts at exactly that rate for ``--seconds``. The latency of an alert is the output
message's timestamp (set when the consumer produces it) minus its input message's timestamp (set
when the paced producer produced it), both CreateTime on this machine's clock, joined by the
result's ``source_partition``/``source_offset``. It includes the wait for a batch to close
(``batching.max_wait_ms``), decoding, inference, both sinks and the producer's linger. Prints
p50/p99/max per rate and the rate at which p99 passes 1 s (interpolated between the measured
rates).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus import corpus_messages  # noqa: E402

from consumer.results import decode_result  # noqa: E402

WARM_UP = 300


def read_all(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[tuple[int, int, int, bytes]]:
    """(partition, offset, timestamp ms, value) of a topic's messages, without a group."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-read-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})  # fmt: skip
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        for m in c.consume(1000, 1.0):
            if m.error() is None:
                out.append((m.partition(), m.offset(), m.timestamp()[1], m.value() or b""))
    c.close()
    return out


def one_rate(bootstrap: str, redis_url: str, msgs: list[bytes], rate: int, seconds: float, work: Path,
             cpu_precision: str = "auto") -> dict[str, Any]:
    tag = f"{rate}-{uuid.uuid4().hex[:6]}"
    topic, out_topic = f"lat-in-{tag}", f"lat-out-{tag}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1) for t in (topic, out_topic)]).values():
        f.result(30)
    local = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    cfg = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"lat-{tag}", "input_topics": [topic],
                  "output_topic": out_topic, "dead_letter_topic": f"lat-dlq-{tag}"},
        "redis": {"url": redis_url, "key_prefix": f"lat{tag}", "ttl_seconds": 600},
        "batching": local["batching"],
        "model": {"device": "cpu", "cpu_precision": cpu_precision},
        "metrics": {"port": 0, "log_format": "text", "progress_interval_s": 10},
    }  # fmt: skip
    cfg_path = work / f"latency-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = open(work / f"latency-{tag}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "consumer.cli", "run", "--config", str(cfg_path), "--idle-exit", "8"],
                            cwd=ROOT, env=dict(os.environ) | {"PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "compression.type": "lz4"})
    # warm-up: the consumer joins its group, compiles, and processes these before the clock starts
    for i in range(WARM_UP):
        producer.produce(topic, msgs[i % len(msgs)])
    producer.flush(30)
    if len(read_all(bootstrap, out_topic, WARM_UP, 180)) < WARM_UP:
        proc.kill()
        raise RuntimeError(f"consumer did not warm up; see {work}")
    sent: dict[tuple[int, int], int] = {}

    def delivered(err: Any, m: Any) -> None:
        if err is None:
            sent[(m.partition(), m.offset())] = m.timestamp()[1]

    n = int(rate * seconds)
    t0 = time.perf_counter()
    i = 0
    while i < n:  # exactly `rate` per second: every ~5 ms, what is due by now
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        while i < due:
            producer.produce(topic, msgs[i % len(msgs)], on_delivery=delivered)
            i += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush(60)
    achieved = n / (time.perf_counter() - t0)
    proc.wait(timeout=600)
    out = read_all(bootstrap, out_topic, WARM_UP + n, 120)
    lat, to_result = [], []
    for _, _, ts, value in out:
        rec = decode_result(value)
        key = (rec["source_partition"], rec["source_offset"])
        if key in sent:
            lat.append(ts - sent[key])
            processed = rec["processed_at"]
            to_result.append(processed.timestamp() * 1000 - sent[key] if hasattr(processed, "timestamp") else processed - sent[key])
    a, b = np.array(lat, dtype=np.float64), np.array(to_result, dtype=np.float64)
    return {"rate": rate, "achieved_rate": achieved, "sent": n, "measured": len(a),
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
            "to_result_p50_ms": float(np.percentile(b, 50)), "to_result_p99_ms": float(np.percentile(b, 99))}  # fmt: skip


def crossing(rows: list[dict[str, Any]], limit_ms: float = 1000.0) -> str:
    """The rate at which p99 passes ``limit_ms``, interpolated between measured rates."""
    for lo, hi in zip(rows, rows[1:], strict=False):
        if lo["p99_ms"] <= limit_ms < hi["p99_ms"]:
            f = (limit_ms - lo["p99_ms"]) / (hi["p99_ms"] - lo["p99_ms"])
            return f"~{lo['rate'] + f * (hi['rate'] - lo['rate']):.0f} alerts/s"
    if rows and rows[-1]["p99_ms"] <= limit_ms:
        return f"above {rows[-1]['rate']} alerts/s (not reached)"
    return f"below {rows[0]['rate']} alerts/s" if rows else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="500,1000,2000")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--bootstrap", default=f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}")
    ap.add_argument("--redis", default=f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0")
    ap.add_argument("--no-stack", action="store_true", help="do not run deploy/local/stack.sh up")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--cpu-precision", default="auto", choices=["auto", "fp32", "int8", "bf16"],
                    help="the consumer's model.cpu_precision (auto: the bundle's int8 graph where it has one)")
    a = ap.parse_args()
    if not a.no_stack:
        subprocess.run([str(ROOT / "deploy" / "local" / "stack.sh"), "up"], check=True)
    out = Path(a.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    msgs, _ = corpus_messages()
    rows = []
    for rate in (int(r) for r in a.rates.split(",")):
        print(f"rate {rate}/s for {a.seconds:.0f} s ...", flush=True)
        rows.append(one_rate(a.bootstrap, a.redis, msgs, rate, a.seconds, work, a.cpu_precision))
        print(json.dumps(rows[-1]), flush=True)
    batching = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())["batching"]
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Latency, {date}, {platform.machine()}, {os.cpu_count()} CPUs, batching {batching}",
        "",
        "| rate (alerts/s) | achieved | alerts | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *(f"| {r['rate']} | {r['achieved_rate']:.0f} | {r['measured']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} |"
          for r in rows),  # fmt: skip
        "",
        f"p99 passes 1 s at: {crossing(rows)}",
    ]
    text = "\n".join(lines)
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"latency-{stamp}.json").write_text(json.dumps({"date": date, "rows": rows}, indent=1))
    (out / f"latency-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
