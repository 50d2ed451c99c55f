"""One VM's state folder, its QEMU process and its SSH port.

Everything about one running VM lives in its state folder, output/<image>/run/ (the boot test
uses output/<image>/boot-test/):

    pid          the real QEMU pid (QEMU writes it itself: -daemonize + -pidfile, so no zombie)
    qmp.sock     the QMP control socket (stop, status)
    qga.sock     the guest agent's virtio-serial channel (org.qemu.guest_agent.0)
    ssh_port     the host port forwarded to the guest's port 22 on 127.0.0.1
    console.log  the serial console
    known_hosts  the guest's host keys (first contact pins them; reset on a new build)
    accel        accelerator name, then why it was chosen
    started_at   epoch seconds
    snapshot     present while the VM writes to a temporary overlay (-snapshot)
    build_id     the build that was booted (a new one resets known_hosts)
    efivars.fd   this image's writable copy of the UEFI variables
    serial.sock  the serial console's socket (`invoke console` attaches to it; console.log logs it)

An instance's folder (output/instances/<name>/, pipeline.vm.instances) is a state folder too, and
also holds its record (instance.json), its disk (disk.qcow2, an overlay on one build), its NoCloud
seed (seed.iso) and, while it runs, the pids of its idle watcher and virtiofsd daemons.

A state folder whose pid is gone (or is not this VM's QEMU any more) is stale and is cleaned up
by the next command that looks at it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.base import procs
from pipeline.base.fsutil import atomic_write, ensure_dir, flocked, read_record
from pipeline.base.numbers import decimal_or_none, int_or_none
from pipeline.base.text import visible_lines
from pipeline.output import artifacts

STATE_DIR = "run"
BOOT_TEST_DIR = "boot-test"
UNIX_PATH_MAX = 100  # sockaddr_un.sun_path is 104 (macOS) / 108 (Linux) bytes with the NUL
# Files that describe a live VM (removed on stop); console.log, known_hosts, efivars.fd, build_id stay.
LIVE_FILES = ("pid", "qmp.sock", "ssh_port", "accel", "started_at", "snapshot")


@dataclass(frozen=True)
class StatePaths:
    """Where one VM's state lives."""

    root: Path

    @property
    def pid(self) -> Path:
        return self.root / "pid"

    @property
    def qmp(self) -> Path:
        """qmp.sock in the folder, or a short path under the temp dir when that is too long."""
        return self._socket("qmp")

    @property
    def qga(self) -> Path:
        """The guest agent's socket: qga.sock in the folder (or a short temp path, as qmp)."""
        return self._socket("qga")

    @property
    def serial(self) -> Path:
        """The serial console's socket (or a short temp path, as qmp)."""
        return self.socket("serial")

    def socket(self, name: str) -> Path:
        """`name`.sock in the folder, or a short path under the temp dir when that is too long
        for a unix socket."""
        return self._socket(name)

    def _socket(self, name: str) -> Path:
        sock = self.root / f"{name}.sock"
        if len(os.fsencode(sock)) <= UNIX_PATH_MAX:
            return sock
        digest = hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"imagepipe-{os.getuid()}-{digest}.{name}"

    @property
    def ssh_port(self) -> Path:
        return self.root / "ssh_port"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def accel(self) -> Path:
        return self.root / "accel"

    @property
    def started_at(self) -> Path:
        return self.root / "started_at"

    @property
    def build_id(self) -> Path:
        return self.root / "build_id"

    @property
    def efivars(self) -> Path:
        return self.root / "efivars.fd"

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshot"

    @property
    def record(self) -> Path:
        """An instance's record (instance.json)."""
        return self.root / "instance.json"

    @property
    def disk(self) -> Path:
        """An instance's disk: a qcow2 overlay whose backing file is one build's image."""
        return self.root / "disk.qcow2"

    @property
    def seed(self) -> Path:
        """An instance's NoCloud seed (an ISO labelled cidata)."""
        return self.root / "seed.iso"

    @property
    def watcher(self) -> Path:
        """The idle watcher's pid (while the instance runs with --idle-stop)."""
        return self.root / "watcher.pid"

    @property
    def stopped_by(self) -> Path:
        """Why the instance stopped itself last (the idle watcher writes it)."""
        return self.root / "stopped_by"


def state_paths(output_dir: Path, image: str, kind: str = STATE_DIR) -> StatePaths:
    """output/<image>/run (or output/<image>/boot-test for the boot-test gate)."""
    return StatePaths(output_dir / image / kind)


@dataclass(frozen=True)
class VmStatus:
    """What `invoke status` reports about one image."""

    image: str
    state: str                 # running | stopped
    pid: int | None = None
    ssh_port: int | None = None
    accelerator: str | None = None
    accel_reason: str | None = None
    started_at: float | None = None
    snapshot: bool = False
    stale_cleaned: bool = False
    paused: str | None = None  # why a running VM's guest is paused (QMP), e.g. the host disk is full

    def uptime(self, now: float | None = None) -> float | None:
        if self.started_at is None or self.state != "running":
            return None
        return max(0.0, (now if now is not None else time.time()) - self.started_at)

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        up = self.uptime(now)
        return {
            "image": self.image, "state": self.state, "pid": self.pid, "ssh_port": self.ssh_port,
            "accelerator": self.accelerator, "accelerator_reason": self.accel_reason,
            "started_at": self.started_at, "uptime_s": round(up, 1) if up is not None else None,
            "snapshot": self.snapshot, "paused": self.paused,
        }


@dataclass(frozen=True)
class Built:
    """The published build of an image, as `invoke status` shows it (from its manifest)."""

    build_id: str
    finished: str          # UTC, as the manifest records it
    size: int              # bytes of the image file
    sha256: str
    path: str              # the stable path, output/<image>/<artifact>
    where: str             # "local" or the builder it was fetched from

    def as_json(self) -> dict[str, Any]:
        return {"build_id": self.build_id, "finished": self.finished, "size": self.size,
                "size_mib": round(self.size / 1024**2, 1), "sha256": self.sha256, "path": self.path,
                "where": self.where}


def published(output_dir: Path, image: str, artifact_name: str) -> Built | None:
    """What is published for `image` (None when nothing is, or its manifest is unreadable)."""
    try:
        manifest = artifacts.read_manifest(output_dir / image)
        if not manifest:
            return None
        art = manifest["artifact"]
        return Built(str(manifest["build_id"]), str(manifest.get("finished", "?")), int(art["size"]),
                     str(art["sha256"]), str(output_dir / image / artifact_name),
                     str((manifest.get("host") or {}).get("where", "local")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------- files + process


def read_value(path: Path) -> str | None:
    """The value a state file holds (stripped); None when there is none (or it is not a file
    imagepipe wrote: a link, a folder, unreadable bytes)."""
    if path.is_symlink():
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def ensure_state_dir(state: StatePaths) -> None:
    """The state folder, created as a real folder inside a real image folder (links refused)."""
    ensure_dir(state.root, state.root.parent.parent)


@contextlib.contextmanager
def one_at_a_time(state: StatePaths, image: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the state folder's lock (`.lock`, fsutil.flocked) for the duration. Two boot tests of
    one image (a timer's build and `invoke test-image`, say) share output/<image>/boot-test: the
    second says whom it waits for and starts once the first has stopped its VM, instead of
    failing on "already running"."""
    ensure_state_dir(state)
    lock = state.root / ".lock"

    def busy() -> None:
        pid = int_or_none(read_record(lock).get("pid"), lo=1)
        say(f"{image}: waiting for the boot test already running ({f'pid {pid}' if pid else 'another process'}) "
            "to finish…")

    with flocked(lock, {"pid": os.getpid()}, busy):
        yield


def write_value(path: Path, text: str) -> None:
    """One value per file, written atomically: a reader never sees half a value."""
    atomic_write(path, text + "\n")


def is_our_qemu(cmdline: str | None, state: StatePaths) -> bool:
    """A live process is this VM when it is a qemu-system binary writing this state folder."""
    if not cmdline:
        return False
    first = cmdline.split(" ", 1)[0]
    return "qemu-system" in Path(first).name and os.fspath(state.console) in cmdline


def alive(pid: int, state: StatePaths) -> bool:
    """True when `pid` is still this VM's QEMU (a reused pid is not)."""
    return is_our_qemu(procs.cmdline(pid), state)


def read_status(image: str, state: StatePaths) -> VmStatus:
    """running/stopped from the state folder; a stale pidfile is cleaned up on the way."""
    if state.root.is_symlink():  # not a folder imagepipe made: nothing of ours runs from it
        return VmStatus(image, "stopped")
    pid_text = read_value(state.pid)
    if pid_text is None:
        return VmStatus(image, "stopped")
    pid = int_or_none(pid_text, lo=1, hi=2**31)
    if pid is None or not alive(pid, state):
        clear_live_state(state)
        return VmStatus(image, "stopped", stale_cleaned=True)
    accel = (read_value(state.accel) or "").split("\n", 1)
    port = read_value(state.ssh_port)
    started = read_value(state.started_at)
    return VmStatus(
        image, "running", pid=pid, ssh_port=int_or_none(port, lo=1, hi=65535),
        accelerator=accel[0] or None, accel_reason=accel[1] if len(accel) > 1 else None,
        started_at=decimal_or_none(started, hi=1e11), snapshot=state.snapshot.exists(),
    )


def clear_live_state(state: StatePaths) -> None:
    """Remove what describes a live VM; keep the console log, host keys and UEFI variables.
    Never inside a state folder that is a link (its files are not imagepipe's)."""
    if state.root.is_symlink():
        return
    for name in LIVE_FILES:
        (state.root / name).unlink(missing_ok=True)
    state.qmp.unlink(missing_ok=True)
    state.qga.unlink(missing_ok=True)
    state.serial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    """True when 127.0.0.1:`port` can be bound (as QEMU's forward will, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_port(preferred: int, is_free: Callable[[int], bool] = port_free,
              fallback: Callable[[], int] = free_port) -> int:
    """The configured port when it is free, else any free one."""
    return preferred if is_free(preferred) else fallback()


# -------------------------------------------------------------------------------- waiting


def wait_gone(pid: int, state: StatePaths, timeout: float, interval: float = 0.2) -> bool:
    """Poll until the VM's process has ended (it is not our child: no wait() possible)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, state):
            return True
        time.sleep(interval)
    return not alive(pid, state)


def console_tail(state: StatePaths, lines: int = 30) -> str:
    """The last `lines` lines of the serial console (a guest's escape sequences made visible)."""
    text = read_value(state.console) or ""
    return visible_lines("\n".join(text.splitlines()[-lines:]))
