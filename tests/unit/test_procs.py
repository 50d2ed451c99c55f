"""pipeline.procs against real processes of this machine."""

import os
import subprocess
import sys
import time

from pipeline import procs


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes (returns the last answer)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_cmdline_and_start_time_of_a_live_process(tmp_path):
    marker = str(tmp_path / "marker dir")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        assert wait_for(lambda: marker in (procs.cmdline(proc.pid) or ""))
        assert procs.cmdline(proc.pid).endswith(f"time.sleep(60) {marker} ")  # NULs as spaces
        start = procs.start_time(proc.pid)
        assert start and start.isdigit()
        assert procs.is_alive(proc.pid, start) and procs.is_alive(proc.pid, None)
        assert not procs.is_alive(proc.pid, str(int(start) + 1))  # a reused pid starts later
        assert not procs.is_alive(None, start)
    finally:
        proc.kill()
        proc.wait()


def test_zombie_and_gone_count_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    # not reaped yet: a zombie until wait()
    assert wait_for(lambda: procs.start_time(proc.pid) is None)
    assert procs.cmdline(proc.pid) is None
    proc.wait()
    assert procs.cmdline(proc.pid) is None and procs.start_time(proc.pid) is None
    assert not procs.is_alive(proc.pid, None)


def test_stop_processes_in_kills_only_what_names_the_folder(tmp_path):
    folder = tmp_path / "staging" / "b1"
    folder.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    inside = subprocess.Popen([*sleeper, str(folder / "disk")])
    outside = subprocess.Popen([*sleeper, str(tmp_path / "elsewhere")])
    try:
        assert wait_for(lambda: procs.pids_mentioning(str(folder)) == [inside.pid])
        assert procs.stop_processes_in(folder) == [inside.pid]
        assert inside.wait(timeout=10) == -9
        assert outside.poll() is None and procs.pids_mentioning(str(folder)) == []
    finally:
        for p in (inside, outside):
            p.kill()
            p.wait()
    assert os.getpid() not in procs.pids_mentioning(sys.executable)
