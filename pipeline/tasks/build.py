"""Build tasks: `invoke build IMAGE` and its per-image aliases."""

from __future__ import annotations

import getpass
import json as json_mod
from typing import TYPE_CHECKING

from invoke import Context

from pipeline.base.errors import Invalid, UsageError
from pipeline.base.validate import pubkey
from pipeline.model import Config, Image
from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.options import LOCAL_ACCEL_HELP, accel_option

if TYPE_CHECKING:
    from pipeline.build import BuildOptions
    from pipeline.builders.remote import Target

BUILD_HELP = {
    "image": "image name from invoke.yaml (invoke doctor lists them)",
    "accel": LOCAL_ACCEL_HELP,
    "on_error": "what Packer does on failure: cleanup (default) or abort (keep the VM's disk for debugging)",
    "dry_run": "print what the build would do (accelerator, firmware, ISO, tools, command) and build nothing;"
               " exit != 0 when a real build could not start",
    "boot_test": "boot the new image and check SSH, arch and sudo before publishing it",
    "json": "one JSON object per event on stdout (for scripts and timers)",
    "if_changed": "build only when the input hash differs from the published build's (else say 'up to date')",
    "force": "build even when nothing changed (overrides --if-changed)",
    "no_wait": "fail at once (exit 75) when another build of this image holds its lock, instead of waiting",
    "builder": "NixOS: build on this SSH host with nix's own remote builds (ssh-ng; nix needed here), "
               "then copy, verify and publish the image here",
    "accept_new_host_key": "with --builder: trust the builder's host key if it is not known yet and add it to "
                           "known_hosts (a changed key is always refused)",
    "authorize_key": "also let this OpenSSH public key (one line) log in as the image's ssh_user, in the staged "
                     "files only (repeatable; remote builds pass the asking machine's key this way)",
}


@task(help=BUILD_HELP, iterable=["authorize_key"])
def build(c: Context, image: str, accel: str = "", on_error: str = "cleanup", dry_run: bool = False,
          boot_test: bool = False, json: bool = False, if_changed: bool = False, force: bool = False,
          no_wait: bool = False, builder: str = "", accept_new_host_key: bool = False,
          authorize_key: list[str] | None = None) -> None:
    """Build an image (plan, render, packer/nix, verify, publish to output/IMAGE/).

    The steps show as [N/M] with a live footer on a terminal, as timestamped lines otherwise
    (docs/images.md#what-a-build-looks-like). A failed or interrupted build never replaces the
    published image. `--dry-run` prints what the build would do and writes, builds and downloads
    nothing; its exit code is that of the first problem a real build would stop at (127, 3, 2).
    `--if-changed` answers `up to date: built <when>, <sha256>` when nothing changed. A NixOS
    image this host cannot build goes to a builder nix already knows, or to `--builder HOST`
    (nix over ssh-ng); with neither, it is refused, naming the remote task, nix's builders and
    why they do not fit (docs/images.md#nixos-on-other-machines-nixs-remote-builds).
    """

    cfg = load_config(c)
    img = cfg.image(image)
    if on_error not in ("cleanup", "abort"):
        raise UsageError(f"--on-error must be cleanup or abort, got {on_error!r}")
    requested = accel_option(accel, cfg)
    authorize = _authorize(authorize_key or [])
    target = _builder(c, cfg, builder)  # a hostile name is refused before anything connects
    if dry_run:
        from pipeline.build import BuildOptions  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        _dry_run(cfg, img, BuildOptions(accel=requested, boot_test=boot_test, dry_run=True, builder=target,
                                        accept_new_host_key=accept_new_host_key, authorize=authorize), json)
        return
    if if_changed and not force and not dry_run and _report_up_to_date(cfg, img, json):
        return  # the fast path: no probe, no lock, no heavy import
    from pipeline.build import BuildOptions, build_image  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    opts = BuildOptions(accel=requested, on_error=on_error, dry_run=dry_run, boot_test=boot_test, json=json,
                        if_changed=if_changed and not force, wait=not no_wait, builder=target,
                        accept_new_host_key=accept_new_host_key, authorize=authorize)
    result = build_image(cfg, img, opts, say=say)
    if result.skipped and json:
        _print_skip(img.name, result.skipped)


def _authorize(values: list[str]) -> tuple[str, ...]:
    """--authorize-key values, each one OpenSSH public key line."""
    try:
        return tuple(pubkey(v) for v in values)
    except Invalid as exc:
        raise UsageError(f"--authorize-key: {exc}", hint="pass the contents of a .pub file, e.g. "
                         "\"$(cat ~/.ssh/id_ed25519.pub)\"") from None


def _builder(c: Context, cfg: Config, name: str) -> Target | None:
    """--builder NAME as a validated remote.Target (None when not given)."""
    if not name:
        return None
    from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    return remote.resolve(cfg, name, remote.ssh_config_path(c.config))


def _dry_run(cfg: Config, img: Image, opts: BuildOptions, json: bool) -> None:
    """The summary on stdout (text, or one JSON object); then the first problem, if any, as the
    error a real build would have stopped with (its exit code)."""
    from pipeline import summary  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.build import dry_run  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    s = dry_run(cfg, img, opts)
    if json:
        print(json_mod.dumps(s.as_json(), indent=2))
    else:
        print(summary.format_text(s))
    if s.problems:
        raise s.problems[0].error()


def _report_up_to_date(cfg: Config, img: Image, json: bool) -> bool:
    """Say "up to date" and return True when the published build has the current input hash
    (and tidy what an interrupted run left, as the build would have)."""
    from pipeline import inputs  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    fresh = inputs.up_to_date(cfg.output_dir / img.name, inputs.compute(cfg, img).value)
    if fresh is None:
        return False
    say(f"{img.name}: {fresh}")
    if (cfg.output_dir / img.name / ".staging").is_dir():  # rare: retention and history load only then
        from pipeline.output import retention  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        retention.reap_when_idle(cfg.output_dir / img.name, say)
    if json:
        _print_skip(img.name, fresh)
    return True


def _print_skip(image: str, why: str) -> None:
    """The `skipped` JSON event of `build --json` when nothing had to be built."""
    from pipeline.base import events  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    events.write(events.Event("skipped", why, source="imagepipe"), image)



@task(help={"password": "the password to hash (prompted for when omitted, which keeps it out of shell history)"})
def hash_password(c: Context, password: str = "") -> None:
    """Print a SHA-512 crypt hash for a user's password_hash in invoke.yaml.

    It prompts for the password when none is given, so nothing lands in the shell's history.
    """
    from pipeline.base.run import run  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    secret = password or getpass.getpass("password: ")
    problem = password_problem(secret)
    if problem:
        raise UsageError(f"hash-password: the password {problem}", "give it again without that character")
    # openssl reads one password a line: exactly one line in, exactly one hash out
    print(run(["openssl", "passwd", "-6", "-stdin"], input=secret + "\n").stdout.strip())


def password_problem(secret: str) -> str | None:
    """What makes `secret` unusable as one password (None when nothing does): empty, or a line
    break or NUL, which would make openssl hash two passwords or a login prompt never match."""
    if not secret:
        return "is empty"
    for ch, name in (("\n", "a line break"), ("\r", "a carriage return"), ("\0", "a NUL character")):
        if ch in secret:
            return f"contains {name}"
    return None
