"""VM tasks: run, ssh, status, stop, test-image, test-all (and the per-image aliases)."""

from __future__ import annotations

import json as json_mod
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from invoke import Context, Exit

from pipeline import distros
from pipeline.base.errors import UsageError, VerifyFailed
from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.instances import on_builder
from pipeline.tasks.options import LOCAL_ACCEL_HELP, accel_option, parse_accel, parse_minutes, parse_port

if TYPE_CHECKING:
    from pipeline.vm.state import Built, VmStatus

IMAGE_HELP = "image name from invoke.yaml (invoke status lists them)"
INSTANCE_HELP = "instance name (invoke instances lists them; plain `invoke run IMAGE` names it after the image)"
TIMEOUT_HELP = ("seconds to wait for SSH (default: defaults.boot_timeout, else 180 with KVM/HVF, "
                "720 under TCG)")


def remainder(argv: Sequence[str] | None = None) -> list[str]:
    """The words after the first `--` on the command line, exactly as the shell split them.

    Invoke parses `--` as its "remainder" but does not hand it to tasks (and would join it into
    one string); reading argv keeps each word intact for ssh.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return args[args.index("--") + 1:] if "--" in args else []


RUN_HELP = {
    "image": IMAGE_HELP,
    "name": "the instance to create or start again (default: the instance named after the image)",
    "accel": LOCAL_ACCEL_HELP,
    "snapshot": "throw this boot's writes away at power-off (the instance's disk stays as it was)",
    "foreground": "attach the serial console to this terminal (Ctrl-A X quits) instead of detaching",
    "gui": "open a display window instead of running headless",
    "network": "user: the guest reaches the network through QEMU's user networking; isolated: only its "
               "forwarded SSH port (restrict=on). Kept for later starts (a new instance: defaults.instance_network, "
               "itself user)",
    "port": "the SSH port on 127.0.0.1 (0: any free one); kept for later starts (default: the image's "
            "ssh_port when free, else any free one)",
    "share": "a host folder, seen at /mnt/TAG in the guest (virtiofs, or 9p where only that works); "
             "repeatable; kept for later starts (`--share none`: no more shares)",
    "idle_stop": "power off (ACPI) after MINUTES with no SSH session and an idle guest (fractions work: 0.5; "
                 "0: never); kept for later starts",
    "user_data": "a cloud-config or script cloud-init runs at the instance's first boot (with imagepipe's own)",
    "rebase": "move the instance to the newest build of its image: says first what that loses (its disk's "
              "changes), then starts over from that build",
    "authorize_key": "a further public key the instance's seed authorizes for ssh_user (repeatable)",
    "wait": "return only once the guest's sshd answers",
    "on": "start it on this builder, from the build published there (ssh, stop, instances and rm then "
          "reach it through the builder)",
    "accept_new_host_key": "with --on: trust the builder's host key if it is not known yet",
}


@task(help=RUN_HELP, iterable=["share", "authorize_key"])
def run(c: Context, image: str, name: str = "", accel: str = "", snapshot: bool = False, foreground: bool = False,
        gui: bool = False, network: str = "", port: str = "", share: list[str] | None = None, idle_stop: str = "",
        user_data: str = "", rebase: bool = False, authorize_key: list[str] | None = None, wait: bool = False,
        on: str = "", accept_new_host_key: bool = False) -> None:
    """Create or start again a named instance of a published image (detached; SSH on 127.0.0.1).

    An instance is a qcow2 overlay on one build (the build's own file is never written), with
    its own UEFI variables, SSH port and NoCloud seed (hostname, your key, --user-data); its disk
    survives stop and start, and a new build changes no instance (--rebase moves it). Without
    --name the instance is named after the image. It prints the pid, SSH port and console log
    (docs/running.md#instances).
    """
    from pipeline.vm.instances import Request  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    img = cfg.image(image)
    req = Request(
        name=name or img.name, accel=parse_accel(accel) or cfg.defaults.accel, snapshot=snapshot, gui=gui,
        foreground=foreground, network=network, port=parse_port(port), shares=tuple(share or ()),
        idle_stop=parse_minutes(idle_stop), user_data=Path(user_data) if user_data else None, rebase=rebase,
        authorize=tuple(authorize_key or ()), wait=wait)
    if on:
        from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
        from pipeline.vm import on_builder  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        target = remote.resolve(cfg, on, remote.ssh_config_path(c.config))
        on_builder.run(cfg, target, img, req, accel, accept_new_host_key, say)
        return
    from pipeline.vm.instances import run_instance  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    st = run_instance(cfg, img, req, say=say)
    if st.state == "running":
        from pipeline.vm.instances import paths  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        state = paths(cfg.output_dir, req.name)
        say(f"{req.name}: running, pid {st.pid}, ssh on 127.0.0.1:{st.ssh_port}")
        say(f"  console log: {state.console}   (invoke console {req.name})")
        say(f"  log in:      invoke ssh {req.name}      stop: invoke stop {req.name}")


@task(help={"instance": INSTANCE_HELP, "timeout": TIMEOUT_HELP})
def ssh(c: Context, instance: str, timeout: int = 0) -> None:
    """Log in to a running instance over SSH (`invoke ssh NAME -- COMMAND` runs a command).

    It waits until the guest's sshd really answers, then logs in over that very connection as
    the image's ssh_user with your key (defaults.ssh_key, else the project key); a COMMAND's exit
    code is returned (docs/running.md#ssh).
    """
    from pipeline.vm.ssh import ssh_session  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    record, ssh_config = on_builder(c, cfg, instance)
    if record is not None:
        from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        code = builders.ssh(cfg, record, ssh_config, remainder())
    else:
        from pipeline.vm.instances import login_target  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        state, image = login_target(cfg, instance)
        code = ssh_session(cfg, instance, state, image, remainder(), deadline=timeout or None)
    if code != 0:
        raise Exit(code=code)


@task(help={"instance": "one instance, in detail (default: every image, and the instance named after it)",
            "json": "one JSON document on stdout instead of a table"}, positional=["instance"])
def status(c: Context, instance: str | None = None, json: bool = False) -> None:
    """Show every configured image: built (when, size), its instance and how many it has.

    STATE, PID, PORT, UPTIME and ACCEL are those of the instance named after the image (what
    plain `invoke run IMAGE` starts); INSTANCES counts all of the image's (invoke instances
    lists them). `invoke status NAME` shows one instance. An image that is not built points to
    `invoke build IMAGE` or, on a host that cannot build it (another arch), to
    `remote-sync-build` + `remote-fetch` and the builders of its arch.
    """
    from pipeline.vm import instances  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.state import published  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    now = time.time()
    if instance:
        record, ssh_config = on_builder(c, cfg, instance)
        if record is not None:
            from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

            row = builders.row(cfg, record, ssh_config)
        else:
            row = instances.row_of(cfg, instance)
        if json:
            print(json_mod.dumps(row.as_json(now), indent=2))
        else:
            print(instances.detail(row, now))
        return
    rows = instances.image_statuses(cfg)
    counts = instances.counts(cfg)
    built = {r.image: published(cfg.output_dir, r.image, distros.artifact_name(cfg.images[r.image])) for r in rows}
    if json:
        images = [{**r.as_json(now), "built": b.as_json() if (b := built[r.image]) else None,
                   "instances": counts.get(r.image, {})} for r in rows]
        print(json_mod.dumps({"images": images}, indent=2))
        return
    print(status_table(rows, built, now, counts))
    for r in rows:
        if r.paused:
            say(f"{r.image}: paused: {r.paused}; free some space where it writes, then "
                f"`invoke stop {r.image}` and run it again")


def status_table(rows: Sequence[VmStatus], built: dict[str, Built | None], now: float,
                 counts: dict[str, dict[str, str]] | None = None) -> str:
    """IMAGE, BUILT (UTC), SIZE (MiB), STATE, PID, PORT, UPTIME, ACCEL, INSTANCES as aligned columns."""
    from pipeline.base.units import clock, mib  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    lines = [("IMAGE", "BUILT (UTC)", "SIZE", "STATE", "PID", "PORT", "UPTIME", "ACCEL", "INSTANCES")]
    for r in rows:
        b = built.get(r.image)
        up = r.uptime(now)
        when = b.finished.replace("T", " ").removesuffix("Z")[:16] if b else "not built"
        state = "paused: disk full" if r.paused and "disk is full" in r.paused else r.state
        mine = (counts or {}).get(r.image, {})
        running = sum(1 for each in mine.values() if each == "running")
        lines.append((r.image, when, mib(b.size) if b else "-", state, str(r.pid or "-"),
                      str(r.ssh_port or "-"), clock(up) if up is not None else "-", r.accelerator or "-",
                      f"{len(mine)} ({running} running)" if mine else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    right = {2, 4, 5, 6}  # numbers line up on the right
    return "\n".join("  ".join(v.rjust(w) if i in right else v.ljust(w)
                                for i, (v, w) in enumerate(zip(line, widths, strict=False))).rstrip()
                     for line in lines)


@task(help={
    "instance": INSTANCE_HELP,
    "force": "end QEMU at once (QMP quit) instead of an ACPI power-off",
    "timeout": "seconds to wait for the guest to power off before QEMU is told to quit",
})
def stop(c: Context, instance: str, force: bool = False, timeout: int = 60) -> None:
    """Power off a running instance (ACPI over QMP, then quit; --force: at once).

    The power button is pressed again every 5 s while it waits (a guest still booting drops a
    press); after --timeout seconds QEMU is told to quit. Its disk stays: `invoke run` starts it again.
    """
    from pipeline.vm import instances  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    record, ssh_config = on_builder(c, cfg, instance)
    if record is not None:
        from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        say(builders.stop(cfg, record, ssh_config, force, timeout))
        return
    say(instances.stop(cfg, instance, force=force, grace=timeout, say=say))


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
