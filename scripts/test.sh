#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every test tier: lint (ruff, mypy), unit and
# property tests, integration and fault tests against a real Kafka broker and Redis that the tests
# start on free loopback ports. Extra arguments go to pytest (e.g. -m "unit or integration and not
# faults"; a later -m replaces the one here).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -ra -m "unit or integration" "$@"
