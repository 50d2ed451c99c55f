"""Boot to SSH: `invoke run IMAGE` then `invoke ssh IMAGE -- true`, against the same QEMU command
line started by hand plus an ssh retry loop; on the demo image, and on the Debian 13 image where
the project has one.

Alternates the two (≥ 3 pairs), medians, ratio (goal ≤ 1.05). Setup, outside the timing: the
image is built into a temporary output folder and booted once by `invoke run`, whose QEMU
command line (read from /proc) is what the raw side starts (the Debian image's first boot, which
grows its root and makes its host keys, happens there too); every VM is stopped (QMP quit) after
its measurement, outside the timing. The raw side's ssh loop tries `ssh ... true` as the image's
ssh_user with the project key every 0.1 s, each waiting at most 1 s for the banner (QEMU holds a
connection the guest cannot answer yet); host keys are not checked: the floor, not a safe login.
Usage: python3 bench/boot_ssh.py [PAIRS] [--json]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import ROOT, Figure, alternate, count, figure, finish, say, timed, workspace

from pipeline import keys
from pipeline.vm import instances
from pipeline.vm.qmp import Qmp
from pipeline.vm.state import clear_live_state

DEADLINE = 300.0  # seconds for one boot to reach SSH (TCG on a busy machine; Debian's takes ~60 s)
pairs = count(5, minimum=3)


class Boot:
    def __init__(self, image: str, build: list[str]) -> None:
        self.image, self.build = image, build
        self.work, self.output, self.invoke = workspace()
        self.paths = instances.paths(self.output, image)  # `run IMAGE`: the instance named IMAGE
        self.state = self.paths.root
        self.qemu: list[str] = []
        self.ssh_true: list[str] = []

    def qemu_pid(self) -> int | None:
        try:
            return int((self.state / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_vm(self) -> None:
        """ACPI power-off (the same for both sides), then wait for the process to go; outside the
        timing. The instance keeps its disk between rounds: pulling the plug right after SSH
        answers can leave what the first boot wrote (a Debian guest's new SSH host keys) empty on
        that disk, and the next round's sshd would not start. QMP quit only if the guest does not
        power off within the deadline."""
        pid = self.qemu_pid()
        if pid is None:
            return
        try:
            with Qmp(self.paths.qmp, timeout=5) as qmp:
                qmp.execute("system_powerdown")
        except OSError:
            pass
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            try:
                with Qmp(self.paths.qmp, timeout=5) as qmp:
                    qmp.quit()
            except OSError:
                os.kill(pid, 9)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        clear_live_state(self.paths)

    def ours(self) -> float:
        start = time.perf_counter()
        subprocess.run([*self.invoke, "run", self.image], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run([*self.invoke, "ssh", self.image, "--", "true"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        self.stop_vm()
        return seconds

    def raw(self) -> float:
        start = time.perf_counter()
        subprocess.run(self.qemu, check=True)  # -daemonize: returns once QEMU is set up, as for `run`
        deadline = time.monotonic() + DEADLINE
        while subprocess.run(self.ssh_true, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode != 0:
            if time.monotonic() > deadline:
                self.stop_vm()
                sys.exit(f"raw side: no SSH within {DEADLINE:.0f}s; console:\n"
                         f"{(self.state / 'console.log').read_text()[-2000:]}")
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        self.stop_vm()
        return seconds

    def measure(self) -> Figure:
        try:
            timed([*self.invoke, *self.build])
            timed([*self.invoke, "run", self.image])  # also warms the page cache for both sides
            pid = self.qemu_pid()
            assert pid is not None, "invoke run left no pid"
            self.qemu = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
            port = int((self.state / "ssh_port").read_text().strip())
            timed([*self.invoke, "ssh", self.image, "--", "true"])
            self.stop_vm()
            say(f"{self.image}: raw QEMU: " + " ".join(self.qemu))
            user = (yaml.safe_load((ROOT / "invoke.yaml").read_text())["images"][self.image].get("ssh_user") or "root")
            self.ssh_true = ["ssh", "-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                             "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=1",
                             "-o", "IdentitiesOnly=yes", "-i", str(keys.project_key(self.output)), "-p", str(port),
                             f"{user}@127.0.0.1", "true"]
            t = alternate(pairs, {"run + ssh": self.ours, "raw qemu + ssh loop": self.raw}, f"{self.image} boot ")
        finally:
            self.stop_vm()
            shutil.rmtree(self.work, ignore_errors=True)
        return figure(f"boot to SSH, {self.image}: run + ssh vs raw qemu + ssh loop", t["run + ssh"],
                      t["raw qemu + ssh loop"], op="<=", limit=1.05)


images = [("demo-x86_64", ["build-demo"])]
if "debian13-x86_64" in (yaml.safe_load((ROOT / "invoke.yaml").read_text()).get("images") or {}):
    if os.geteuid() == 0:
        images.append(("debian13-x86_64", ["build", "debian13-x86_64"]))
    else:
        say("debian13-x86_64: not measured: its build (mmdebstrap) needs root")
finish([Boot(name, build).measure() for name, build in images])
