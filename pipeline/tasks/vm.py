"""VM tasks: run, ssh, status, stop, test-image, test-all (and the per-image aliases)."""

from __future__ import annotations

import json as json_mod
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from invoke import Context, Exit

from pipeline import distros
from pipeline.base.errors import UsageError, VerifyFailed
from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.options import LOCAL_ACCEL_HELP, accel_option

if TYPE_CHECKING:
    from pipeline.vm.state import Built, VmStatus

IMAGE_HELP = "image name from invoke.yaml (invoke status lists them)"
TIMEOUT_HELP = ("seconds to wait for SSH (default: defaults.boot_timeout, else 180 with KVM/HVF, "
                "720 under TCG)")


def remainder(argv: Sequence[str] | None = None) -> list[str]:
    """The words after the first `--` on the command line, exactly as the shell split them.

    Invoke parses `--` as its "remainder" but does not hand it to tasks (and would join it into
    one string); reading argv keeps each word intact for ssh.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return args[args.index("--") + 1:] if "--" in args else []


@task(help={
    "image": IMAGE_HELP,
    "accel": LOCAL_ACCEL_HELP,
    "snapshot": "write to a temporary overlay: the image file stays untouched",
    "foreground": "attach the serial console to this terminal (Ctrl-A X quits) instead of detaching",
    "gui": "open a display window instead of running headless",
})
def run(c: Context, image: str, accel: str = "", snapshot: bool = False, foreground: bool = False,
        gui: bool = False) -> None:
    """Boot a published image in QEMU (detached; SSH forwarded on 127.0.0.1).

    It boots the image's primary format (qcow2 or raw) and prints the pid, the SSH port and the
    console log. Without --snapshot the guest writes into the build's image file (a dev VM's
    state lives there), and retention keeps that build while the VM runs (docs/running.md).
    """
    from pipeline.vm.argv import RunOptions  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.lifecycle import run_image  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.state import state_paths  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    img = cfg.image(image)
    opts = RunOptions(snapshot=snapshot, gui=gui, foreground=foreground)
    st = run_image(cfg, img, accel_option(accel, cfg), opts, say=say)
    if st.state == "running":
        state = state_paths(cfg.output_dir, img.name)
        say(f"{img.name}: running, pid {st.pid}, ssh on 127.0.0.1:{st.ssh_port}")
        say(f"  console log: {state.console}")
        say(f"  log in:      invoke ssh {img.name}      stop: invoke stop {img.name}")



@task(help={"image": IMAGE_HELP, "timeout": TIMEOUT_HELP})
def ssh(c: Context, image: str, timeout: int = 0) -> None:
    """Log in to a running image over SSH (`invoke ssh IMAGE -- COMMAND` runs a command).

    It waits until the guest's sshd really answers, then logs in over that very connection with the
    build key; a COMMAND's exit code is returned (docs/running.md#ssh).
    """
    from pipeline.vm.ssh import ssh_session  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    code = ssh_session(cfg, cfg.image(image), remainder(), deadline=timeout or None)
    if code != 0:
        raise Exit(code=code)



@task(help={"json": "one JSON document on stdout instead of a table"})
def status(c: Context, json: bool = False) -> None:
    """Show every configured image: built (when, size) and running (pid, SSH port, uptime, accel).

    An image that is not built points to `invoke build IMAGE` or, on a host that cannot build
    it (another arch), to `remote-sync-build` + `remote-fetch` and the builders of its arch.
    """
    from pipeline.vm.lifecycle import statuses  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.state import published  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    rows = statuses(cfg)
    built = {r.image: published(cfg.output_dir, r.image, distros.artifact_name(cfg.images[r.image])) for r in rows}
    now = time.time()
    if json:
        images = [{**r.as_json(now), "built": b.as_json() if (b := built[r.image]) else None} for r in rows]
        print(json_mod.dumps({"images": images}, indent=2))
        return
    print(status_table(rows, built, now))
    for r in rows:
        if r.paused:
            say(f"{r.image}: paused: {r.paused}; free some space where it writes, then "
                f"`invoke stop {r.image}` and run it again")


def status_table(rows: Sequence[VmStatus], built: dict[str, Built | None], now: float) -> str:
    """IMAGE, BUILT (UTC), SIZE (MiB), STATE, PID, PORT, UPTIME, ACCEL as aligned columns."""
    from pipeline.base.units import clock, mib  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    lines = [("IMAGE", "BUILT (UTC)", "SIZE", "STATE", "PID", "PORT", "UPTIME", "ACCEL")]
    for r in rows:
        b = built.get(r.image)
        up = r.uptime(now)
        when = b.finished.replace("T", " ").removesuffix("Z")[:16] if b else "not built"
        state = "paused: disk full" if r.paused and "disk is full" in r.paused else r.state
        lines.append((r.image, when, mib(b.size) if b else "-", state, str(r.pid or "-"),
                      str(r.ssh_port or "-"), clock(up) if up is not None else "-", r.accelerator or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    right = {2, 4, 5, 6}  # numbers line up on the right
    return "\n".join("  ".join(v.rjust(w) if i in right else v.ljust(w)
                                for i, (v, w) in enumerate(zip(line, widths, strict=False)))
                     .rstrip() for line in lines)


@task(help={
    "image": IMAGE_HELP,
    "force": "end QEMU at once (QMP quit) instead of an ACPI power-off",
    "timeout": "seconds to wait for the guest to power off before QEMU is told to quit",
})
def stop(c: Context, image: str, force: bool = False, timeout: int = 60) -> None:
    """Power off a running image (ACPI over QMP, then quit; --force: at once).

    The power button is pressed again every 5 s while it waits (a guest still booting drops a
    press); after --timeout seconds QEMU is told to quit.
    """
    from pipeline.vm import lifecycle  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.state import state_paths  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    img = cfg.image(image)
    grace = timeout
    say(lifecycle.stop(img.name, state_paths(cfg.output_dir, img.name), force=force, grace=grace, say=say))


@task(help={"image": IMAGE_HELP, "accel": LOCAL_ACCEL_HELP, "timeout": TIMEOUT_HELP})
def test_image(c: Context, image: str, accel: str = "", timeout: int = 0) -> None:
    """Boot-test a published image: SSH, uname -m = its arch, root/sudo, power off.

    It boots with -snapshot and checks the guest contract live (docs/running.md#the-guest-contract):
    build-key login and `uname -m`, passwordless sudo, root over SSH as configured, the serial
    console, the guest agent's port, ACPI power-off; one line per requirement, the console's
    tail on failure. Two boot tests of one image take turns; the second says whom it waits for.
    """
    from pipeline.vm.boottest import boot_test_published  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    result = boot_test_published(cfg, cfg.image(image), accel_option(accel, cfg), timeout or None, say=say)
    if result.result == "not built":
        from pipeline.hints import build_hint  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        raise UsageError(f"{image} has not been built yet", build_hint(cfg, cfg.image(image)))
    if result.result != "passed":
        raise VerifyFailed(f"boot test failed: {result.detail}")
    say(f"{image}: boot test passed in {result.seconds:.1f}s ({result.detail})")


@task(help={"accel": LOCAL_ACCEL_HELP, "timeout": TIMEOUT_HELP})
def test_all(c: Context, accel: str = "", timeout: int = 0) -> None:
    """Boot-test every published image, one after the other, and print a summary table."""
    from pipeline.vm.boottest import boot_test_published, results_table  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    requested = accel_option(accel, cfg)
    rows = []
    for name in sorted(cfg.images):
        row = boot_test_published(cfg, cfg.images[name], requested, timeout or None, say=say)
        if row.result == "failed":
            say(f"{name}: FAILED\n{row.detail}")
        rows.append(row)
    print(results_table(rows))
    if all(r.result == "not built" for r in rows):
        raise UsageError("no image has been built yet: nothing to test", "build one first, e.g. invoke build-demo")
    failed = [r.image for r in rows if r.result == "failed"]
    if failed:
        raise VerifyFailed(f"boot test failed for: {', '.join(failed)}")
