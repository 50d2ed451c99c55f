"""`invoke doctor`: check this host (tools, accelerator, firmware, disk) against the config."""

from __future__ import annotations

import json as _json

from invoke import Context, Exit

from pipeline.tasks.common import load_config, task


@task(help={"json": "print the report as JSON",
            "builder": "check a remote builder over SSH instead (a name under `builders:` or an SSH host alias)",
            "accept_new_host_key": "with --builder: trust and record the builder's host key if it is not known yet"})
def doctor(c: Context, json: bool = False, builder: str = "", accept_new_host_key: bool = False) -> None:
    """Check tools, accelerator, UEFI firmware and disk space for the configured images.

    It shows each tool's version (or the install command for this host's package manager: apt,
    dnf, brew or nix), where the packer in use came from (the distribution's package, HashiCorp's
    repository, PACKER=/path, a link setup.sh made, a binary on PATH) and whether it is new
    enough for `required_plugins` and `packer init` (1.7+), the accelerator that will be used
    and why, the CPU's x86-64 level (with a warning for images that need more), UEFI firmware
    per arch, free disk, and nix's remote builders (systems, features, which NixOS images each
    can build); here or, with --builder, on a builder.

    Exit codes: 0 all there; 127 a required tool is missing; 3 this host cannot do it (no UEFI
    firmware for an image of its arch); 2 bad configuration; 4 the builder is unreachable or its
    host key unknown.
    """
    from pipeline import doctor as doc  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline import origin  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.host import existing_parent, local_runner, probe  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    if builder:
        from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        target = remote.resolve(cfg, builder, remote.ssh_config_path(c.config))
        conn = remote.connect(target, accept_new_host_key=accept_new_host_key)
        try:
            report = doc.report(cfg, remote.builder_facts(conn, target), where=f"builder {target.name}",
                                packer=origin.probe_packer(remote.runner_for(conn), local=False))
        finally:
            conn.close()
    else:
        report = doc.report(cfg, probe(disk_path=str(existing_parent(cfg.output_dir))),
                            packer=origin.probe_packer(local_runner))
    print(_json.dumps(report.as_json(), indent=2) if json else doc.format_text(report))
    if not report.ok:
        raise Exit(code=report.exit_code or 1)
