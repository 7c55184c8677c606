"""Shared fixtures: the alert corpus (real from ../shared/ztf when present, generated otherwise) and
the real Kafka broker + Redis, started once per session through deploy/local/stack.sh on free ports.

Tiers: every test outside tests/integration is marked ``unit`` here; plain ``pytest`` runs the unit
tier only (pyproject's addopts), ``pytest -m integration`` the real-service tier, ``-m faults``
its slow fault-injection part, and ``scripts/test.sh`` all of them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STAMPSTREAM_SHARED", ROOT.parent / "shared" / "ztf"))
ALERTS_DIR = SHARED / "alerts"
EDGE_DIR = SHARED / "edge"
HAVE_SHARED = ALERTS_DIR.is_dir()
STACK = ROOT / "deploy" / "local" / "stack.sh"

sys.path.insert(0, str(ROOT / "tests"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" not in item.keywords:
            item.add_marker(pytest.mark.unit)


def real_messages() -> list[bytes]:
    from alerts.files import iter_messages

    return list(iter_messages([ALERTS_DIR]))


@pytest.fixture(scope="session")
def corpus() -> list[bytes]:
    """Every real alert of ../shared/ztf/alerts as a wire message, or 64 generated ones without it."""
    if HAVE_SHARED:
        return real_messages()
    from alerts.synthetic import make_alerts

    return [a.message for a in make_alerts(64)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    bootstrap: str
    redis_url: str
    env: dict[str, str]

    def ctl(self, *args: str) -> None:
        subprocess.run([str(STACK), *args], env=self.env, check=True, timeout=300)

    def config(self, tmp_path: Path, **overrides: Any) -> tuple[Path, dict[str, Any]]:
        """A config file with fresh topics and group for one test; returns (path, dict)."""
        tag = uuid.uuid4().hex[:8]
        data: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": f"test-{tag}",
                "input_topics": [f"in-{tag}"],
                "output_topic": f"out-{tag}",
                "dead_letter_topic": f"dlq-{tag}",
                "session_timeout_ms": 10000,
            },
            "redis": {"url": self.redis_url, "key_prefix": f"t{tag}", "ttl_seconds": 3600, "socket_timeout_s": 2.0},
            "batching": {"max_batch": 64, "max_wait_ms": 100, "retry_initial_s": 0.2, "retry_max_s": 2.0},
            "model": {"bundle_path": str(ROOT / "model" / "bundles" / "default.pt"), "device": "cpu", "reload_check_s": 1.0},
            "metrics": {"port": 0, "progress_interval_s": 5, "log_format": "text", "lag_interval_s": 2},
        }
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        path = tmp_path / f"config-{tag}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, data


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real Kafka (KRaft) and Redis on loopback, for this test session only."""
    if os.environ.get("STAMPSTREAM_TEST_BOOTSTRAP") and os.environ.get("STAMPSTREAM_TEST_REDIS_URL"):
        yield Stack(os.environ["STAMPSTREAM_TEST_BOOTSTRAP"], os.environ["STAMPSTREAM_TEST_REDIS_URL"], dict(os.environ))
        return
    kport, cport, rport = _free_port(), _free_port(), _free_port()
    env = dict(os.environ) | {
        "KAFKA_PORT": str(kport),
        "KAFKA_CONTROLLER_PORT": str(cport),
        "REDIS_PORT": str(rport),
        "STACK_STATE": str(tmp_path_factory.mktemp("stack")),
    }
    s = Stack(f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0", env)
    s.ctl("up")
    try:
        _wait_kafka_ready(s.bootstrap)
        yield s
    finally:
        subprocess.run([str(STACK), "down"], env=env, timeout=120, check=False)


def _wait_kafka_ready(bootstrap: str, timeout_s: float = 60.0) -> None:
    """The port opens before the group coordinator is ready: wait until a group operation works."""
    import time

    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=5)
            admin.list_consumer_groups(request_timeout=5).result()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
