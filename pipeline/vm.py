"""Run, reach, stop and boot-test images in QEMU.

The QEMU command line is a pure function (`qemu_argv`) of the image, the accelerator choice, the
firmware, the disk, the state folder and the SSH port. Everything about one running VM lives in
its state folder, output/<image>/run/:

    pid          the real QEMU pid (QEMU writes it itself: -daemonize + -pidfile, so no zombie)
    qmp.sock     the QMP control socket (stop, status)
    ssh_port     the host port forwarded to the guest's port 22 on 127.0.0.1
    console.log  the serial console
    known_hosts  the guest's host keys (first contact pins them; reset on a new build)
    accel        accelerator name, then why it was chosen
    started_at   epoch seconds
    build_id     the build that was booted (a new one resets known_hosts)
    efivars.fd   this image's writable copy of the UEFI variables

A state folder whose pid is gone (or is not this VM's QEMU any more) is stale and is cleaned up
by the next command that looks at it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts, keys, procs
from pipeline.config import Accel, Arch, Config, Distro, Firmware, Image
from pipeline.errors import CommandFailed, ImagepipeError, Interrupted, UsageError, VerifyFailed
from pipeline.fsutil import atomic_copy, atomic_write
from pipeline.host import FirmwareInfo, HostFacts, probe
from pipeline.plan import AccelChoice, choose_accel, firmware_for
from pipeline.run import interactive, run

STATE_DIR = "run"
BOOT_TEST_DIR = "boot-test"
GUEST_SSH_PORT = 22
SSH_DEADLINE = {Accel.TCG: 120.0, Accel.KVM: 60.0, Accel.HVF: 60.0}
UNIX_PATH_MAX = 100  # sockaddr_un.sun_path is 104 (macOS) / 108 (Linux) bytes with the NUL
KEYSCAN_TYPES = "ed25519,ecdsa"  # every current sshd has one; RSA keygen in a TCG guest is slow
# Files that describe a live VM (removed on stop); console.log, known_hosts, efivars.fd, build_id stay.
LIVE_FILES = ("pid", "qmp.sock", "ssh_port", "accel", "started_at", "snapshot")


class QmpError(ImagepipeError):
    """The QMP socket refused a command or went away."""


# ----------------------------------------------------------------------------------- data


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
        sock = self.root / "qmp.sock"
        if len(os.fsencode(sock)) <= UNIX_PATH_MAX:
            return sock
        digest = hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"imagepipe-{os.getuid()}-{digest}.qmp"

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


def state_paths(output_dir: Path, image: str, kind: str = STATE_DIR) -> StatePaths:
    """output/<image>/run (or output/<image>/boot-test for the boot-test gate)."""
    return StatePaths(output_dir / image / kind)


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (the demo image): no firmware, the kernel and initrd beside the disk."""

    kernel: Path
    initrd: Path
    append: str


@dataclass(frozen=True)
class Target:
    """What to boot: one image file of one build."""

    image: Image
    disk: Path
    format: str
    build_id: str
    boot: BootSpec | None = None


@dataclass(frozen=True)
class RunOptions:
    snapshot: bool = False     # writes go to a temporary overlay: the image file stays untouched
    gui: bool = False          # a display window instead of -display none
    foreground: bool = False   # console on this terminal instead of -daemonize


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
            "snapshot": self.snapshot,
        }


# ------------------------------------------------------------------------- the command line


def _opt(value: Path | str) -> str:
    """A value inside a QEMU `key=value,...` option: commas are doubled."""
    return os.fspath(value).replace(",", ",,")


def qemu_argv(
    image: Image,
    accel: AccelChoice,
    firmware: FirmwareInfo | None,
    disk: Path,
    state: StatePaths,
    port: int,
    *,
    disk_format: str = "qcow2",
    boot: BootSpec | None = None,
    opts: RunOptions = RunOptions(),
) -> list[str]:
    """The full QEMU command line for `image` (pure: the same inputs give the same argv)."""
    argv = [image.arch.qemu_binary, "-name", image.name]
    argv += _machine(image.arch, accel)
    argv += ["-smp", str(image.cpus), "-m", str(image.memory)]
    argv += _boot_args(image, firmware, state, boot)
    argv += ["-drive", f"if=virtio,format={disk_format},file={_opt(disk)}"]
    if opts.snapshot:
        argv.append("-snapshot")
    argv += [
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_SSH_PORT}",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",  # entropy: sshd key generation does not stall at boot
    ]
    argv += _console_args(state, opts.foreground)
    argv += ["-chardev", f"socket,id=qmp,path={_opt(state.qmp)},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]
    argv += _display_args(image.arch, opts.gui)
    argv += ["-pidfile", os.fspath(state.pid)]
    if not opts.foreground:
        argv.append("-daemonize")
    return argv


def _machine(arch: Arch, accel: AccelChoice) -> list[str]:
    machine = arch.machine
    if arch is Arch.AARCH64:
        # gic-version=max: the host's GIC under KVM/HVF (GICv3-only hosts reject the default v2)
        machine += ",gic-version=max"
    argv = ["-machine", machine, "-accel", accel.accel.value, "-cpu", accel.cpu_model]
    if arch is Arch.AARCH64:
        argv += ["-boot", "strict=on"]  # UEFI must not fall through to PXE
    return argv


def _boot_args(image: Image, firmware: FirmwareInfo | None, state: StatePaths, boot: BootSpec | None) -> list[str]:
    if boot is not None:
        return ["-kernel", os.fspath(boot.kernel), "-initrd", os.fspath(boot.initrd), "-append", boot.append]
    if image.firmware is Firmware.BIOS:
        if image.arch is Arch.AARCH64:
            raise UsageError(f"{image.name}: aarch64 guests have no BIOS", "set firmware: uefi for this image in invoke.yaml")
        return []  # SeaBIOS, QEMU's default on q35
    if firmware is None:
        raise UsageError(f"{image.name}: UEFI firmware is required but none was given")
    if firmware.vars is None:
        return ["-bios", os.fspath(firmware.code)]  # a code-only build (e.g. QEMU_EFI_AARCH64)
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(firmware.code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={_opt(state.efivars)}",
    ]


def _console_args(state: StatePaths, foreground: bool) -> list[str]:
    if foreground:
        # the console on this terminal (Ctrl-A X quits, Ctrl-C goes to the guest), logged too
        return ["-chardev", f"stdio,id=console,mux=on,signal=off,logfile={_opt(state.console)}",
                "-serial", "chardev:console", "-mon", "chardev=console,mode=readline"]
    return ["-chardev", f"file,id=console,path={_opt(state.console)}", "-serial", "chardev:console",
            "-monitor", "none"]


def _display_args(arch: Arch, gui: bool) -> list[str]:
    if not gui:
        return ["-display", "none"]
    if arch is Arch.AARCH64:  # virt has no default display or input devices
        return ["-device", "virtio-gpu-pci", "-device", "qemu-xhci", "-device", "usb-kbd", "-device", "usb-tablet"]
    return []


# ------------------------------------------------------------------------------ targets


def boot_spec(boot: dict[str, Any] | None, base: Path) -> BootSpec | None:
    """A manifest's "boot" entry → BootSpec (relative kernel/initrd paths are under `base`)."""
    if not boot:
        return None
    return BootSpec(base / boot["kernel"], base / boot["initrd"], str(boot.get("append", "")))


def published_target(cfg: Config, image: Image) -> Target:
    """The published build of `image`, resolved to builds/<id>/ (a later publish cannot swap it)."""
    image_dir = cfg.output_dir / image.name
    manifest = artifacts.read_manifest(image_dir)
    disk = artifacts.published_image(image_dir)
    build = artifacts.current_build(image_dir)
    if manifest is None or disk is None or build is None:
        raise UsageError(f"{image.name} has not been built yet (nothing published under {image_dir})",
                         f"build it first: invoke build {image.name}")
    boot = boot_spec(manifest.get("boot"), build)
    if image.distro is Distro.DEMO and boot is None:
        raise VerifyFailed(f"{image_dir / artifacts.MANIFEST}: the demo image's manifest has no boot entry")
    return Target(image, disk, manifest["artifact"].get("format", image.format.value), manifest["build_id"], boot)


def staged_target(image: Image, image_file: Path, boot_info: dict[str, Any] | None, build_id: str = "staged") -> Target:
    """An explicit image file (a build not yet published) with its boot info."""
    return Target(image, Path(image_file), image.format.value, build_id, boot_spec(boot_info, Path(image_file).parent))


# ------------------------------------------------------------------------------ processes


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write(path: Path, text: str) -> None:
    """One value per file, written atomically: a reader never sees half a value."""
    atomic_write(path, text + "\n")


def is_our_qemu(cmdline: str | None, state: StatePaths) -> bool:
    """A live process is this VM when it is a qemu-system binary writing this state folder."""
    if not cmdline:
        return False
    first = cmdline.split(" ", 1)[0]
    return "qemu-system" in Path(first).name and os.fspath(state.console) in cmdline


def alive(pid: int, state: StatePaths) -> bool:
    return is_our_qemu(procs.cmdline(pid), state)


def read_status(image: str, state: StatePaths) -> VmStatus:
    """running/stopped from the state folder; a stale pidfile is cleaned up on the way."""
    pid_text = _read(state.pid)
    if pid_text is None:
        return VmStatus(image, "stopped")
    pid = int(pid_text) if pid_text.isdigit() else None
    if pid is None or not alive(pid, state):
        clear_live_state(state)
        return VmStatus(image, "stopped", stale_cleaned=True)
    accel = (_read(state.accel) or "").split("\n", 1)
    port = _read(state.ssh_port)
    started = _read(state.started_at)
    return VmStatus(
        image, "running", pid=pid, ssh_port=int(port) if port and port.isdigit() else None,
        accelerator=accel[0] or None, accel_reason=accel[1] if len(accel) > 1 else None,
        started_at=float(started) if started else None, snapshot=state.snapshot.exists(),
    )


def clear_live_state(state: StatePaths) -> None:
    """Remove what describes a live VM; keep the console log, host keys and UEFI variables."""
    for name in LIVE_FILES:
        (state.root / name).unlink(missing_ok=True)
    state.qmp.unlink(missing_ok=True)


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


# ------------------------------------------------------------------------------------ QMP


class Qmp:
    """A tiny QMP client over the VM's unix socket (stdlib socket + json)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"cannot connect to QMP socket {path}: {exc.strerror or exc}") from None
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP socket closed")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one command; return its "return" value (events on the way are skipped)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")

    def quit(self) -> None:
        """`quit`: QEMU may close the socket before or after answering."""
        with contextlib.suppress(EOFError, OSError):
            self.execute("quit")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- start


def ephemeral_root(image: Image) -> bool:
    """Guests whose root file system (and so their SSH host keys) is new on every boot."""
    return image.distro is Distro.DEMO


def reset_known_hosts(previous_build: str | None, build_id: str, snapshot: bool, ephemeral: bool) -> bool:
    """Forget pinned host keys when the guest cannot have kept them: a new build, a throw-away
    overlay (-snapshot) or a guest that makes new keys on every boot."""
    return previous_build != build_id or snapshot or ephemeral


def prepare_state(state: StatePaths, target: Target, firmware: FirmwareInfo | None, opts: RunOptions) -> None:
    """Create the folder, the UEFI variables copy, a fresh console log; reset known_hosts if due."""
    state.root.mkdir(parents=True, exist_ok=True)
    previous = _read(state.build_id)
    if previous != target.build_id:
        state.efivars.unlink(missing_ok=True)  # boot entries of the old disk mean nothing to a new one
    if firmware is not None and firmware.vars and target.boot is None and not state.efivars.exists():
        atomic_copy(Path(firmware.vars), state.efivars)
    if reset_known_hosts(previous, target.build_id, opts.snapshot, ephemeral_root(target.image)):
        state.known_hosts.write_text("", encoding="utf-8")
    _write(state.build_id, target.build_id)
    state.console.write_text("", encoding="utf-8")
    state.known_hosts.touch()


def _record(state: StatePaths, port: int, accel: AccelChoice, opts: RunOptions) -> None:
    _write(state.ssh_port, str(port))
    _write(state.accel, f"{accel.accel.value}\n{accel.reason}")
    _write(state.started_at, f"{time.time():.3f}")
    if opts.snapshot:
        _write(state.snapshot, "1")


PORT_RACE = "Could not set up host forwarding rule"


def start(
    target: Target, state: StatePaths, accel: AccelChoice, firmware: FirmwareInfo | None,
    opts: RunOptions = RunOptions(), *, port: int | None = None, say: Callable[[str], None] = print,
) -> VmStatus:
    """Boot `target` detached (or attached with opts.foreground); returns its status.

    The configured port is used when free, else another free one; it is recorded in the state
    folder, where every other task reads it.
    """
    current = read_status(target.image.name, state)
    if current.state == "running":
        raise UsageError(f"{target.image.name} is already running (pid {current.pid}, ssh port {current.ssh_port})",
                         f"invoke ssh {target.image.name}, or invoke stop {target.image.name}")
    prepare_state(state, target, firmware, opts)
    chosen = pick_port(port if port is not None else target.image.ssh_port)
    for attempt in range(3):
        argv = qemu_argv(target.image, accel, firmware, target.disk, state, chosen, disk_format=target.format,
                         boot=target.boot, opts=opts)
        _record(state, chosen, accel, opts)
        if opts.foreground:
            return _foreground(target, state, argv, chosen, say)
        try:
            _launch(argv, state)
            break
        except CommandFailed as exc:
            clear_live_state(state)
            if PORT_RACE not in exc.tail or attempt == 2:
                raise
            chosen = free_port()  # someone took the port between our check and QEMU's bind
    return read_status(target.image.name, state)


def _launch(argv: list[str], state: StatePaths) -> None:
    """qemu -daemonize: the parent returns once the VM is set up; the pidfile holds the real pid.

    The daemon is re-parented to init (no zombie of ours) and is in its own session, so a
    Ctrl-C in this terminal later does not reach it. Ctrl-C during start-up stops it again.
    """
    try:
        run(argv, timeout=60, hint=f"serial console: {state.console}")
        pid = _read(state.pid)
        if not pid or not alive(int(pid), state):
            raise CommandFailed(argv, 0, console_tail(state), hint="QEMU exited right after starting")
    except (KeyboardInterrupt, Interrupted):
        _kill_from_pidfile(state)
        clear_live_state(state)
        raise Interrupted("interrupted while starting the VM: it was stopped again") from None


def _foreground(target: Target, state: StatePaths, argv: list[str], port: int, say: Callable[[str], None]) -> VmStatus:
    say(f"{target.image.name}: console attached (Ctrl-A X quits QEMU, Ctrl-A C toggles the monitor); "
        f"ssh on 127.0.0.1:{port}")
    try:
        code = interactive(argv)
    finally:
        clear_live_state(state)
    if code != 0:
        raise CommandFailed(argv, code, console_tail(state))
    return VmStatus(target.image.name, "stopped")


def _kill_from_pidfile(state: StatePaths) -> None:
    pid = _read(state.pid)
    if pid and pid.isdigit() and alive(int(pid), state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


# ----------------------------------------------------------------------------------- stop


def wait_gone(pid: int, state: StatePaths, timeout: float, interval: float = 0.2) -> bool:
    """Poll until the VM's process has ended (it is not our child: no wait() possible)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, state):
            return True
        time.sleep(interval)
    return not alive(pid, state)


def stop(image: str, state: StatePaths, *, force: bool = False, grace: float = 60.0,
         say: Callable[[str], None] = print) -> str:
    """Power the VM off: ACPI power button over QMP, wait `grace` s, then `quit`; --force: quit now.

    Ctrl-C while waiting ends the VM at once (quit, then SIGKILL), so it is never left half-stopped.
    Returns a one-line description of what happened.
    """
    st = read_status(image, state)
    if st.state != "running" or st.pid is None:
        return f"{image} is not running" + (" (removed a stale pidfile)" if st.stale_cleaned else "")
    try:
        if force:
            _hard_stop(st.pid, state)
            how = "stopped at once (quit)"
        else:
            how = _graceful_stop(st.pid, state, grace, say)
    except (KeyboardInterrupt, Interrupted):
        _hard_stop(st.pid, state)
        clear_live_state(state)
        raise Interrupted(f"interrupted: {image} was stopped at once (quit)") from None
    clear_live_state(state)
    return f"{image}: {how}"


def _graceful_stop(pid: int, state: StatePaths, grace: float, say: Callable[[str], None]) -> str:
    try:
        with Qmp(state.qmp) as qmp:
            qmp.execute("system_powerdown")
    except (QmpError, OSError, EOFError) as exc:
        say(f"QMP unavailable ({exc}); stopping the process")
        _hard_stop(pid, state)
        return "stopped (QMP unavailable)"
    say(f"sent the ACPI power button; waiting up to {grace:.0f}s for the guest to power off")
    if wait_gone(pid, state, grace):
        return "powered off"
    _hard_stop(pid, state)
    return f"did not power off within {grace:.0f}s: stopped with quit"


def _hard_stop(pid: int, state: StatePaths) -> None:
    """QMP quit, and SIGKILL if the process is still there a few seconds later."""
    with contextlib.suppress(QmpError, OSError, EOFError), Qmp(state.qmp, timeout=5) as qmp:
        qmp.quit()
    if not wait_gone(pid, state, 10):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, state, 5)


# ------------------------------------------------------------------------------------ SSH


def console_tail(state: StatePaths, lines: int = 30) -> str:
    text = _read(state.console) or ""
    return "\n".join(text.splitlines()[-lines:])


def host_key_alias(image: str) -> str:
    """known_hosts entries are keyed by image, not by port: a changed port keeps the pin."""
    return f"imagepipe-{image}"


def parse_keyscan(out: str, alias: str) -> list[str]:
    """ssh-keyscan output → known_hosts lines under `alias` (comments dropped)."""
    lines = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            lines.append(" ".join([alias, parts[1], parts[2]]))
    return lines


def keyscan(port: int, timeout: int = 5) -> str:
    res = run(["ssh-keyscan", "-T", str(timeout), "-t", KEYSCAN_TYPES, "-p", str(port), "127.0.0.1"],
              check=False, timeout=timeout * 3 + 5)
    return res.stdout


def wait_for_ssh(image: str, state: StatePaths, port: int, deadline: float,
                 pid: int | None = None, interval: float = 1.0) -> list[str]:
    """Wait until the guest's sshd completes a key exchange (a forward accepts TCP long before).

    Returns the host keys as known_hosts lines; VerifyFailed with the console tail on timeout
    or when QEMU dies meanwhile.
    """
    end = time.monotonic() + deadline
    alias = host_key_alias(image)
    while True:
        found = parse_keyscan(keyscan(port), alias)
        if found:
            return found
        if pid is not None and not alive(pid, state):
            raise VerifyFailed(f"{image}: QEMU exited before SSH came up\n{_tail_block(state)}",
                               f"serial console: {state.console}")
        if time.monotonic() >= end:
            raise VerifyFailed(f"{image}: no SSH answer on 127.0.0.1:{port} within {deadline:.0f}s\n{_tail_block(state)}",
                               f"serial console: {state.console}")
        time.sleep(interval)


def _tail_block(state: StatePaths) -> str:
    tail = console_tail(state)
    return "console log (last lines):\n" + "\n".join(f"  | {line}" for line in tail.splitlines()) if tail else "console log is empty"


def pin_host_keys(state: StatePaths, found: Sequence[str]) -> None:
    """First contact with this boot: pin the keys (accept-new, for this file only)."""
    current = _read(state.known_hosts)
    if not current:
        _write(state.known_hosts, "\n".join(found))


def ssh_argv(image: str, state: StatePaths, key: Path, user: str, port: int,
             command: Sequence[str] = (), *, batch: bool = False) -> list[str]:
    """ssh with this VM's own known_hosts, strict checking and only the given key (pure)."""
    argv = [
        "ssh", "-F", "none",  # the user's ~/.ssh/config must not redirect or multiplex this
        "-o", f"UserKnownHostsFile={state.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"HostKeyAlias={host_key_alias(image)}",
        "-o", "IdentitiesOnly=yes",
        "-o", "ConnectTimeout=10",
        "-o", "LogLevel=ERROR",
        "-i", os.fspath(key), "-p", str(port),
    ]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    return argv + [f"{user}@127.0.0.1", *command]


def login_key(cfg: Config) -> Path:
    """defaults.ssh_key, else the project key (created on first use)."""
    return keys.project_key(cfg.output_dir, cfg.defaults.ssh_key)


def ensure_reachable(image: Image, state: StatePaths, deadline: float | None = None) -> int:
    """The running VM's port, once sshd answers and its keys are pinned."""
    st = read_status(image.name, state)
    if st.state != "running" or st.ssh_port is None:
        raise UsageError(f"{image.name} is not running", f"start it: invoke run {image.name}")
    wait = deadline if deadline is not None else SSH_DEADLINE.get(Accel(st.accelerator or "tcg"), 120.0)
    pin_host_keys(state, wait_for_ssh(image.name, state, st.ssh_port, wait, st.pid))
    return st.ssh_port


def ssh_session(cfg: Config, image: Image, command: Sequence[str], deadline: float | None = None) -> int:
    """`invoke ssh`: wait for sshd, then ssh attached to this terminal; returns ssh's exit code."""
    state = state_paths(cfg.output_dir, image.name)
    port = ensure_reachable(image, state, deadline)
    return interactive(ssh_argv(image.name, state, login_key(cfg), image.ssh_user, port, command))


# ------------------------------------------------------------------------ decisions + run


def decide(cfg: Config, image: Image, requested: Accel | None, facts: HostFacts | None = None,
           needs_firmware: bool = True) -> tuple[AccelChoice, FirmwareInfo | None]:
    """Accelerator and firmware for running `image` here."""
    facts = facts or probe(tools=())
    accel = choose_accel(requested or cfg.defaults.accel, facts, image.arch, purpose="run")
    firmware = firmware_for(image, facts) if needs_firmware else None
    return accel, firmware


def run_image(cfg: Config, image: Image, requested: Accel | None, opts: RunOptions,
              say: Callable[[str], None] = print) -> VmStatus:
    """`invoke run`: boot the published image."""
    target = published_target(cfg, image)
    accel, firmware = decide(cfg, image, requested, needs_firmware=target.boot is None)
    say(f"{image.name}: accelerator {accel.accel.value} ({accel.reason})")
    if not opts.snapshot:
        say(f"{image.name}: writes go to {target.disk} (use --snapshot to leave the image untouched)")
    return start(target, state_paths(cfg.output_dir, image.name), accel, firmware, opts, say=say)


def statuses(cfg: Config) -> list[VmStatus]:
    """Every configured image's VM state (stale pidfiles are cleaned on the way)."""
    return [read_status(name, state_paths(cfg.output_dir, name)) for name in sorted(cfg.images)]


# ------------------------------------------------------------------------------ boot test


def _guest(image: Image, state: StatePaths, key: Path, port: int, command: Sequence[str]) -> str:
    res = run(ssh_argv(image.name, state, key, image.ssh_user, port, command, batch=True), check=False, timeout=60)
    if not res.ok:
        raise VerifyFailed(f"{image.name}: `{' '.join(command)}` failed in the guest (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-300:]}")
    return res.stdout.strip()


def _login(image: Image, state: StatePaths, key: Path, port: int, deadline: float) -> str:
    """Log in (retrying until `deadline`: keys may still be arriving); returns `uname -m`."""
    end = time.monotonic() + deadline
    while True:
        try:
            return _guest(image, state, key, port, ["uname", "-m"])
        except VerifyFailed as exc:
            if time.monotonic() >= end:
                raise VerifyFailed(f"{image.name}: cannot log in as {image.ssh_user} with {key} within "
                                   f"{deadline:.0f}s ({exc.message})\n{_tail_block(state)}",
                                   "check defaults.ssh_key / the image's public_keys") from None
            time.sleep(2)


def check_guest(image: Image, state: StatePaths, key: Path, port: int, deadline: float) -> None:
    """uname -m must be the image's arch; the SSH user must be root or able to sudo."""
    machine = _login(image, state, key, port, deadline)
    if Arch.from_machine(machine) is not image.arch:
        raise VerifyFailed(f"{image.name}: guest reports uname -m = {machine!r}, expected {image.arch.value}")
    probe_cmd = ["id", "-u"] if image.ssh_user == "root" else ["sudo", "-n", "id", "-u"]
    uid = _guest(image, state, key, port, probe_cmd)
    if uid != "0":
        raise VerifyFailed(f"{image.name}: {' '.join(probe_cmd)} printed {uid!r}, expected 0 "
                           f"({image.ssh_user} cannot become root)")


def _power_off(image: Image, state: StatePaths, key: Path, port: int, pid: int) -> None:
    """Ask the guest to power off (ssh), fall back to QMP powerdown/quit."""
    cmd = ["poweroff"] if image.ssh_user == "root" else ["sudo", "-n", "poweroff"]
    run(ssh_argv(image.name, state, key, image.ssh_user, port, cmd, batch=True), check=False, timeout=30)
    if not wait_gone(pid, state, 30):
        stop(image.name, state, grace=10, say=lambda _m: None)


def boot_test(cfg: Config, image: Image, image_file: Path, boot_info: dict[str, Any] | None,
              output_dir: Path, accel: Accel | None = None, *, deadline: float | None = None,
              build_id: str = "boot-test", say: Callable[[str], None] = lambda _m: None) -> None:
    """Boot `image_file` (published or still staged) with -snapshot, check SSH, arch and root
    access, power it off. Raises VerifyFailed (console tail included) on any failure; the VM is
    always stopped afterwards. `deadline` bounds the wait for SSH and for the login.
    """
    target = staged_target(image, Path(image_file), boot_info, build_id)
    accel_choice, firmware = decide(cfg, image, accel, needs_firmware=target.boot is None)
    wait = deadline if deadline is not None else SSH_DEADLINE[accel_choice.accel]
    state = state_paths(output_dir, image.name, BOOT_TEST_DIR)
    state.efivars.unlink(missing_ok=True)  # every boot test starts from the firmware's own variables
    key = keys.project_key(output_dir, cfg.defaults.ssh_key)
    say(f"{image.name}: boot test ({accel_choice.accel.value}), waiting up to {wait:.0f}s for SSH")
    try:
        st = start(target, state, accel_choice, firmware, RunOptions(snapshot=True), port=free_port(), say=say)
    except CommandFailed as exc:
        raise VerifyFailed(f"{image.name}: QEMU did not start: {exc.message}", exc.hint) from None
    if st.pid is None or st.ssh_port is None:
        raise VerifyFailed(f"{image.name}: QEMU exited right after starting\n{_tail_block(state)}")
    try:
        pin_host_keys(state, wait_for_ssh(image.name, state, st.ssh_port, wait, st.pid))
        check_guest(image, state, key, st.ssh_port, wait)
        _power_off(image, state, key, st.ssh_port, st.pid)
    finally:
        if read_status(image.name, state).state == "running":
            stop(image.name, state, force=True, say=lambda _m: None)
        clear_live_state(state)


@dataclass(frozen=True)
class BootTestResult:
    image: str
    result: str            # passed | failed | not built
    seconds: float = 0.0
    detail: str = ""


def boot_test_published(cfg: Config, image: Image, accel: Accel | None, deadline: float | None = None,
                   say: Callable[[str], None] = print) -> BootTestResult:
    """The boot test of one published image, as a result row (never raises VerifyFailed)."""
    try:
        target = published_target(cfg, image)
    except UsageError:
        return BootTestResult(image.name, "not built")
    running = read_status(image.name, state_paths(cfg.output_dir, image.name))
    if running.state == "running" and not running.snapshot:
        # QEMU's image locking would refuse a second opener of a file a VM writes to
        return BootTestResult(image.name, "failed", 0.0,
                              f"{image.name} is running and writing to its image (pid {running.pid}): "
                              f"stop it first (invoke stop {image.name})")
    started = time.monotonic()
    boot = None
    if target.boot:
        boot = {"kernel": str(target.boot.kernel), "initrd": str(target.boot.initrd), "append": target.boot.append}
    try:
        boot_test(cfg, image, target.disk, boot, cfg.output_dir, accel, deadline=deadline,
                  build_id=target.build_id, say=say)
    except ImagepipeError as exc:
        return BootTestResult(image.name, "failed", time.monotonic() - started, exc.render())
    return BootTestResult(image.name, "passed", time.monotonic() - started, f"build {target.build_id}")


def results_table(rows: Sequence[BootTestResult]) -> str:
    """A plain-text summary table (pure)."""
    header = ("IMAGE", "RESULT", "TIME", "DETAIL")
    body = [(r.image, r.result, f"{r.seconds:.1f}s" if r.seconds else "-", r.detail.splitlines()[0] if r.detail else "")
            for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(3)]
    lines = []
    for row in [header, *body]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)
