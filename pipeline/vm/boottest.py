"""The boot test: boot an image (published, or staged by a build before it is published) with
-snapshot, wait for SSH, check `uname -m` and root access, power it off; and the summary table
of `invoke test-all`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import keys, procs
from pipeline.config import Accel, Arch, Config, Image
from pipeline.errors import CommandFailed, ImagepipeError, UsageError, VerifyFailed
from pipeline.host import HostFacts
from pipeline.run import run, tie_to_us
from pipeline.text import visible_lines
from pipeline.vm.argv import RunOptions
from pipeline.vm.lifecycle import BootTarget, decide, published_target, start, stop
from pipeline.vm.ssh import SSH_DEADLINE, pin_host_keys, ssh_argv, tail_block, wait_for_ssh
from pipeline.vm.state import (
    BOOT_TEST_DIR,
    StatePaths,
    clear_live_state,
    ensure_state_dir,
    free_port,
    read_status,
    state_paths,
    wait_gone,
)


def _guest(image: Image, state: StatePaths, key: Path, port: int, command: Sequence[str]) -> str:
    """Run `command` in the guest over ssh (batch mode); its stdout, or VerifyFailed."""
    res = run(ssh_argv(image.name, state, key, image.ssh_user, port, command, batch=True), check=False, timeout=60)
    if not res.ok:
        raise VerifyFailed(f"{image.name}: `{' '.join(command)}` failed in the guest (exit {res.returncode}): "
                           f"{visible_lines((res.stderr or res.stdout).strip()[-300:])}")
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
                                   f"{deadline:.0f}s ({exc.message})\n{tail_block(state)}",
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


def boot_test(cfg: Config, target: BootTarget, output_dir: Path, accel: Accel | None = None, *,
              deadline: float | None = None, say: Callable[[str], None] = lambda _m: None,
              facts: HostFacts | None = None) -> None:
    """Boot `target` (a published build, or one still staged) with -snapshot, check SSH, arch and
    root access, power it off. Raises VerifyFailed (console tail included) on any failure; the VM
    is always stopped afterwards. `deadline` bounds the wait for SSH and for the login.
    """
    image = target.image
    accel_choice, firmware = decide(cfg, image, accel, facts, needs_firmware=target.boot is None)
    wait = deadline if deadline is not None else SSH_DEADLINE[accel_choice.accel]
    state = state_paths(output_dir, image.name, BOOT_TEST_DIR)
    ensure_state_dir(state)  # a real folder of ours (a planted link is refused) before anything goes
    state.efivars.unlink(missing_ok=True)  # every boot test starts from the firmware's own variables
    key = keys.project_key(output_dir, cfg.defaults.ssh_key)
    say(f"{image.name}: boot test ({accel_choice.accel.value}), waiting up to {wait:.0f}s for SSH")
    try:
        st = start(target, state, accel_choice, firmware, RunOptions(snapshot=True), port=free_port(), say=say)
    except CommandFailed as exc:
        raise VerifyFailed(f"{image.name}: QEMU did not start: {exc.message}", exc.hint) from None
    if st.pid is None or st.ssh_port is None:
        raise VerifyFailed(f"{image.name}: QEMU exited right after starting\n{tail_block(state)}")
    # QEMU daemonizes (it is not our child): tie it to us, so it dies if imagepipe is killed
    with tie_to_us(st.pid, procs.start_time(st.pid)):
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
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return "\n".join(line.rstrip() for line in lines)
