"""Processes that are not our children: is a pid still the process we think, what does it run,
and stopping what a killed build left behind.

Linux answers from /proc; where there is no /proc (macOS) `ps` or `kill(pid, 0)` stand in. A
zombie counts as gone everywhere: it runs nothing and only waits for its parent to reap it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from pipeline.base.errors import ImagepipeError
from pipeline.base.numbers import int_or_none
from pipeline.base.run import run

PROC = Path("/proc")
# What start_time() says where neither /proc nor ps answers: the process exists, its start is unknown.
ALIVE = "alive"
# Start times read from ps (no /proc) carry this prefix; the leash reads them back the same way.
PS_PREFIX = "ps:"
PS_START = ["ps", "-o", "stat=", "-o", "lstart=", "-p"]
PS_ENV = {"LC_ALL": "C", "LANG": "C", "TZ": "UTC"}  # the same text for the same process, always


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces or parentheses);
    [0] is the state, [19] the start time. None when the process is gone or a zombie."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    if not fields or fields[0] == "Z":
        return None
    return fields


def have_proc() -> bool:
    """True when this system has a Linux-style /proc."""
    return (PROC / "self" / "stat").exists()


def cmdline(pid: int) -> str | None:
    """The command line of `pid` with NULs as spaces; None when it is gone or a zombie."""
    if have_proc():
        if _stat_fields(pid) is None:
            return None
        try:
            return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    if sys.platform.startswith("linux"):
        return None
    res = run(["ps", "-p", str(pid), "-o", "stat=", "-o", "command="], check=False)
    out = res.stdout.strip()
    if not res.ok or not out or out.startswith("Z"):
        return None
    return out.partition(" ")[2]


def start_time(pid: int) -> str | None:
    """The start time of `pid`, None if it is gone: field 22 of /proc/PID/stat (clock ticks since
    boot) where there is /proc, else `ps:` and what `ps -o lstart=` prints (macOS, the BSDs: to
    the second). `ALIVE` only where neither answers but the pid exists."""
    if have_proc():
        fields = _stat_fields(pid)
        return fields[19] if fields is not None and len(fields) > 19 else None
    return ps_start_time(pid)


def ps_start_time(pid: int) -> str | None:
    """`ps:<start>` of a live process from `ps -p PID -o stat= -o lstart=` (None: gone or a
    zombie). The leash (pipeline.base.run.LEASH) asks the same question the same way, so the
    two compare equal for the same process and differ for a reused pid."""
    try:
        res = run(PS_START + [str(pid)], check=False, env=PS_ENV, timeout=30)
    except ImagepipeError:  # no ps at all: whether the pid exists is all that can be known
        return ALIVE if _exists(pid) else None
    return parse_ps_start(res.stdout) if res.ok else None


def parse_ps_start(out: str) -> str | None:
    """`ps -o stat= -o lstart=` output → `ps:Fri Dec  4 14:35:40 2026` (spaces folded), None for
    no process or a zombie."""
    fields = out.split()
    if len(fields) < 2 or fields[0].startswith("Z"):
        return None
    return PS_PREFIX + " ".join(fields[1:])


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def is_alive(pid: int | None, start: str | None) -> bool:
    """True when `pid` still runs and is the process whose start time was recorded (a reused
    pid has another start time); `start` None: any live process with that pid."""
    if pid is None:
        return False
    now = start_time(pid)
    return now is not None and (start is None or now in (start, ALIVE))


def process_group(pid: int) -> int | None:
    """The process group of `pid` (field 5 of /proc/PID/stat); None when gone or unknown."""
    fields = _stat_fields(pid) if have_proc() else None
    return int_or_none(fields[2]) if fields is not None and len(fields) > 2 else None


def boot_id() -> str | None:
    """This boot's id (Linux): a pid recorded before a reboot means nothing after it."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip() or None
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """This user's live processes (not this one) in process group `pgid`. /proc only."""
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else []:
        pid = int_or_none(entry.name)
        if pid is None or pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == os.getuid() and process_group(pid) == pgid:
                found.append(pid)
    return found


def stop_group_leftovers(pgid: int, leader_start: str | None, grace: float = 5.0) -> list[int]:
    """SIGKILL what is left of a tool's process group that a killed build started (packer's
    QEMU outlives packer, for example); returns the pids stopped.

    Only when the group is still that build's: its leader is gone or has the recorded start
    time, and every member started no earlier than the leader did (a later process group with
    the same id would have a leader of its own). The kernel keeps a group's id from being
    reused while a member lives, so members found this way are the build's.
    """
    start = int_or_none(leader_start)
    if start is None:
        return []
    now = start_time(pgid)
    if now is not None and now != leader_start:
        return []
    members = [p for p in group_members(pgid) if (int_or_none(start_time(p)) or -1) >= start]
    kill_and_wait(members, grace)
    return members


def pids_mentioning(needle: str) -> list[int]:
    """This user's processes (not this one) whose command line contains `needle`. /proc only;
    elsewhere an empty list."""
    found = []
    raw = needle.encode()
    for entry in PROC.iterdir() if PROC.is_dir() else []:
        if int_or_none(entry.name) in (None, os.getpid()):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == os.getuid() and raw in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def kill_and_wait(pids: list[int], grace: float = 5.0, interval: float = 0.05) -> None:
    """SIGKILL `pids` and poll until they are gone or `grace` seconds have passed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(start_time(p) for p in pids):
        time.sleep(interval)


def stop_processes_in(folder: Path, grace: float = 5.0) -> list[int]:
    """SIGKILL this user's processes whose command line names `folder` (an orphaned packer or
    QEMU of a killed build keeps running otherwise); returns their pids. /proc only."""
    pids = pids_mentioning(str(folder))
    kill_and_wait(pids, grace)
    return pids
