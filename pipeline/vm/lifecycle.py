"""A VM's life: what to boot (a published or a staged build), start it detached or attached,
stop it (ACPI power-off over QMP, then quit), and the accelerator + firmware it runs with."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import distros
from pipeline.base.errors import CommandFailed, Interrupted, QmpError, UsageError, VerifyFailed
from pipeline.base.fsutil import atomic_copy, atomic_write
from pipeline.base.numbers import int_or_none
from pipeline.base.run import interactive, run
from pipeline.firmware import FirmwareInfo
from pipeline.hints import build_hint
from pipeline.host import HostFacts, probe
from pipeline.model import Accel, Config, Image
from pipeline.output import artifacts
from pipeline.plan import AccelChoice, choose_accel, firmware_for
from pipeline.vm.argv import Attached, BootSpec, RunOptions, qemu_argv
from pipeline.vm.qmp import Qmp, disk_full
from pipeline.vm.state import (
    StatePaths,
    VmStatus,
    alive,
    clear_live_state,
    console_tail,
    ensure_state_dir,
    free_port,
    pick_port,
    read_status,
    read_value,
    wait_gone,
    write_value,
)

# ------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class BootTarget:
    """What to boot: one image file of one build (and its kernel + initrd for a direct boot)."""

    image: Image
    disk: Path
    format: str
    build_id: str
    boot: BootSpec | None = None


def boot_spec(boot: dict[str, Any] | None, base: Path) -> BootSpec | None:
    """A manifest's "boot" entry → BootSpec (relative kernel/initrd paths are under `base`)."""
    if not boot:
        return None
    return BootSpec(base / boot["kernel"], base / boot["initrd"], str(boot.get("append", "")))


def published_target(cfg: Config, image: Image) -> BootTarget:
    """The published build of `image`, resolved to builds/<id>/ (a later publish cannot swap it)."""
    image_dir = cfg.output_dir / image.name
    manifest = artifacts.read_manifest(image_dir)
    disk = artifacts.published_image(image_dir)
    build = artifacts.current_build(image_dir)
    if manifest is None or disk is None or build is None:
        raise UsageError(f"{image.name} has not been built yet (nothing published under {image_dir})",
                         build_hint(cfg, image))
    boot = boot_spec(manifest.get("boot"), build)
    if boot is None and distros.profile(image).boot_info(image) is not None:
        raise VerifyFailed(f"{image_dir / artifacts.MANIFEST}: {image.name} boots its kernel directly, "
                           "but the manifest has no boot entry", f"rebuild it: invoke build {image.name}")
    return BootTarget(image, disk, manifest["artifact"].get("format", image.format.value), manifest["build_id"], boot)


def staged_target(image: Image, image_file: Path, boot_info: dict[str, Any] | None, build_id: str = "staged",
                  *, base: Path | None = None) -> BootTarget:
    """An explicit image file (a build not yet published) with its boot info; relative kernel
    and initrd paths are under `base` (default: the image file's folder)."""
    image_file = Path(image_file)
    return BootTarget(image, image_file, image.format.value, build_id,
                      boot_spec(boot_info, image_file.parent if base is None else base))


# ---------------------------------------------------------------------------------- start


def ephemeral_root(image: Image) -> bool:
    """Guests whose root file system (and so their SSH host keys) is new on every boot."""
    return distros.profile(image).ephemeral_root


def reset_known_hosts(previous_build: str | None, build_id: str, snapshot: bool, ephemeral: bool) -> bool:
    """Forget pinned host keys when the guest cannot have kept them: a new build, a throw-away
    overlay (-snapshot) or a guest that makes new keys on every boot."""
    return previous_build != build_id or snapshot or ephemeral


def prepare_state(state: StatePaths, target: BootTarget, firmware: FirmwareInfo | None, opts: RunOptions) -> None:
    """Create the folder, the UEFI variables copy, a fresh console log; reset known_hosts if due.

    Every file is replaced, never written through: a link planted in the state folder is
    replaced by a real file (QEMU then opens that file, not the link's target)."""
    ensure_state_dir(state)
    clear_live_state(state)  # not running (start checked): whatever is there is stale
    previous = read_value(state.build_id)
    if previous != target.build_id or state.efivars.is_symlink():
        state.efivars.unlink(missing_ok=True)  # boot entries of the old disk mean nothing to a new one
    if firmware is not None and firmware.vars and target.boot is None and not state.efivars.exists():
        atomic_copy(Path(firmware.vars), state.efivars)
    if reset_known_hosts(previous, target.build_id, opts.snapshot, ephemeral_root(target.image)):
        atomic_write(state.known_hosts, "")
    write_value(state.build_id, target.build_id)
    atomic_write(state.console, "")
    if state.known_hosts.is_symlink() or not state.known_hosts.is_file():
        atomic_write(state.known_hosts, "")


def _record(state: StatePaths, port: int, accel: AccelChoice, opts: RunOptions) -> None:
    """What status, ssh and stop read back: the port, the accelerator (and why), the start time."""
    write_value(state.ssh_port, str(port))
    write_value(state.accel, f"{accel.accel.value}\n{accel.reason}")
    write_value(state.started_at, f"{time.time():.3f}")
    if opts.snapshot:
        write_value(state.snapshot, "1")


PORT_RACE = "Could not set up host forwarding rule"


def start(
    target: BootTarget, state: StatePaths, accel: AccelChoice, firmware: FirmwareInfo | None,
    opts: RunOptions | None = None, *, port: int | None = None, say: Callable[[str], None] = print,
    attached: Attached | None = None, name: str | None = None, fixed_port: bool = False,
) -> VmStatus:
    """Boot `target` detached (or attached with opts.foreground); returns its status.

    The configured port is used when free, else another free one (`fixed_port`: the port given
    or nothing); it is recorded in the state folder, where every other task reads it. `name`:
    the instance's name (messages, QEMU's -name; default: the image's); `attached`: its seed and
    shared folders.
    """
    opts = opts or RunOptions()
    label = name or target.image.name
    current = read_status(label, state)
    if current.state == "running":
        raise UsageError(f"{label} is already running (pid {current.pid}, ssh port {current.ssh_port})",
                         f"invoke ssh {label}, or invoke stop {label}")
    prepare_state(state, target, firmware, opts)
    wanted = port if port is not None else target.image.ssh_port
    chosen = wanted if fixed_port else pick_port(wanted)
    for attempt in range(3):
        argv = qemu_argv(target.image, accel, firmware, target.disk, state, chosen, disk_format=target.format,
                         boot=target.boot, opts=opts, attached=attached or Attached(), name=name)
        _record(state, chosen, accel, opts)
        if opts.foreground:
            return _foreground(target, state, argv, chosen, say, label)
        try:
            _launch(argv, state)
            break
        except CommandFailed as exc:
            clear_live_state(state)
            if PORT_RACE in exc.tail and fixed_port:
                raise UsageError(f"{label}: port {chosen} on 127.0.0.1 is taken (QEMU could not forward it)",
                                 "free it, or give another: --port N (or --port 0: any free port)") from None
            if PORT_RACE not in exc.tail or attempt == 2:
                raise
            chosen = free_port()  # someone took the port between our check and QEMU's bind
    return read_status(label, state)


def _launch(argv: list[str], state: StatePaths) -> None:
    """qemu -daemonize: the parent returns once the VM is set up; the pidfile holds the real pid.

    The daemon is re-parented to init (no zombie of ours) and is in its own session, so a
    Ctrl-C in this terminal later does not reach it. Ctrl-C during start-up stops it again.
    """
    try:
        run(argv, timeout=60, hint=f"serial console: {state.console}")
        pid = int_or_none(read_value(state.pid), lo=1, hi=2**31)
        if pid is None or not alive(pid, state):
            raise CommandFailed(argv, 0, console_tail(state), hint="QEMU exited right after starting")
    except (KeyboardInterrupt, Interrupted):
        _kill_from_pidfile(state)
        clear_live_state(state)
        raise Interrupted("interrupted while starting the VM: it was stopped again") from None


def _foreground(target: BootTarget, state: StatePaths, argv: list[str], port: int, say: Callable[[str], None],
                label: str) -> VmStatus:
    """Run QEMU attached to this terminal until it quits; the state is cleared afterwards."""
    say(f"{label}: console attached (Ctrl-A X quits QEMU, Ctrl-A C toggles the monitor); "
        f"ssh on 127.0.0.1:{port}")
    try:
        code = interactive(argv)
    finally:
        clear_live_state(state)
    if code != 0:
        raise CommandFailed(argv, code, console_tail(state))
    return VmStatus(label, "stopped")


def _kill_from_pidfile(state: StatePaths) -> None:
    """SIGKILL the pidfile's process if it is still this VM's QEMU."""
    pid = int_or_none(read_value(state.pid), lo=1, hi=2**31)
    if pid is not None and alive(pid, state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------- stop


PRESS_EVERY = 5.0  # seconds between presses of the ACPI power button while `stop` waits


def stop(image: str, state: StatePaths, *, force: bool = False, grace: float = 60.0,
         say: Callable[[str], None] = print) -> str:
    """Power the VM off: ACPI power button over QMP (again every PRESS_EVERY s), wait `grace` s,
    then `quit`; --force: quit now.

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
    """ACPI power button (pressed again while waiting), then quit after `grace` seconds; returns
    what happened."""
    try:
        with Qmp(state.qmp) as qmp:
            qmp.execute("system_powerdown")
    except (QmpError, OSError, EOFError) as exc:
        say(f"QMP unavailable ({exc}); stopping the process")
        _hard_stop(pid, state)
        return "stopped (QMP unavailable)"
    say(f"sent the ACPI power button; waiting up to {grace:.0f}s for the guest to power off")
    deadline = time.monotonic() + grace
    while not wait_gone(pid, state, min(PRESS_EVERY, max(deadline - time.monotonic(), 0.0))):
        if time.monotonic() >= deadline:
            _hard_stop(pid, state)
            return f"did not power off within {grace:.0f}s: stopped with quit"
        # A guest still in its firmware, boot loader or initrd drops the press (nothing handles
        # it yet): press again, so one that finishes booting powers off then, not at the deadline.
        with contextlib.suppress(QmpError, OSError, EOFError), Qmp(state.qmp, timeout=5) as qmp:
            qmp.execute("system_powerdown")
    return "powered off"


def _hard_stop(pid: int, state: StatePaths) -> None:
    """QMP quit, and SIGKILL if the process is still there a few seconds later."""
    with contextlib.suppress(QmpError, OSError, EOFError), Qmp(state.qmp, timeout=5) as qmp:
        qmp.quit()
    if not wait_gone(pid, state, 10):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, state, 5)


# ------------------------------------------------------------------------ decisions + run


def decide(cfg: Config, image: Image, requested: Accel | None, facts: HostFacts | None = None,
           needs_firmware: bool = True) -> tuple[AccelChoice, FirmwareInfo | None]:
    """Accelerator and firmware for running `image` here."""
    facts = facts or probe(tools=())
    accel = choose_accel(requested or cfg.defaults.accel, facts, image.arch, purpose="run")
    firmware = firmware_for(image, facts) if needs_firmware else None
    return accel, firmware


def with_pause(row: VmStatus, state: StatePaths) -> VmStatus:
    """`row`, saying so when the running VM's guest is paused because a write found the host's
    disk full (QMP)."""
    if row.state == "running":
        device = disk_full(state.qmp, timeout=2.0)
        if device is not None:
            return dataclasses.replace(row, paused=f"the host disk is full (a write to {device})")
    return row
