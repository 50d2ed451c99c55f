"""pipeline.base.procs against real processes of this machine."""

import os
import signal
import subprocess
import sys

import pytest

from pipeline.base import procs
from tests.support import ROOT, wait_until


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


def test_without_proc_the_start_time_comes_from_ps(monkeypatch, tmp_path):
    """macOS has no /proc: `ps -o lstart=` gives the start (to the second), so a reused pid is
    told apart there too. Run here with /proc hidden; ps is the same question on both."""
    monkeypatch.setattr(procs, "PROC", tmp_path / "no-proc")
    assert not procs.have_proc()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = procs.start_time(proc.pid)
        assert start is not None and start.startswith("ps:") and start[-4:].isdigit(), start  # ps:Fri Dec  4 …
        assert procs.is_alive(proc.pid, start)
        assert not procs.is_alive(proc.pid, "ps:Thu Jan 1 00:00:00 1970")  # another process's start
        assert procs.parse_ps_start("Z    Fri Dec  4 14:35:40 2026\n") is None  # a zombie is gone
        assert procs.parse_ps_start("") is None
        assert procs.parse_ps_start("Ss   Fri Dec  4 14:35:40 2026\n") == "ps:Fri Dec 4 14:35:40 2026"
    finally:
        proc.kill()
        proc.wait()
    assert procs.start_time(proc.pid) is None


TIED = """
import sys, time
from pipeline.base import procs, run
victim, how = int(sys.argv[1]), sys.argv[2]
start = procs.ps_start_time(victim) if how == "ps" else procs.start_time(victim)
assert start and start != procs.ALIVE, start
with run.tie_to_us(victim, start):
    print("tied", start, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["proc", "ps"])
def test_the_leash_kills_a_watched_process_when_we_die(how):
    """tie_to_us: a daemonized QEMU dies with a killed imagepipe. The leash compares the start
    time it was given the way it was taken: from /proc, or from ps where there is no /proc."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder = subprocess.Popen([sys.executable, "-c", TIED, str(victim.pid), how], stdout=subprocess.PIPE, text=True,
                              cwd=str(ROOT))
    try:
        line = holder.stdout.readline()
        assert line.startswith("tied"), line
        assert ("ps:" in line) == (how == "ps")
        holder.kill()  # SIGKILL: no cleanup of its own runs
        holder.wait()
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        for p in (holder, victim):
            p.kill()
            p.wait()
