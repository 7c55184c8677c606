"""Did the previous consumer of this group on this host die in the middle of a run?

A message that crashes a decoding library (a segfault: no Python exception to catch) kills the
daemon before its offset is committed; the restarted daemon reads it again and dies again, for
ever. Each daemon therefore leaves a marker file while it runs and removes it on every exit Python
sees (a clean stop, an exception). A marker whose process is gone means a hard death (SIGKILL, the
OOM killer, a crash): the new daemon then decodes its first batches in a worker process
(``batching.isolate_after_crash``, consumer/decoding.py), where the message that killed its
predecessor kills only the worker and becomes a dead letter (``worker_crashed``).

The markers live in the temporary directory: in Kubernetes an emptyDir, which outlives a
container's restart within its pod, the case that matters. A process id reused by an unrelated
process hides a death (the new run is then not isolated); a container restarted with the same
pid (1) is recognised as dead, since a marker with our own pid cannot be ours yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _prefix(group: str) -> str:
    return f"stampstream-{_UNSAFE.sub('_', group)[:100]}-"


def marker(directory: Path, group: str, pid: int | None = None) -> Path:
    return directory / f"{_prefix(group)}{os.getpid() if pid is None else pid}.running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(directory: Path, group: str) -> bool:
    """Leave this process's marker -> whether a process of this group died without removing its
    own (those markers are removed: one isolated start per death)."""
    died = False
    for path in directory.glob(f"{_prefix(group)}*.running"):
        pid_text = path.name[len(_prefix(group)) : -len(".running")]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or not _alive(pid):
            died = True
            path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    marker(directory, group).write_text(f"{os.getpid()}\n")
    return died


def release(directory: Path, group: str) -> None:
    marker(directory, group).unlink(missing_ok=True)
