"""The boot test: boot an image (published, or staged by a build before it is published) with
-snapshot, wait for SSH, and check the guest contract on it (pipeline.contract: build-key login
and arch, sudo, root over SSH, serial console, guest agent, ACPI power-off, in that order); and
the summary table of `invoke test-all`."""

from __future__ import annotations

import os
import re
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import contract, distros, keys
from pipeline.base import procs
from pipeline.base.errors import CommandFailed, ImagepipeError, QmpError, UsageError, VerifyFailed
from pipeline.base.run import run, tie_to_us
from pipeline.base.text import visible_lines
from pipeline.firmware import FirmwareInfo
from pipeline.host import HostFacts
from pipeline.model import Accel, Config, Image
from pipeline.plan import AccelChoice
from pipeline.vm.argv import RunOptions
from pipeline.vm.lifecycle import BootTarget, decide, published_target, start, stop
from pipeline.vm.qmp import Qmp
from pipeline.vm.ssh import (
    pin_host_keys,
    raise_if_disk_full,
    ssh_argv,
    ssh_deadline,
    tail_block,
    wait_for_ssh,
)
from pipeline.vm.state import (
    BOOT_TEST_DIR,
    StatePaths,
    clear_live_state,
    free_port,
    one_at_a_time,
    read_status,
    state_paths,
    wait_gone,
)


class SshGuest:
    """A booted guest as the guest contract's live checks reach it (pipeline.contract.LiveGuest):
    SSH with the build key and the pinned host keys, the console log, QMP and the agent socket."""

    def __init__(self, image: Image, state: StatePaths, key: Path, port: int, pid: int, deadline: float) -> None:
        self.image, self.state, self.key, self.port, self.pid, self.deadline = image, state, key, port, pid, deadline

    def run(self, command: Sequence[str]) -> tuple[int, str]:
        """`command` (an argv) as ssh_user over SSH in batch mode: (exit code, stdout or the error).
        ssh hands the remote shell one string: the argv is quoted into it, so it arrives intact."""
        remote = [shlex.join(command)]
        res = run(ssh_argv(self.image.name, self.state, self.key, self.image.ssh_user, self.port, remote, batch=True),
                  check=False, timeout=max(60.0, self.deadline + 30))  # the systemd check waits up to the deadline
        return res.returncode, res.stdout if res.ok else (res.stderr or res.stdout)

    def password_login(self, user: str, password: str) -> bool | None:
        """Log in as `user` with `password` only (no key offered); the password travels through
        SSH_ASKPASS and the environment, never argv. None when this ssh cannot be made to take a
        password without a terminal (SSH_ASKPASS_REQUIRE needs OpenSSH 8.4)."""
        if not _askpass_forced():
            return None
        askpass = self.state.root / "askpass"
        askpass.write_text('#!/bin/sh\nprintf \'%s\\n\' "$IMAGEPIPE_ASKPASS"\n', encoding="utf-8")
        askpass.chmod(0o700)
        argv = ssh_argv(self.image.name, self.state, self.key, user, self.port, ["true"])
        at = argv.index(f"{user}@127.0.0.1")
        argv[at:at] = ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive",
                       "-o", "NumberOfPasswordPrompts=1"]
        env = {"SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": "none",
               "IMAGEPIPE_ASKPASS": password}
        try:
            return run(argv, check=False, timeout=60, env=env).ok
        finally:
            askpass.unlink(missing_ok=True)

    def console_text(self) -> str:
        try:
            return self.state.console.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def agent_ping(self) -> bool:
        """guest-ping on the agent's socket, retried until the deadline (the agent starts late)."""
        end = time.monotonic() + self.deadline
        while time.monotonic() < end:
            if _agent_answers(self.state.qga):
                return True
            time.sleep(2)
        return False

    def power_off(self) -> bool:
        """The ACPI power button over QMP, as `invoke stop` presses it; True when QEMU exits."""
        try:
            with Qmp(self.state.qmp) as qmp:
                qmp.execute("system_powerdown")
        except (QmpError, OSError, EOFError):
            return False
        return wait_gone(self.pid, self.state, self.deadline)


def _askpass_forced() -> bool:
    """True when the local ssh honours SSH_ASKPASS_REQUIRE=force (OpenSSH >= 8.4); older ones
    would prompt on the user's terminal instead."""
    res = run(["ssh", "-V"], check=False, timeout=30)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", res.stderr + res.stdout)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (8, 4)


def _agent_answers(sock: Path, timeout: float = 5.0) -> bool:
    """One guest-ping round trip on the agent's virtio-serial socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(os.fspath(sock))
            conn.sendall(b'{"execute": "guest-ping"}\n')
            reply = conn.recv(4096)
    except OSError:
        return False
    return b'"return"' in reply


def _await_login(guest: SshGuest, deadline: float) -> None:
    """Wait until the build key logs in (sshd may answer before the account is ready); without
    a login within `deadline` nothing else of the contract can be checked."""
    end = time.monotonic() + deadline
    while True:
        rc, out = guest.run(["true"])
        if rc == 0:
            return
        raise_if_disk_full(guest.image.name, guest.state)
        if time.monotonic() >= end:
            image = guest.image
            raise VerifyFailed(f"{image.name}: cannot log in as {image.ssh_user} with {guest.key} within "
                               f"{deadline:.0f}s ({visible_lines(out.strip()[-300:])})\n{tail_block(guest.state)}",
                               "check defaults.ssh_key / the image's public_keys")
        time.sleep(2)


def boot_test(cfg: Config, target: BootTarget, output_dir: Path, accel: Accel | None = None, *,
              deadline: float | None = None, say: Callable[[str], None] = lambda _m: None,
              facts: HostFacts | None = None, also: Callable[[SshGuest], list[str]] | None = None) -> None:
    """Boot `target` (a published build, or one still staged) with -snapshot and check the guest
    contract on it, ending with the ACPI power-off. Raises VerifyFailed (console tail included)
    on any failure; the VM is always stopped afterwards. `deadline` bounds the wait for SSH, the
    login, the agent and the power-off. `also`: further checks on the logged-in guest, run before
    the contract's (their problems fail the boot test like the contract's).
    """
    image = target.image
    accel_choice, firmware = decide(cfg, image, accel, facts, needs_firmware=target.boot is None)
    # --timeout, else defaults.boot_timeout, else as long as the image's profile says a boot takes
    wait = ssh_deadline(accel_choice.accel, deadline or cfg.defaults.boot_timeout
                        or distros.profile(image).boot_deadline(image, accel_choice.accel))
    state = state_paths(output_dir, image.name, BOOT_TEST_DIR)
    with one_at_a_time(state, image.name, say):  # a real folder of ours (a planted link is refused)
        _boot_and_check(cfg, target, output_dir, state, accel_choice, firmware, wait, say, also)


def _boot_and_check(cfg: Config, target: BootTarget, output_dir: Path, state: StatePaths, accel_choice: AccelChoice,
                    firmware: FirmwareInfo | None, wait: float, say: Callable[[str], None],
                    also: Callable[[SshGuest], list[str]] | None = None) -> None:
    """boot_test's VM, while it holds the boot-test folder."""
    image = target.image
    state.efivars.unlink(missing_ok=True)  # every boot test starts from the firmware's own variables
    key = keys.project_key(output_dir, cfg.defaults.ssh_key)
    say(f"{image.name}: boot test ({accel_choice.accel.value}), waiting up to {wait:.0f}s for SSH")
    try:
        # the guest's network reaches nothing but its forwarded SSH port: a boot test never phones out
        st = start(target, state, accel_choice, firmware, RunOptions(snapshot=True, isolated=True), port=free_port(),
                   say=say)
    except CommandFailed as exc:
        raise VerifyFailed(f"{image.name}: QEMU did not start: {exc.message}", exc.hint) from None
    if st.pid is None or st.ssh_port is None:
        raise VerifyFailed(f"{image.name}: QEMU exited right after starting\n{tail_block(state)}")
    # QEMU daemonizes (it is not our child): tie it to us, so it dies if imagepipe is killed
    with tie_to_us(st.pid, procs.start_time(st.pid)):
        try:
            pin_host_keys(state, wait_for_ssh(image.name, state, st.ssh_port, wait, st.pid))
            guest = SshGuest(image, state, key, st.ssh_port, st.pid, wait)
            _await_login(guest, wait)
            profile = distros.profile(image)
            try:
                problems = also(guest) if also is not None else []
                problems += contract.check_live(guest, profile.guest_agent(image), say, systemd=profile.systemd)
            except VerifyFailed:
                raise_if_disk_full(image.name, state)  # the guest paused on a full disk: say that
                raise
            if problems:
                raise VerifyFailed(f"{image.name} breaks the guest contract:\n"
                                   + "\n".join(f"  {visible_lines(p)}" for p in problems)
                                   + f"\n{tail_block(state)}", "docs/running.md: The guest contract")
        finally:
            if read_status(image.name, state).state == "running":
                stop(image.name, state, force=True, say=lambda _m: None)
            clear_live_state(state)


@dataclass(frozen=True)
class BootTestResult:
    """One row of the test-all table."""

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
    try:
        boot_test(cfg, target, cfg.output_dir, accel, deadline=deadline, say=say)
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
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)
