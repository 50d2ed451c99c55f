"""pipeline.base.procs against real processes of this machine."""

import os
import subprocess
import sys

from pipeline.base import procs
from tests.support import wait_until


def test_cmdline_and_start_time_of_a_live_process(tmp_path):
    marker = str(tmp_path / "marker dir")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        wait_until(lambda: marker in (procs.cmdline(proc.pid) or ""), 10, "the marker in the command line",
                   lambda: procs.cmdline(proc.pid))
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
    wait_until(lambda: procs.start_time(proc.pid) is None, 10, "the process gone",
               lambda: procs.start_time(proc.pid))
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
        wait_until(lambda: procs.pids_mentioning(str(folder)) == [inside.pid], 10, "only the process inside",
                   lambda: procs.pids_mentioning(str(folder)))
        assert procs.stop_processes_in(folder) == [inside.pid]
        assert inside.wait(timeout=10) == -9
        assert outside.poll() is None and procs.pids_mentioning(str(folder)) == []
    finally:
        for p in (inside, outside):
            p.kill()
            p.wait()
    assert os.getpid() not in procs.pids_mentioning(sys.executable)
