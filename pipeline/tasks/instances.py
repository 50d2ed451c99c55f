"""Instance tasks: instances, rm, console (run, ssh, stop and status are in tasks/vm.py)."""

from __future__ import annotations

import json as json_mod
import time
from typing import TYPE_CHECKING

from invoke import Context, Exit

from pipeline.base.errors import UsageError
from pipeline.tasks.common import load_config, say, task

if TYPE_CHECKING:
    from pipeline.model import Config
    from pipeline.vm.instances import Record

INSTANCE_HELP = "instance name (invoke instances lists them)"


def on_builder(c: Context, cfg: Config, name: str) -> tuple[Record | None, str | None]:
    """The record of an instance that runs on a builder (`run --on`) and the ssh_config to reach
    it with; (None, None) for any other name."""
    from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm import instances as inst  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    record = inst.load(cfg.output_dir, inst.check_name(name))
    if record is None or record.on is None:
        return None, None
    return record, remote.ssh_config_path(c.config)


@task(help={"json": "one JSON document on stdout instead of a table"})
def instances(c: Context, json: bool = False) -> None:
    """List the instances: name, image, build, state, SSH port, disk used, age.

    Instances on builders (`run --on`) are asked for through their builder. NOTE says what else
    there is: shared folders, an idle stop (and whether the instance stopped itself), a build
    that was removed (docs/running.md#instances).
    """
    from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm import instances as inst  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    rows = inst.rows(cfg, say) + builders.rows(cfg, remote.ssh_config_path(c.config), say)
    rows.sort(key=lambda r: r.record.name)
    now = time.time()
    if json:
        print(json_mod.dumps({"instances": [r.as_json(now) for r in rows]}, indent=2))
        return
    if not rows:
        say(f"no instances yet in {inst.root(cfg.output_dir)}: invoke run IMAGE [--name NAME] makes one")
        return
    print(inst.table(rows, now))


@task(help={"instance": INSTANCE_HELP})
def rm(c: Context, instance: str) -> None:
    """Remove a stopped instance: its disk (the overlay), seed, UEFI variables and state.

    The build it was backed by is untouched (retention may remove it later, once no instance is
    backed by it). A running instance is refused: stop it first.
    """
    from pipeline.vm import instances as inst  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    record, ssh_config = on_builder(c, cfg, instance)
    if record is not None:
        from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        say(builders.remove(cfg, record, ssh_config, say))
        return
    say(inst.remove(cfg, instance, say))


@task(help={"instance": INSTANCE_HELP,
            "log": "print the console log (everything the guest wrote since it started) instead of attaching",
            "quiet": "fed from a pipe: seconds of silence after the input ends before detaching"})
def console(c: Context, instance: str, log: bool = False, quiet: int = 2) -> None:
    """Attach to a running instance's serial console (Ctrl-] detaches; the guest keeps running).

    Fed from a pipe, the input is typed into the console and the guest's answer printed. --log
    prints the console log instead (it is kept after the instance stops).
    """
    from pipeline.vm import instances as inst  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.vm.state import read_status  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    name = instance
    remote_record, ssh_config = on_builder(c, cfg, name)
    if remote_record is not None:
        from pipeline.vm import on_builder as builders  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        code = builders.console(cfg, remote_record, ssh_config, log)
        if code:
            raise Exit(code=code)
        return
    state, _record = inst.resolve_state(cfg, name)
    if log:
        print(state.console.read_text(encoding="utf-8", errors="replace") if state.console.is_file() else "", end="")
        return
    if read_status(name, state).state != "running":
        raise UsageError(f"{name} is not running", f"its last console log: invoke console {name} --log ({state.console})")
    from pipeline.vm.console import attach  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    attach(state.serial, name, quiet=float(quiet), say=say)
