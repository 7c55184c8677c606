"""consumer/crash_marker.py: a marker left by a process that is gone means a hard death, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from consumer.crash_marker import claim, marker, release


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_clean_run_leaves_nothing_and_the_next_start_is_not_isolated(tmp_path: Path) -> None:
    assert claim(tmp_path, "group/a") is False
    assert marker(tmp_path, "group/a").exists()
    release(tmp_path, "group/a")
    assert list(tmp_path.iterdir()) == []
    assert claim(tmp_path, "group/a") is False


def test_a_marker_of_a_dead_process_means_one_isolated_start(tmp_path: Path) -> None:
    marker(tmp_path, "g", _dead_pid()).write_text("")
    marker(tmp_path, "other-group", _dead_pid()).write_text("")
    assert claim(tmp_path, "g") is True
    release(tmp_path, "g")
    assert claim(tmp_path, "g") is False  # its marker was taken: one isolated start per death
    assert marker(tmp_path, "other-group", int(next(tmp_path.glob("stampstream-other-group-*")).stem.rsplit("-", 1)[1])).exists()


def test_a_live_member_on_the_same_host_is_not_a_death_but_our_own_pid_is(tmp_path: Path) -> None:
    marker(tmp_path, "g", os.getppid()).write_text("")  # another consumer of the group, running
    assert claim(tmp_path, "g") is False and marker(tmp_path, "g", os.getppid()).exists()
    # a container restarted as pid 1 finds the marker of the pid 1 that died: that is a death
    assert claim(tmp_path, "g") is True
