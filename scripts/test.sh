#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every test tier: lint, unit and property
# tests, integration and fault tests against a real Kafka broker and Redis that the tests start
# on free loopback ports. Extra arguments go to pytest (e.g. -m "not faults").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -ra "$@"
