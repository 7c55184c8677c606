"""`consumer run | replay | peek | similar | subscribe` - the daemon, the replay tool, a look at the
results, similar-alert search and a filtered live view of the output topic."""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from config import ConsumerConfig, load_consumer_config


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def ensure_topics(cfg: ConsumerConfig, topics: Sequence[str], partitions: int) -> None:
    """Create missing topics (replication 1 locally; remote clusters usually have them already)."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from consumer.clients import kafka_common

    admin = AdminClient(kafka_common(cfg.kafka))
    existing = admin.list_topics(timeout=15).topics
    new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    for topic, fut in admin.create_topics(new).items() if new else ():
        try:
            fut.result()
        except Exception as e:  # already created by a concurrent run
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise
        logging.getLogger("stampstream").info("created topic %s (%d partitions)", topic, partitions)


def cmd_run(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, Producer

    from consumer import crash_marker
    from consumer.clients import consumer_settings, producer_settings, redis_client
    from consumer.daemon import AbortRequested, NeverAssigned, StreamProcessor
    from consumer.inference import ModelRunner, inference_threads
    from consumer.kafka_sink import KafkaSink
    from consumer.log_limit import RateLimitFilter
    from consumer.metrics import Metrics, serve
    from consumer.redis_sink import RedisSink
    from consumer.vector_index import resolve_index

    cfg = load_consumer_config(args.config)
    setup_logging(cfg.metrics.log_format, cfg.metrics.log_level)
    log = logging.getLogger("stampstream.consumer")
    from alerts.message import warm_up

    warm_up()  # the compiled decoder, before the first batch (and before the health clock starts)
    threads = inference_threads(cfg.model.torch_threads)
    runner = ModelRunner(cfg.model.bundle_path, cfg.model.device, cfg.model.tta_dihedral, cfg.model.reload_check_s,
                         cfg.model.cpu_precision, threads)  # fmt: skip
    rubin_runner = None
    if cfg.rubin.bundle_path and not os.path.exists(cfg.rubin.bundle_path):
        # a ZTF-only deployment must not fail for want of Rubin's bundle; a broken one still stops the start
        log.warning("rubin.bundle_path %s does not exist: Rubin alerts become dead letters (no_model_for_survey)",
                    cfg.rubin.bundle_path)  # fmt: skip
    elif cfg.rubin.bundle_path:  # Rubin's own bundle (an encoder without a classifier today)
        from alerts.rubin_features import RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION

        rubin_runner = ModelRunner(cfg.rubin.bundle_path, cfg.model.device, None, cfg.model.reload_check_s,
                                   cfg.model.cpu_precision, threads, features=(RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION))  # fmt: skip
    from consumer.schema_registry import RubinSchemaSource

    rubin_schemas = RubinSchemaSource(cfg.rubin.schema_registry)
    metrics = Metrics()
    server = serve(metrics, cfg.metrics.host, cfg.metrics.port) if cfg.metrics.port else None
    try:
        ensure_topics(cfg, [cfg.kafka.output_topic, cfg.kafka.dead_letter_topic], partitions=args.partitions)
    except Exception as e:  # e.g. no CREATE ACL on a shared cluster: the topics must then exist already
        log.warning("could not check/create the output topics (%s); assuming they exist", e)
    # librdkafka's logs and error events, structured like ours and rate-limited (a broker outage
    # is one line per reconnect try); every error event is counted in the metrics.
    kafka_logger = logging.getLogger("stampstream.kafka")
    kafka_logger.addFilter(RateLimitFilter(cfg.metrics.client_log_interval_s))

    def on_client_error(err: object) -> None:
        metrics.kafka_client_errors.inc()
        kafka_logger.warning("kafka client error: %s", err)

    kafka_log = {"logger": kafka_logger, "error_cb": on_client_error}
    consumer = Consumer(consumer_settings(cfg.kafka) | kafka_log)
    producer = Producer(producer_settings(cfg.kafka) | kafka_log)
    rclient = redis_client(cfg.redis)
    index = resolve_index(rclient, cfg.redis.index)  # IndexUnavailable (mode "on", Redis < 8) stops here
    if index is not None:
        desc = f"vector sets ({index.quantisation}, M {index.m}, EF {index.ef_construction}, bucket {index.bucket_seconds} s)"
    else:
        desc = "off" if cfg.redis.index.mode == "off" else "off: the server has no vector sets (Redis < 8)"
    log.info("similarity index: %s", desc)
    rsink = RedisSink(rclient, cfg.redis.key_prefix, cfg.redis.ttl_seconds, index)
    ksink = KafkaSink(producer, cfg.kafka.dead_letter_topic, cfg.kafka.dead_letter_max_bytes,
                      on_rejected=lambda where: metrics.produce_rejected.labels(where).inc())  # fmt: skip
    markers = Path(tempfile.gettempdir())
    died = crash_marker.claim(markers, cfg.kafka.group_id)
    if died:
        log.warning("a previous consumer of group %s on this host died mid-run (killed or crashed)", cfg.kafka.group_id)
    proc = StreamProcessor(cfg, consumer, ksink, rsink, runner, metrics, rubin_runner=rubin_runner,
                           rubin_schemas=rubin_schemas, isolate_batches=cfg.batching.isolate_after_crash if died else 0)  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: proc.request_stop())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: stacks of all threads to stderr
    log.info(
        "consumer starting: topics=%s group=%s model=%s:%s device=%s rubin=%s registry=%s batch=%d/%dms metrics=%s",
        list(cfg.kafka.input_topics), cfg.kafka.group_id, runner.name, runner.version, f"{runner.device} {runner.precision}",
        f"{rubin_runner.name}:{rubin_runner.version}" if rubin_runner else "off (dead letters)",
        cfg.rubin.schema_registry.url or "none (packaged schemas)",
        cfg.batching.max_batch, cfg.batching.max_wait_ms,
        f"http://{cfg.metrics.host}:{server.server_port}/metrics" if server else "off",
    )  # fmt: skip
    proc.subscribe()
    code = 0
    try:
        stats = proc.run(max_alerts=args.max_alerts, idle_exit_s=args.idle_exit)
        if args.stats_json:
            write_stats(args.stats_json, stats)
        log.info(
            "consumer stopped: in=%d out=%d dead=%d reasons=%s elapsed=%.1fs",
            stats.alerts_in, stats.alerts_out, stats.dead_letters, dict(stats.dead_reasons), stats.elapsed_s,
        )  # fmt: skip
    except AbortRequested as e:
        log.error("aborted without committing the batch in hand: %s", e)
        code = 1
    except NeverAssigned as e:
        log.error("%s: nothing was read (is the topic there, is another member holding it?)", e)
        code = 2
    finally:
        producer.flush(10)
        consumer.close()
        if server:
            server.shutdown()
        crash_marker.release(markers, cfg.kafka.group_id)  # every exit Python sees is not a crash
    return code


def write_stats(path: str, stats: object) -> None:
    """Counters, per-stage seconds and peak RSS of the run, for benchmarks and backfill reports."""
    import dataclasses
    import resource

    data = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}  # type: ignore[arg-type]
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child of a big process reports
    # its parent's peak.
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        data["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    except (OSError, StopIteration):
        data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def cmd_replay(args: argparse.Namespace) -> int:
    from confluent_kafka import Producer
    from tqdm import tqdm

    from alerts.files import iter_messages
    from consumer.clients import produce, replay_producer_settings

    cfg = load_consumer_config(args.config)
    setup_logging("text", "INFO")
    if args.bootstrap:
        cfg = _with_bootstrap(cfg, args.bootstrap)
    ensure_topics(cfg, [args.topic], partitions=args.partitions)
    producer = Producer(replay_producer_settings(cfg.kafka))
    messages = iter_messages(args.paths)
    if args.repeat > 1:
        cached = list(messages)
        messages = itertools.chain.from_iterable(itertools.repeat(cached, args.repeat))
    if args.limit:
        messages = itertools.islice(messages, args.limit)
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    n = 0
    for value in tqdm(messages, desc=f"replay -> {args.topic}", unit="alert", disable=args.quiet):
        produce(producer, args.topic, value, on_delivery=on_delivery)
        producer.poll(0)
        n += 1
    left = producer.flush(60)
    if left or failures:
        print(f"replay: {left} undelivered, {len(failures)} failed: {failures[:3]}", file=sys.stderr)
        return 1
    print(f"replayed {n} alerts into {args.topic}")
    return 0


def _with_bootstrap(cfg: ConsumerConfig, bootstrap: str) -> ConsumerConfig:
    import dataclasses

    return dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka, bootstrap_servers=bootstrap))


def cmd_peek(args: argparse.Namespace) -> int:
    """A short table of results read back from Redis and from the output topic."""
    from consumer.peek import peek

    cfg = load_consumer_config(args.config)
    print(peek(cfg, args.n))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    """The alerts most like one alert, from the vector index in Redis."""
    from consumer.clients import redis_client
    from consumer.vector_index import IndexUnavailable, NotFound, similar

    cfg = load_consumer_config(args.config)
    try:
        ans = similar(
            redis_client(cfg.redis), cfg.redis.key_prefix, cfg.redis.index, cfg.redis.ttl_seconds,
            candid=args.candid, object_id=args.objectId, k=args.k, cls=args.cls,
            include_same_object=args.include_same_object, survey=args.survey,
        )  # fmt: skip
    except (NotFound, IndexUnavailable) as e:
        print(f"similar: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"candid": ans.candid, "objectId": ans.object_id, "model": ans.model,
                          "neighbours": [n.as_dict() for n in ans.neighbours]}))  # fmt: skip
        return 0
    print(f"neighbours of candid {ans.candid} ({ans.object_id}), model {ans.model}, {ans.searched_sets} sets searched")
    print(f"{'#':>3}  {'distance':>8}  {'candid':<20}  {'objectId':<13}  {'class':<9}  {'p':>5}  {'jd':>15}")
    for i, n in enumerate(ans.neighbours, 1):
        print(f"{i:>3}  {n.distance:8.4f}  {n.candid:<20}  {n.object_id:<13}  {n.predicted_class:<9}  "
              f"{n.probability:5.3f}  {n.jd:15.5f}")  # fmt: skip
    if not ans.neighbours:
        print("  (none: is the index on? see `similarity index` in the daemon's log)")
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    """A filtered live view of the output topic: a table, or JSON lines."""
    from consumer.subscribe import ResultFilter, json_ready, subscribe, table_header, table_row

    cfg = load_consumer_config(args.config)
    flt = ResultFilter(tuple(args.cls or ()), args.min_probability, tuple(args.survey or ()), args.min_detections)
    n = 0
    if not args.json:
        print(table_header(), flush=True)
    try:
        for rec in subscribe(cfg, flt, from_beginning=args.from_beginning, group_id=args.group,
                             idle_timeout_s=args.idle_exit):  # fmt: skip
            if args.json:
                print(json.dumps(json_ready(rec)), flush=True)
            else:
                print(table_row(rec), flush=True)
            n += 1
            if args.max and n >= args.max:
                break
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="consumer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the long-running consumer daemon")
    r.add_argument("--config", required=True)
    r.add_argument("--max-alerts", type=int, default=None, help="exit after this many input messages")
    r.add_argument("--idle-exit", type=float, default=None, help="exit after SECONDS without a message")
    r.add_argument("--partitions", type=int, default=2, help="partitions of the output topics if created")
    r.add_argument("--stats-json", default=None, help="write the run's counters and stage times here at exit")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("replay", help="produce alerts from files/folders/archives into a topic")
    rp.add_argument("paths", nargs="+")
    rp.add_argument("--topic", required=True)
    rp.add_argument("--config", default=None, help="for bootstrap/security settings (default: local)")
    rp.add_argument("--bootstrap", default=None)
    rp.add_argument("--partitions", type=int, default=2, help="partitions if the topic is created")
    rp.add_argument("--repeat", type=int, default=1, help="replay the whole input N times")
    rp.add_argument("--limit", type=int, default=0)
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=cmd_replay)
    pk = sub.add_parser("peek", help="print the latest results from Redis and the output topic")
    pk.add_argument("--config", required=True)
    pk.add_argument("-n", type=int, default=10)
    pk.set_defaults(func=cmd_peek)
    sm = sub.add_parser("similar", help="the alerts most similar to one alert (vector index in Redis)")
    sm.add_argument("--config", required=True)
    which = sm.add_mutually_exclusive_group(required=True)
    which.add_argument("--candid", type=int)
    which.add_argument("--objectId", help="the object's latest alert")
    sm.add_argument("--survey", choices=["ztf", "lsst"], default="ztf", help="whose keys (--candid: a diaSourceId for lsst)")
    sm.add_argument("-k", type=int, default=10)
    sm.add_argument("--class", dest="cls", default=None, help="only neighbours predicted as this class")
    sm.add_argument("--include-same-object", action="store_true", help="keep the query's own object's alerts")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=cmd_similar)
    sb = sub.add_parser("subscribe", help="follow the output topic, filtered (own consumer group)")
    sb.add_argument("--config", required=True)
    sb.add_argument("--class", dest="cls", action="append", help="predicted class to keep (repeatable)")
    sb.add_argument("--min-probability", type=float, default=0.0)
    sb.add_argument("--survey", action="append", choices=["ztf", "lsst"], help="survey to keep (repeatable; default: both)")
    sb.add_argument("--min-detections", type=int, default=0,
                    help="only objects detected at least N times (ndethist): younger ones are classed on little or no history")  # fmt: skip
    sb.add_argument("--from-beginning", action="store_true")
    sb.add_argument("--group", default=None, help="a named group resumes where it stopped (default: a fresh one)")
    sb.add_argument("--json", action="store_true", help="JSON lines instead of the table")
    sb.add_argument("--max", type=int, default=0, help="stop after N records")
    sb.add_argument("--idle-exit", type=float, default=None, help="stop after SECONDS without a message")
    sb.set_defaults(func=cmd_subscribe)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
