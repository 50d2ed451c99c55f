"""Instances on a builder: `invoke run IMAGE --on BUILDER` and everything that reaches them.

The instance is made and run by the builder's own imagepipe (the project synced there, its
venv), from the build already published there: nothing is copied to this machine. Before
that, the builder's facts are probed (QEMU for the image's arch, UEFI firmware): a builder that
lacks one is refused with the install hint. The builder's seed authorizes this machine's key.

This machine keeps a small record in output/instances/<name>/ (`on: BUILDER`, the port, the
guest's pinned host key), so `ssh`, `stop`, `status`, `console`, `instances` and `rm` find it:
each runs the same task on the builder, and `ssh` logs in through the builder (ssh -W
127.0.0.1:PORT BUILDER as the ProxyCommand: QEMU's forward stays bound to 127.0.0.1 there).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from pipeline.base.errors import HostUnsuitable, ImagepipeError, UsageError
from pipeline.base.fsutil import atomic_write, ensure_dir, safe_rmtree
from pipeline.base.run import install_hint, interactive
from pipeline.base.text import visible, visible_lines
from pipeline.builders import dispatch, remote
from pipeline.builders.openssh import Connection
from pipeline.model import Config, Firmware, Image
from pipeline.vm import instances, seed
from pipeline.vm.ssh import fresh_known_hosts, login_key
from pipeline.vm.ssh import ssh_argv as guest_argv
from pipeline.vm.state import StatePaths, VmStatus

Say = Callable[[str], None]


def _invoke(target: remote.Target, args: Sequence[str]) -> list[str]:
    """`invoke ARGS` in the builder's project folder, with its own venv and output folder."""
    return remote.in_dir(target.dir, ["env", f"INVOKE_DEFAULTS_OUTPUT_DIR={remote.REMOTE_OUTPUT}",
                                      f"{remote.VENV}/bin/invoke", *args])


def _target(cfg: Config, record: instances.Record, ssh_config: str | None) -> remote.Target:
    assert record.on is not None
    return remote.resolve(cfg, record.on, ssh_config)


def check_builder(image: Image, facts: Any, target: remote.Target) -> None:
    """QEMU for the image's arch and, for a UEFI image, its firmware; else HostUnsuitable with the hint."""
    qemu = image.arch.qemu_binary
    if not facts.tool(qemu).found:
        raise HostUnsuitable(f"builder {target.name} has no {qemu}: it cannot run {image.name}",
                             f"on {target.host}: {install_hint(qemu, facts.package_manager)}")
    if not facts.tool("qemu-img").found:
        raise HostUnsuitable(f"builder {target.name} has no qemu-img: it cannot make an instance's disk",
                             f"on {target.host}: {install_hint('qemu-img', facts.package_manager)}")
    if image.firmware is Firmware.UEFI and image.arch not in facts.firmware:
        raise HostUnsuitable(f"builder {target.name} has no UEFI firmware for {image.arch.value}: it cannot run "
                             f"{image.name}", f"on {target.host}: "
                             + install_hint(f"uefi-{image.arch.value}", facts.package_manager))


def run_args(image: Image, req: instances.Request, accel: str, mine: str) -> list[str]:
    """The builder's `invoke run` for this request (pure)."""
    args = ["run", image.name, "--name", req.name, "--wait", "--authorize-key", mine, *[
        a for k in req.authorize for a in ("--authorize-key", k)]]
    args += ["--accel", accel] if accel else []
    args += ["--snapshot"] if req.snapshot else []
    args += ["--network", req.network] if req.network else []
    args += ["--port", str(req.port)] if req.port is not None else []
    args += [a for s in req.shares for a in ("--share", s)]
    args += ["--idle-stop", f"{req.idle_stop:g}"] if req.idle_stop is not None else []
    args += ["--rebase"] if req.rebase else []
    return args


def run(cfg: Config, target: remote.Target, image: Image, req: instances.Request, accel: str,
        accept_new_host_key: bool, say: Say) -> None:
    """Start (or make and start) the instance on the builder and keep its record here."""
    instances.check_name(req.name)
    if req.foreground or req.gui:
        raise UsageError("--foreground and --gui show the VM on this terminal: not with --on",
                         f"attach to its serial console instead: invoke console {req.name}")
    existing = instances.load(cfg.output_dir, req.name)
    if existing is not None and existing.on != target.name:
        where = f"on {existing.on}" if existing.on else "here"
        raise UsageError(f"the name {req.name} is in use by an instance {where}", "choose another name: --name NAME")
    conn = remote.connect(target, accept_new_host_key=accept_new_host_key)
    try:
        check_builder(image, remote.builder_facts(conn, target), target)
        dispatch.prepare(conn, target, cfg, say)
        if existing is None and not req.network:  # this machine's default for a new instance
            req = replace(req, network=cfg.defaults.instance_network.value)
        args = run_args(image, req, accel, remote.local_public_key(cfg))
        if req.user_data is not None:
            seed.check_user_data(req.user_data)
            remote_file = target.path(f".user-data-{req.name}")
            conn.put(str(req.user_data), remote_file)
            args += ["--user-data", remote_file]
        code = _stream(conn, target, _invoke(target, args), say)
    finally:
        conn.close()
    if code != 0:
        raise UsageError(f"{req.name} did not start on {target.name} (its imagepipe exited {code}: see above)")
    row = _remote_rows(target)[req.name]
    record = instances.Record(name=req.name, image=image.name, build_id=str(row["build_id"]), backing="",
                              backing_format="", created=existing.created if existing else time.time(),
                              ssh_port=int(row["ssh_port"]), instance_id="", on=target.name)
    state = instances.paths(cfg.output_dir, req.name)
    with instances.locked(cfg.output_dir, f"run {req.name} --on {target.name}", say):
        ensure_dir(state.root, instances.root(cfg.output_dir))
        if existing is None or req.rebase or existing.build_id != record.build_id:
            atomic_write(state.known_hosts, "")  # a new guest: its host keys are new
        instances.save(state, record)
    say(f"{req.name}: running on {target.name} (ssh forward 127.0.0.1:{record.ssh_port} there); "
        f"log in: invoke ssh {req.name}   stop: invoke stop {req.name}")


def _stream(conn: Any, target: remote.Target, argv: list[str], say: Say) -> int:
    sink = remote.LineSink(lambda line: say(target.prefix + visible(line)))
    res = conn.run(shlex.join(argv), warn=True, hide=False, out_stream=sink, err_stream=sink, in_stream=False)
    sink.close()
    return int(res.exited)


def _remote(target: remote.Target, args: Sequence[str]) -> tuple[int, str, str]:
    """`invoke ARGS` on the builder over OpenSSH: (exit code, stdout, stderr)."""
    with Connection(target) as ssh:
        res = ssh.run(_invoke(target, args))
    return res.returncode, res.stdout, res.stderr


def _remote_rows(target: remote.Target) -> dict[str, dict[str, Any]]:
    code, out, err = _remote(target, ["instances", "--json"])
    if code != 0:
        raise UsageError(f"builder {target.name}: `invoke instances` failed (exit {code}): {visible(err.strip()[-300:])}",
                         f"sync the project there first: invoke run IMAGE --on {target.name}")
    try:
        return {str(i["name"]): i for i in json.loads(out)["instances"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"builder {target.name}: `invoke instances --json` said something else ({exc})") from None


def _row(record: instances.Record, data: dict[str, Any] | None, target: remote.Target, why: str = "") -> instances.Row:
    if data is None:
        status = VmStatus(record.name, why or "gone")
        return instances.Row(record, status, None, False, where=target.name,
                             stopped_by=why or f"not on {target.name} any more (invoke rm {record.name})")
    status = VmStatus(record.name, str(data.get("state")), pid=data.get("pid"), ssh_port=data.get("ssh_port"),
                      accelerator=data.get("accelerator"))
    rec = replace(record, build_id=str(data.get("build_id", record.build_id)),
                  ssh_port=int(data.get("ssh_port") or record.ssh_port), idle_stop=data.get("idle_stop_min"),
                  network=str(data.get("network", "user")))
    return instances.Row(rec, status, data.get("disk_bytes"), bool(data.get("backing_present")),
                         data.get("stopped_by"), where=target.name)


def rows(cfg: Config, ssh_config: str | None, say: Say) -> list[instances.Row]:
    """Rows of the instances on builders: one `invoke instances --json` per builder."""
    by_builder: dict[str, list[instances.Record]] = {}
    for rec in instances.records(cfg.output_dir):
        if rec.on is not None:
            by_builder.setdefault(rec.on, []).append(rec)
    out = []
    for builder, recs in sorted(by_builder.items()):
        target = remote.resolve(cfg, builder, ssh_config)
        try:
            found: dict[str, dict[str, Any]] = _remote_rows(target)
        except ImagepipeError as exc:
            say(f"warning: {builder}: {exc.message.splitlines()[0]}")
            out += [_row(r, None, target, "unknown") for r in recs]
            continue
        out += [_row(r, found.get(r.name), target) for r in recs]
    return out


def row(cfg: Config, record: instances.Record, ssh_config: str | None) -> instances.Row:
    target = _target(cfg, record, ssh_config)
    return _row(record, _remote_rows(target).get(record.name), target)


def stop(cfg: Config, record: instances.Record, ssh_config: str | None, force: bool, timeout: int) -> str:
    target = _target(cfg, record, ssh_config)
    code, out, err = _remote(target, ["stop", record.name, "--timeout", str(timeout), *(["--force"] if force else [])])
    text = visible_lines((err + out).strip())
    if code != 0:
        raise UsageError(f"{record.name} on {target.name}: stop failed (exit {code}): {text[-400:]}")
    return "\n".join(f"{target.prefix}{line}" for line in text.splitlines())


def remove(cfg: Config, record: instances.Record, ssh_config: str | None, say: Say) -> str:
    """rm on the builder, then the record here (also when the builder has no such instance)."""
    target = _target(cfg, record, ssh_config)
    code, out, err = _remote(target, ["rm", record.name])
    text = visible_lines((err + out).strip())
    if code != 0 and f"no instance called {record.name}" not in text:
        raise UsageError(f"{record.name} on {target.name}: rm failed (exit {code}): {text[-400:]}")
    with instances.locked(cfg.output_dir, f"rm {record.name}", say):
        safe_rmtree(instances.paths(cfg.output_dir, record.name).root, instances.root(cfg.output_dir))
    return f"{target.prefix}{text.splitlines()[-1] if text else 'removed'}"


def ssh_argv(cfg: Config, record: instances.Record, state: StatePaths, target: remote.Target, user: str,
             command: Sequence[str], first: bool) -> list[str]:
    """ssh to the guest through the builder: the jump is the user's own ssh to the builder
    (their ssh config, its known_hosts), then -W to the forward on the builder's 127.0.0.1."""
    jump = ["ssh", *(["-F", str(target.ssh_config)] if target.ssh_config else []), "-o", "BatchMode=yes",
            "-W", f"127.0.0.1:{record.ssh_port}", "--", target.host]
    via = ["-o", "ProxyCommand=" + shlex.join(jump).replace("%", "%%")]
    return guest_argv(record.name, state, login_key(cfg), user, record.ssh_port, command, first_contact=first, extra=via)


def ssh(cfg: Config, record: instances.Record, ssh_config: str | None, command: Sequence[str]) -> int:
    """`invoke ssh NAME` for an instance on a builder (its guest's key pinned here, as locally)."""
    state = instances.paths(cfg.output_dir, record.name)
    target = _target(cfg, record, ssh_config)
    image = cfg.image(record.image)
    first = fresh_known_hosts(state)
    code = interactive(ssh_argv(cfg, record, state, target, image.ssh_user, command, first), env={"SHELL": "/bin/sh"})
    if code == 255 and not command:
        raise UsageError(f"{record.name} on {target.name}: ssh could not log in (exit 255)",
                         f"is it running? invoke status {record.name}; start it: invoke run {record.image} "
                         f"--name {record.name} --on {target.name}")
    return code


def console(cfg: Config, record: instances.Record, ssh_config: str | None, log: bool) -> int:
    """`invoke console NAME` on the builder, on this terminal (ssh -t)."""
    target = _target(cfg, record, ssh_config)
    argv = ["ssh", *(["-F", str(target.ssh_config)] if target.ssh_config else []), *([] if log else ["-t"]),
            "--", target.host, shlex.join(_invoke(target, ["console", record.name, *(["--log"] if log else [])]))]
    return interactive(argv)
