"""The decode stage of the main loop: message bytes -> (alert, raw crops, features) or the named
error that makes it a dead letter, in the main process or in worker processes.

Why worker processes (``batching.decode_workers``): decode + cutouts + features is the main
thread's largest stage (~275 of ~440 CPU µs per alert, docs/benchmarks.md) and sets one consumer's
rate; threads would serialise on the GIL for most of it. With N workers the main thread only
consumes, infers (on its own thread) and publishes, so one consumer can use the cores one
process cannot. Off by default: on a 2-core machine shared with the broker and Redis the cores are
already full and the workers cost more than they bring (measured, docs/benchmarks.md); the scale-out
that needs no change at all is more consumers in the group.

What crosses between the processes: the batch's messages are copied once into a shared-memory
block, and a worker gets the block's name and its messages' offsets and lengths (through the pipe,
pickled, the ~70 KB messages cost the main thread 77 instead of 65 µs per alert, and a worker 402
instead of 321; docs/benchmarks.md); back come the alert without its cutout bytes (the crops are
cut already), the (2, 21, 21) crops and the features, or the error's class, text, reason and
candid. Rubin messages go to the workers too, with their writer schemas: the daemon resolves a
message's schema id (the schema registry, then the packaged schemas: consumer/schema_registry.py)
without reading its body, and a chunk carries the schemas of its Rubin messages, so a worker
needs no registry of its own.

Isolation: a message that kills a worker (a crash in a C library, the OOM killer) breaks only the
pool. The batch is then decoded again one message per task, the pool restarted after each
death, and the message that killed a worker becomes a dead letter (``worker_crashed``): it never
reaches the main process, so it can neither crash the daemon nor repeat on an uncommitted offset.
A message that hangs a worker instead (a loop in a C library with the GIL held: no exception, no
death) would stall the daemon until its liveness probe restarts it, and the restart, isolated,
would hang on it again. So a chunk gets ``timeout_s`` (``batching.decode_timeout_s``; chunks take
milliseconds): past it the workers are killed and the batch decoded again one message per task,
and the message that hangs becomes a dead letter (``decode_timeout``). Where the daemon decodes
in its own process, ``hang_guard`` ends it after as long, so that the restart isolates the message.

Workers are spawned, never forked: the daemon's process runs librdkafka's threads, and a fork
copies their locks in whatever state they are in.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from alerts.cutouts import StampPixels
from alerts.decoder import SchemaCache
from alerts.errors import BadAlertError
from alerts.limits import DecodeLimits
from alerts.message import AnyAlert, decode_any, features_of, warm_up
from alerts.rubin import RubinSchemaCache
from alerts.rubin_schemas import packaged_schema

log = logging.getLogger("stampstream.consumer")

Decoded = tuple[AnyAlert, StampPixels, np.ndarray]  # alert, raw crops, features
Outcome = Decoded | BadAlertError


def decode_one(value: bytes | None, ztf: SchemaCache, rubin: RubinSchemaCache) -> Outcome:
    """One message -> its decoded parts, or the named error it is dead-lettered with. Never
    raises: a bug on odd input must not stop the stream either (reason ``unexpected``)."""
    try:
        alert, stamp = decode_any(value, ztf, rubin)
        return alert, stamp, features_of(alert)
    except BadAlertError as e:
        return e
    except Exception as e:
        return BadAlertError(f"unexpected {type(e).__name__}: {e}", reason="unexpected")


@dataclass(frozen=True)
class Refused:
    """A BadAlertError as it crosses the pipe (its keyword attributes would not survive pickling)."""

    kind: type[BadAlertError]  # pickled by its qualified name
    text: str
    reason: str
    candid: int | None

    def error(self) -> BadAlertError:
        return self.kind(self.text, reason=self.reason, candid=self.candid)


@dataclass(frozen=True)
class Chunk:
    """Messages of a batch in the pool's shared memory: the block's name and each message's
    (offset, length), length -1 for a message without a value."""

    memory: str
    spans: tuple[tuple[int, int], ...]
    schemas: tuple[tuple[int, bytes], ...] = ()  # Rubin schema id -> writer schema, for its messages


Task = Callable[[Chunk], list[Decoded | Refused]]

# -- in the worker ------------------------------------------------------------------------------
PARENT_CHECK_S = 1.0
_ZTF: SchemaCache | None = None
_RUBIN: RubinSchemaCache | None = None
_ATTACHED: shared_memory.SharedMemory | None = None
_SCHEMAS: dict[int, bytes] = {}  # Rubin writer schemas the daemon sent (as bounded as its own cache)


def _sent_schema(schema_id: int) -> bytes | None:
    """A worker's Rubin schema lookup: what the daemon sent with the chunks, else the package's."""
    return _SCHEMAS.get(schema_id) or packaged_schema(schema_id)


def _start_worker(limits: DecodeLimits, parent: int) -> None:
    global _ZTF, _RUBIN
    _ZTF, _RUBIN = SchemaCache(limits), RubinSchemaCache(limits, _sent_schema)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()
    warm_up()


def _started() -> None:
    """A task that returns once its worker has run ``_start_worker``."""


def _exit_with(parent: int) -> None:
    """A worker outlives a daemon killed with -9 (measured: idle, blocked on its queue, 180 MB):
    it leaves as soon as its parent is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def chunk_values(chunk: Chunk) -> list[bytes | None]:
    """The messages of a chunk, read from the pool's shared memory (attached once per block)."""
    global _ATTACHED
    if _ATTACHED is None or _ATTACHED.name != chunk.memory:
        if _ATTACHED is not None:
            _ATTACHED.close()
        _ATTACHED = shared_memory.SharedMemory(chunk.memory)
    buf = _ATTACHED.buf
    assert buf is not None  # an open block
    return [None if n < 0 else bytes(buf[o : o + n]) for o, n in chunk.spans]


def decode_chunk(chunk: Chunk) -> list[Decoded | Refused]:
    assert _ZTF is not None and _RUBIN is not None, "worker not started"
    for schema_id, schema_json in chunk.schemas:
        _SCHEMAS[schema_id] = schema_json
        while len(_SCHEMAS) > _RUBIN.limits.max_schema_cache_entries:
            del _SCHEMAS[next(iter(_SCHEMAS))]
    out: list[Decoded | Refused] = []
    for value in chunk_values(chunk):
        o = decode_one(value, _ZTF, _RUBIN)
        if isinstance(o, BadAlertError):
            out.append(Refused(type(o), str(o), o.reason, o.candid))
        else:  # the cutout bytes are cut already: do not send them back
            alert, stamp, features = o
            out.append((dataclasses.replace(alert, science=None, difference=None), stamp, features))
    return out


# -- in the daemon ------------------------------------------------------------------------------
@contextmanager
def hang_guard(timeout_s: float) -> Iterator[None]:
    """Decoding in the daemon's own process: if the block takes over ``timeout_s``, the process
    exits (status 1, every thread's stack on stderr). A message that loops in a C library with the
    GIL held stops every Python thread, a watchdog thread included, but not faulthandler's timer,
    a C thread that needs no GIL. The process then ends as a crash does: its crash marker stays,
    and its restart decodes the message in a worker, where it becomes a dead letter
    (``decode_timeout``). faulthandler keeps one such timer per process; this one replaces any other."""
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _reserved_block(size: int) -> shared_memory.SharedMemory:
    """A shared block whose pages are reserved now: /dev/shm is a tmpfs (64 MB by default in a
    Docker container), and writing into an unreserved page past its size kills the writer with
    SIGBUS. Reserved, a block that does not fit is an OSError here, and the daemon decodes that
    batch in its own process instead (consumer/daemon.py)."""
    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        fd = os.open(f"/dev/shm/{block.name.lstrip('/')}", os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError:
        block.close()
        block.unlink()
        raise
    return block


class DecodePool:
    """``workers`` spawned processes, each with its own schema caches (bounded by ``limits``)."""

    START_S = 90.0  # below the 120 s after which /healthz calls the main loop stale

    def __init__(self, workers: int, limits: DecodeLimits, chunk: int = 64, task: Task | None = None,
                 timeout_s: float | None = None) -> None:  # fmt: skip
        """``task``: what a worker runs on a chunk of messages (tests pass one that dies or hangs on
        a marker); ``timeout_s``: how long a chunk may take before its worker is taken as hung."""
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.workers, self.limits, self.chunk, self.timeout_s = workers, limits, chunk, timeout_s
        self.task: Task = task or decode_chunk
        self.restarts = 0
        self._memory: shared_memory.SharedMemory | None = None
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        """Spawn the workers and wait until they have started (imports, compiled kernels: under a
        second with numba's cache, ~10 s without it), so that the decode timeout measures
        decoding, not a start. Bounded by ``START_S``: a start that takes longer is logged and
        the pool used as it is."""
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_start_worker,
                                   initargs=(self.limits, os.getpid()))  # fmt: skip
        started = [pool.submit(_started) for _ in range(self.workers)]  # one spawn per submit
        if wait(started, timeout=self.START_S).not_done:
            log.warning("decode workers not started within %.0f s", self.START_S)
        return pool

    def _restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.restarts += 1
        self._pool = self._start()

    def _kill(self) -> None:
        """Kill the workers (a hung one never takes another task), then start new ones.
        ProcessPoolExecutor has no public way to stop a busy worker; its ``_processes`` map is the
        handle there is (``test_a_worker_killed_from_outside_is_replaced`` uses it too)."""
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            process.kill()
        self._restart()

    def _load(self, values: Sequence[bytes | None]) -> list[tuple[int, int]]:
        """The batch's messages into the shared block (grown, never shrunk) -> their spans. The
        block is rewritten only by the next decode(), when every worker has answered."""
        total = sum(len(v) for v in values if v is not None)
        if self._memory is None or self._memory.size < total:
            self._release()
            self._memory = _reserved_block(max(total + total // 4, 1 << 20))
        buf, pos, spans = self._memory.buf, 0, []
        assert buf is not None  # an open block
        for v in values:
            if v is None:
                spans.append((0, -1))
                continue
            buf[pos : pos + len(v)] = v
            spans.append((pos, len(v)))
            pos += len(v)
        return spans

    def decode(self, values: Sequence[bytes | None], beat: Callable[[], None] = lambda: None,
               schemas: Sequence[tuple[int, bytes] | None] = ()) -> list[Outcome]:  # fmt: skip
        """Outcomes in the order of ``values``; ``beat`` is called as each chunk comes back;
        ``schemas``: per message, its Rubin schema id and writer schema (None for the others)."""
        spans = self._load(values)
        assert self._memory is not None
        name = self._memory.name
        size = max(1, min(self.chunk, -(-len(values) // self.workers)))
        per_message = list(schemas) or [None] * len(values)

        def chunk(lo: int, hi: int) -> Chunk:
            return Chunk(name, tuple(spans[lo:hi]), tuple({s for s in per_message[lo:hi] if s is not None}))

        chunks = [chunk(i, i + size) for i in range(0, len(values), size)]
        try:
            futures = [self._pool.submit(self.task, c) for c in chunks]
            got: list[Decoded | Refused] = []
            for f in futures:
                got += f.result(timeout=self.timeout_s)
                beat()
        except (BrokenProcessPool, FutureTimeout) as e:
            what = "died" if isinstance(e, BrokenProcessPool) else f"did not answer within {self.timeout_s} s"
            log.error("a decode worker %s: decoding the batch again, one message per task", what)
            self._kill()  # a dead worker is gone already; a hung one must be killed
            got = [self._one_by_one(chunk(i, i + 1), beat) for i in range(len(values))]
        return [g.error() if isinstance(g, Refused) else g for g in got]

    def _one_by_one(self, chunk: Chunk, beat: Callable[[], None]) -> Decoded | Refused:
        try:
            (o,) = self._pool.submit(self.task, chunk).result(timeout=self.timeout_s)
        except BrokenProcessPool:
            self._restart()
            return Refused(BadAlertError, "the message killed a decode worker", "worker_crashed", None)
        except FutureTimeout:
            self._kill()
            return Refused(BadAlertError, f"decoding the message took over {self.timeout_s} s", "decode_timeout", None)
        beat()
        return o

    def _release(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()
            self._memory = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._release()
