"""The decode stage in worker processes (consumer/decoding.py): the same outcome as in the main
process for every message, good or hostile; a worker killed by a message costs that message
alone (a dead letter), and a dead worker is replaced."""

from __future__ import annotations

import os
import signal
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pytest
from attacks import HANG_WORKER, KILL_WORKER, all_attacks, decode_or_die

from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.limits import DecodeLimits
from alerts.rubin import RubinSchemaCache
from alerts.synthetic import make_alert
from alerts.synthetic_rubin import make_rubin_message
from consumer.decoding import (
    DecodePool,
    Outcome,
    decode_one,
)

START = 2_400_000_000_000_009_000


@pytest.fixture(scope="module")
def values() -> list[bytes | None]:
    good = [make_alert(START + i, n_prv=i % 4).message for i in range(12)]
    rubin = [make_rubin_message(1000, 170_000_000_000_000_000 + i, seed=i, n_prv=2) for i in range(3)]
    hostile: list[bytes | None] = [m for _, m, _ in all_attacks(START + 100)]
    return good[:6] + hostile + rubin + [b"", None, b"garbage"] + good[6:]


def same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, BadAlertError) or isinstance(b, BadAlertError):
        return (type(a), getattr(a, "reason", None), getattr(a, "candid", None), str(a)) == (
            type(b), getattr(b, "reason", None), getattr(b, "candid", None), str(b))  # fmt: skip
    (alert_a, stamp_a, feat_a), (alert_b, stamp_b, feat_b) = a, b
    return (alert_a.candid == alert_b.candid and alert_a.object_id == alert_b.object_id
            and np.array_equal(stamp_a.pixels, stamp_b.pixels, equal_nan=True)
            and np.array_equal(feat_a, feat_b, equal_nan=True))  # fmt: skip


def test_workers_give_what_the_main_process_gives(values: list[bytes | None]) -> None:
    here = [decode_one(v, SchemaCache(), RubinSchemaCache()) for v in values]
    pool = DecodePool(2, DecodeLimits(), chunk=5)
    try:
        beats: list[int] = []
        there = pool.decode(values, beat=lambda: beats.append(1))
        block = pool._memory.name if pool._memory else ""
    finally:
        pool.close()
    with pytest.raises(FileNotFoundError):  # the shared block is gone with the pool
        shared_memory.SharedMemory(block)
    assert len(there) == len(values) and all(same(a, b) for a, b in zip(here, there, strict=True))
    assert sum(not isinstance(o, BadAlertError) for o in there) == 15  # 12 ZTF + 3 Rubin
    assert len(beats) == -(-len(values) // 5)  # one per chunk
    ztf = [o for o in there if not isinstance(o, BadAlertError) and o[0].survey == "ztf"]
    assert all(o[0].science is None and o[0].difference is None for o in ztf)  # the cut bytes stay behind


@pytest.mark.parametrize(("marker", "reason"), [(KILL_WORKER, "worker_crashed"), (HANG_WORKER, "decode_timeout")])
def test_a_message_that_kills_or_hangs_a_worker_is_a_dead_letter_and_the_rest_decode(
    values: list[bytes | None], marker: bytes, reason: str
) -> None:
    good = [v for v in values[:6]]
    batch = good[:3] + [marker] + good[3:]
    pool = DecodePool(2, DecodeLimits(), chunk=2, task=decode_or_die, timeout_s=3.0)
    try:
        t = time.monotonic()
        got = pool.decode(batch)
        took = time.monotonic() - t
        assert pool.restarts >= 2  # once for the batch, once for the message alone
        again = pool.decode(good)  # the pool works after the restarts
    finally:
        pool.close()
    bad = got[3]
    assert isinstance(bad, BadAlertError) and bad.reason == reason
    assert [o[0].candid for o in got[:3] + got[4:] if not isinstance(o, BadAlertError)] == list(range(START, START + 6))
    assert not any(isinstance(o, BadAlertError) for o in again)
    assert took < 20  # a hang: two timeouts of 3 s and the restarts, not the hour the message asks for
    assert _live_workers() == []  # hung workers are killed, not left behind asleep


def test_the_workers_have_started_before_the_first_decode_is_timed() -> None:
    """A worker's start (~1 s; ~10 s where numba's cache is cold) must not count against the
    decode timeout: the pool spawns its workers and waits for them when it starts."""
    pool = DecodePool(2, DecodeLimits(), timeout_s=30.0)
    try:
        assert len(_live_workers()) == 2  # spawned and started before any decode
        assert not isinstance(pool.decode([make_alert(START + 50).message])[0], BadAlertError)
    finally:
        pool.close()


def test_a_rubin_message_decodes_in_a_worker_with_the_schema_the_daemon_sent() -> None:
    """A schema only the registry knows (an id the package lacks): the daemon looks it up and
    sends it with the chunk; the worker decodes as the daemon's own process would."""
    from alerts.rubin_schemas import packaged_schema

    message = make_rubin_message(1000, 170_000_000_000_000_100, n_prv=2)
    registry_only = b"\x00" + (99_901).to_bytes(4, "big") + message[5:]
    schema = packaged_schema(1000)
    assert schema is not None and packaged_schema(99_901) is None
    pool = DecodePool(1, DecodeLimits())
    try:
        (unsent,) = pool.decode([registry_only])
        (sent,) = pool.decode([registry_only], schemas=[(99_901, schema)])
    finally:
        pool.close()
    assert isinstance(unsent, BadAlertError) and unsent.reason == "unknown_schema"
    here = decode_one(registry_only, SchemaCache(), RubinSchemaCache(lookup={99_901: schema}.get))
    assert not isinstance(sent, BadAlertError) and same(sent, here)


def test_hang_guard_ends_a_process_hung_in_c_with_the_gil_held() -> None:
    """A regular expression that backtracks for ever holds the GIL inside C, as a hung decoding
    library would, so no Python thread could interrupt it: the guard's timer (a C thread) ends
    the process, with the stack of the hang on stderr. A guard left in time ends nothing."""
    import subprocess
    import sys

    code = ("import re, time\nfrom consumer.decoding import hang_guard\n"
            "with hang_guard(0.5):\n    time.sleep(0.1)\ntime.sleep(1.0)\nprint('still here', flush=True)\n"
            "with hang_guard(1.0):\n    re.match(r'(a+)+$', 'a' * 64 + 'b')\nprint('never', flush=True)\n")  # fmt: skip
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["still", "here"], p.stderr[-2000:]
    assert p.returncode == 1 and time.monotonic() - t < 60
    assert "Timeout (0:00:01)!" in p.stderr and "in match" in p.stderr


def _live_workers(pid: int | None = None) -> list[Any]:
    """The decode workers (spawned processes, zombies left out) under process ``pid`` (this one by default)."""
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_worker_killed_from_outside_is_replaced(values: list[bytes | None]) -> None:
    pool = DecodePool(1, DecodeLimits())
    try:
        assert not isinstance(pool.decode(values[:1])[0], BadAlertError)
        for pid in list(pool._pool._processes or {}):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
        got = pool.decode(values[:4])
    finally:
        pool.close()
    assert not any(isinstance(o, BadAlertError) for o in got) and pool.restarts == 1


def test_workers_leave_when_the_daemon_is_killed() -> None:
    """kill -9 of the daemon must not leave its decode workers behind (they block on their queue)."""
    import subprocess
    import sys

    import psutil

    code = ("from alerts.limits import DecodeLimits\nfrom consumer.decoding import DecodePool\nimport time\n"
            "if __name__ == '__main__':\n    p = DecodePool(2, DecodeLimits())\n    p.decode([b'x', b'y', b'z'])\n"
            "    print('ready', flush=True)\n    time.sleep(120)\n")  # fmt: skip
    daemon = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "ready"
        workers = _live_workers(daemon.pid)
        assert workers
        daemon.kill()
        daemon.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} decode worker(s) outlived the daemon"
    finally:
        daemon.kill()
