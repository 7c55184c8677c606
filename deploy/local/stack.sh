#!/usr/bin/env bash
# Local stack for development, tests and benchmarks: one Apache Kafka 4.x broker in KRaft mode
# (combined broker+controller, run straight from its Maven Central jars) and one redis-server,
# both bound to 127.0.0.1, with all their state in one folder.
#
#   deploy/local/stack.sh up|down|status
#   deploy/local/stack.sh stop kafka|redis     # fault injection: stop one service, keep its data
#   deploy/local/stack.sh start kafka|redis    # start it again on the same data
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), REDIS_PORT (6379),
# STACK_STATE (state folder, default .stack in the repository root), KAFKA_HEAP (512m).
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
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
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
  *) echo "usage: $0 up|down|status|stop SVC|start SVC|jars" >&2; exit 2 ;;
esac
