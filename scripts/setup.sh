#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: Debian's redis-server (and Java 17 + Maven, OpenMP if
# missing), a Python virtual environment with the pinned packages, and the Kafka jars.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
# LightGBM (the trainer's trees) links the system's OpenMP runtime
compgen -G '/usr/lib/*/libgomp.so.1' >/dev/null || compgen -G '/lib/*/libgomp.so.1' >/dev/null || need_apt+=(libgomp1)
if ((${#need_apt[@]})); then
  echo "[setup] installing ${need_apt[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, confluent_kafka, fastavro, redis, consumer.cli, alerts.decoder" 2>/dev/null \
   || ! cat requirements.txt requirements-nodeps.txt | cmp -s - .venv/.requirements.installed; then
  echo "[setup] installing Python packages (torch is a large download the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --progress-bar off -r requirements.txt
  .venv/bin/python -m pip install -q --progress-bar off --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || .venv/bin/python -m pip install -q --no-deps -e .
  cat requirements.txt requirements-nodeps.txt > .venv/.requirements.installed
fi
deploy/local/stack.sh jars
# Redis 8 for the similarity index; without it (no pinned build for this CPU) the stack runs
# Debian's 7.0 and the consumer writes plain hashes.
deploy/local/stack.sh redis8 || echo "[setup] no Redis 8: similar-alert search stays off"
echo "[setup] ready"
