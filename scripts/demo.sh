#!/usr/bin/env bash
# The main job end to end on the local default: set up, start Kafka + Redis on loopback, replay
# ZTF and Rubin alerts into one topic (../shared/ztf and ../shared/rubin when present, else
# generated ones), run the consumer until the stream is idle, and print a table of results read
# back from Redis and from the output topic.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
deploy/local/stack.sh up
source .venv/bin/activate
CONFIG="${CONFIG:-config/local.yaml}"
ALERTS="${ALERTS:-../shared/ztf/alerts}"
if [[ ! -d "$ALERTS" ]]; then
  ALERTS=.stack/generated-alerts
  python -m alerts.synthetic --out "$ALERTS" --n 500
fi
RUBIN="${RUBIN:-../shared/rubin/wire}"
if [[ ! -d "$RUBIN" ]]; then
  RUBIN=.stack/generated-rubin
  python -m alerts.synthetic_rubin --out "$RUBIN" --n 50
fi
TOPIC=$(python -c "from config import load_consumer_config; print(load_consumer_config('$CONFIG').kafka.input_topics[0])")
consumer replay "$ALERTS" --topic "$TOPIC" --config "$CONFIG"
consumer replay "$RUBIN" --topic "$TOPIC" --config "$CONFIG"   # the same topic: told apart per message
consumer run --config "$CONFIG" --idle-exit 8
consumer peek --config "$CONFIG" -n 15
# Similar-alert search (Redis 8 vector sets) for one of the alerts just processed, then the live
# subscriber's view of the output topic: the SNe above 0.8, from the beginning.
CANDID=$(python -c "
import redis; from config import load_consumer_config
c = load_consumer_config('$CONFIG'); r = redis.Redis.from_url(c.redis.url)
print(next(r.scan_iter(c.redis.key_prefix + ':cand:*', count=1000)).decode().rsplit(':', 1)[1])")
consumer similar --config "$CONFIG" --candid "$CANDID" -k 5
# ... and for a Rubin alert (its embedding; Rubin has no classifier yet: docs/rubin.md)
DIASOURCE=$(python -c "
import redis; from config import load_consumer_config
c = load_consumer_config('$CONFIG'); r = redis.Redis.from_url(c.redis.url)
print(next(r.scan_iter(c.redis.key_prefix + ':lsst:cand:*', count=1000)).decode().rsplit(':', 1)[1])")
consumer similar --config "$CONFIG" --survey lsst --candid "$DIASOURCE" -k 5
consumer subscribe --config "$CONFIG" --class SN --min-probability 0.8 --from-beginning --max 10 --idle-exit 5
