"""Idle stop (`invoke run IMAGE --idle-stop MINUTES`): an instance powers off by itself (the ACPI
power button, as `invoke stop` presses it) once no SSH session has been open and the guest has
been idle for that long.

A small watcher process, started by `run` in its own session (it outlives the command, as the
detached QEMU does; it ends when QEMU ends, however that happens), samples every few seconds:

    SSH sessions  established TCP connections to the instance's forwarded port, read from
                  QEMU's own network namespace (/proc/<qemu pid>/net/tcp): every ssh to the
                  instance is one, `invoke ssh`, plain ssh, scp, rsync, an SSH jump through a builder
    guest load    the CPU time QEMU used since the last sample: a guest that computes (a build,
                  its boot) keeps QEMU busy; an idle guest's QEMU uses little (IDLE_CPU)

The clock of idleness restarts whenever either shows activity. When it reaches the limit, the
watcher stops the instance as `invoke stop` does, writes why into the instance's `stopped_by`
(shown by `invoke instances`) and records an `idle-stop` event in the history. Minutes may be
fractional (0.5 = 30 s). Needs /proc (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.base import procs
from pipeline.base.errors import UsageError
from pipeline.base.numbers import int_or_none
from pipeline.output.history import History
from pipeline.vm import lifecycle, shares
from pipeline.vm.state import StatePaths, alive, read_value, write_value

IDLE_CPU = 0.15          # QEMU using less than this share of one CPU: the guest is idle
ESTABLISHED = "01"       # /proc/net/tcp's state column


def minutes(value: float) -> str:
    """`30 min`, `1.5 min`, `0.1 min (6 s)`."""
    text = f"{value:g} min"
    return text if value >= 1 else f"{text} ({value * 60:g} s)"


def sessions(port: int, tcp_tables: list[str]) -> int:
    """Established connections whose local port is `port`, from /proc/net/tcp and tcp6 (pure)."""
    count = 0
    for table in tcp_tables:
        for line in table.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 4 or ":" not in cols[1]:
                continue
            hex_port = cols[1].rsplit(":", 1)[1]
            if len(hex_port) == 4 and all(c in "0123456789ABCDEFabcdef" for c in hex_port) \
                    and int(hex_port, 16) == port and cols[3] == ESTABLISHED:
                count += 1
    return count


def cpu_seconds(stat_text: str, ticks: int) -> float | None:
    """utime + stime of /proc/<pid>/stat, in seconds (pure)."""
    fields = stat_text.rpartition(")")[2].split()
    if len(fields) < 13:
        return None
    utime, stime = int_or_none(fields[11]), int_or_none(fields[12])
    return None if utime is None or stime is None else (utime + stime) / ticks


@dataclass
class IdleClock:
    """How long the instance has been idle (pure: fed one sample at a time)."""

    limit: float                 # seconds
    idle_for: float = 0.0

    def sample(self, interval: float, ssh_sessions: int, cpu_used: float | None) -> bool:
        """One sample over `interval` seconds; True when the limit is reached."""
        busy = ssh_sessions > 0 or cpu_used is None or cpu_used > IDLE_CPU * interval
        self.idle_for = 0.0 if busy else self.idle_for + interval
        return self.idle_for >= self.limit


def interval_for(limit: float) -> float:
    """Seconds between samples: a tenth of the limit, between 1 and 15."""
    return min(15.0, max(1.0, limit / 10))


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""


def watch(output_dir: Path, name: str, limit: float) -> int:
    """The watcher's loop (`python -m pipeline.vm.idle OUTPUT NAME SECONDS`)."""
    from pipeline.vm import instances  # noqa: PLC0415 (an import circle: instances starts this watcher)

    state = instances.paths(output_dir, name)
    pid = int_or_none(read_value(state.pid), lo=1, hi=2**31)
    port = int_or_none(read_value(state.ssh_port), lo=1, hi=65535)
    if pid is None or port is None:
        return 1
    ticks = os.sysconf("SC_CLK_TCK")
    clock, step = IdleClock(limit), interval_for(limit)
    last = cpu_seconds(_read(f"/proc/{pid}/stat"), ticks)
    while alive(pid, state):
        time.sleep(step)
        now_cpu = cpu_seconds(_read(f"/proc/{pid}/stat"), ticks)
        used = None if now_cpu is None or last is None else now_cpu - last
        last = now_cpu
        tables = [_read(f"/proc/{pid}/net/tcp"), _read(f"/proc/{pid}/net/tcp6")]
        if clock.sample(step, sessions(port, tables), used):
            why = f"idle-stop: no SSH session and an idle guest for {minutes(limit / 60)}"
            print(f"{name}: {why}; pressing the power button", flush=True)
            with contextlib.suppress(Exception):  # the cfg-free stop: state folder only
                _stop(output_dir, name, why)
            return 0
    return 0


def _stop(output_dir: Path, name: str, why: str) -> None:
    """Stop as `invoke stop` does, without the project's configuration (only its output folder)."""
    from pipeline.vm import instances  # noqa: PLC0415 (an import circle: instances starts this watcher)

    state = instances.paths(output_dir, name)
    record = instances.load(output_dir, name)
    done = lifecycle.stop(name, state, grace=instances.GRACE, say=lambda line: print(line, flush=True))
    shares.stop_daemons(state)
    write_value(state.stopped_by, f"{why} (at {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)")
    with History(output_dir) as hist:
        hist.note(name, "idle-stop", image=record.image if record else None,
                  build_id=record.build_id if record else None, detail=f"{why}; {done.removeprefix(f'{name}: ')}")
    state.watcher.unlink(missing_ok=True)


def spawn(output_dir: Path, name: str, limit: float, state: StatePaths) -> int:
    """Start the watcher for a running instance, detached; its pid is in the state folder."""
    if not Path("/proc/self/net/tcp").exists():
        raise UsageError("--idle-stop needs /proc (Linux): this host has none")
    log = open(state.root / "idle.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.vm.idle", os.fspath(output_dir), name, f"{limit:g}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2])
    finally:
        log.close()
    write_value(state.watcher, str(proc.pid))
    return proc.pid


def _is_watcher(pid: int, name: str) -> bool:
    cmd = procs.cmdline(pid)
    return cmd is not None and "pipeline.vm.idle" in cmd and f" {name} " in f"{cmd} "


def stop_watcher(state: StatePaths) -> None:
    """End the instance's watcher (it also ends by itself once QEMU is gone)."""
    pid = int_or_none(read_value(state.watcher), lo=1, hi=2**31)
    if pid is not None and pid != os.getpid() and _is_watcher(pid, state.root.name):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    state.watcher.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    output_dir, name, seconds = argv
    return watch(Path(output_dir), name, float(seconds))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
