"""Boot to SSH: `invoke run demo-x86_64` then `invoke ssh demo-x86_64 -- true`, against the same
QEMU command line started by hand plus an ssh retry loop.

Alternates the two (≥ 3 pairs), medians, ratio (goal ≤ 1.05). Setup, outside the timing: the
demo image is built into a temporary output folder and booted once by `invoke run`, whose QEMU
command line (read from /proc) is what the raw side starts; every VM is stopped (QMP quit)
after its measurement, outside the timing. The raw side's ssh loop tries `ssh ... true` with
the project key every 0.1 s, each waiting at most 1 s for the banner (QEMU holds a connection the
guest cannot answer yet); host keys are not checked: the floor, not a safe login.
Usage: python3 bench/boot_ssh.py [PAIRS] [--json]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, alternate, count, figure, finish, say, timed, workspace

from pipeline import keys
from pipeline.vm.qmp import Qmp
from pipeline.vm.state import state_paths

IMAGE = "demo-x86_64"
DEADLINE = 180.0  # seconds for one boot to reach SSH (TCG on a busy machine)
pairs = count(5, minimum=3)
work, output, invoke = workspace()
paths = state_paths(output, IMAGE)
state = paths.root


def qemu_pid() -> int | None:
    try:
        return int((state / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def stop_vm() -> None:
    """QMP quit (the same for both sides), then wait for the process to go; outside the timing."""
    pid = qemu_pid()
    if pid is None:
        return
    try:
        with Qmp(paths.qmp, timeout=5) as qmp:
            qmp.quit()
    except OSError:
        os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    for name in ("pid", "ssh_port", "accel", "started_at", "snapshot"):
        (state / name).unlink(missing_ok=True)


def ours() -> float:
    start = time.perf_counter()
    subprocess.run([*invoke, "run", IMAGE], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*invoke, "ssh", IMAGE, "--", "true"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    stop_vm()
    return seconds


def raw() -> float:
    start = time.perf_counter()
    subprocess.run(qemu, check=True)  # -daemonize: returns once QEMU is set up, as for `run`
    deadline = time.monotonic() + DEADLINE
    while subprocess.run(ssh_true, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).returncode != 0:
        if time.monotonic() > deadline:
            stop_vm()
            sys.exit(f"raw side: no SSH within {DEADLINE:.0f}s; console:\n{(state / 'console.log').read_text()[-2000:]}")
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    stop_vm()
    return seconds


try:
    timed([*invoke, "build-demo"])
    timed([*invoke, "run", IMAGE])  # also warms the page cache for both sides
    pid = qemu_pid()
    assert pid is not None, "invoke run left no pid"
    qemu = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    port = int((state / "ssh_port").read_text().strip())
    timed([*invoke, "ssh", IMAGE, "--", "true"])
    stop_vm()
    say("raw QEMU: " + " ".join(qemu))
    ssh_true = ["ssh", "-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=1", "-o", "IdentitiesOnly=yes",
                "-i", str(keys.project_key(output)), "-p", str(port), "root@127.0.0.1", "true"]
    t = alternate(pairs, {"run + ssh": ours, "raw qemu + ssh loop": raw}, "boot ")
finally:
    stop_vm()
    shutil.rmtree(work, ignore_errors=True)
finish([figure("boot to SSH: run + ssh vs raw qemu + ssh loop", t["run + ssh"], t["raw qemu + ssh loop"],
               op="<=", limit=1.05)])
