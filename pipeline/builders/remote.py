"""Remote builders over SSH: who they are, connecting safely, facts, sync, and running tasks there.

A builder is a name from `builders:` in invoke.yaml, or else an SSH host alias used as is. Every
name and path is checked *before* any connection (nothing from configuration or the command
line reaches a shell unquoted), Fabric reads the same ssh_config that OpenSSH gets for rsync
(`ssh_config_path` in the Invoke config; else ~/.ssh/config), and host keys are verified
against that config's known_hosts instead of Fabric's default of trusting any key.

Commands on the builder are argv lists joined with `shlex.join`; where a command must run in a
directory, a constant `sh -c` script receives the directory as a positional argument.

The builder dir is mirrored with `rsync --delete`, so it must be imagepipe's own: the first sync
claims an empty (or new) folder by writing a marker file into it; `/`, the home folder (or one
above it) and a non-empty folder without the marker are refused before rsync runs. What the
builder prints reaches this terminal with control characters made visible (pipeline.base.text).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from invoke.exceptions import CommandTimedOut

from pipeline import keys
from pipeline.base import events
from pipeline.base.errors import (
    BuilderUnreachable,
    BuildFailed,
    HostKeyChanged,
    HostKeyUnknown,
    ImagepipeError,
    UnsafePath,
    UsageError,
)
from pipeline.base.run import Result, stream
from pipeline.base.text import visible
from pipeline.base.validate import host_problem
from pipeline.builders import rsync, wire
from pipeline.firmware import find_firmware
from pipeline.host import HostFacts, Runner, probe
from pipeline.model import Arch, Compress, Config
from pipeline.progress import Progress

# Runs argv in directory $1 (no config value is ever part of the script text itself).
IN_DIR = 'cd -- "$1" && shift && exec "$@"'
VENV = ".venv"
VENV_STAMP = f"{VENV}/imagepipe-pyproject.sha256"
# Checks the builder's venv against the pyproject hash ($2); recreates it only when it differs.
ENSURE_VENV = r"""set -e
cd -- "$1"
if [ -x .venv/bin/invoke ] && [ "$(cat .venv/imagepipe-pyproject.sha256 2>/dev/null)" = "$2" ]; then
  echo "venv up to date"; exit 0
fi
rm -rf .venv
python3 -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check -q -e .
printf '%s\n' "$2" > .venv/imagepipe-pyproject.sha256
echo "venv created"
"""
MARKER = rsync.BUILDER_MARKER
# Decides whether the builder dir ($1) may be mirrored with rsync --delete and claims a new or
# empty one with the marker file ($2); prints one word (no config value is part of the script).
CLAIM_DIR = r"""set -eu
d=$1
if [ -e "$d" ] && [ ! -d "$d" ]; then echo not-a-folder; exit 0; fi
mkdir -p -- "$d"
real=$(cd -- "$d" && pwd -P)
home=$(cd && pwd -P)
if [ "$real" = / ]; then echo root; exit 0; fi
if [ "$real" = "$home" ]; then echo home; exit 0; fi
case "$home/" in "$real"/*) echo above-home; exit 0;; esac
if [ -f "$d/$2" ] && [ ! -L "$d/$2" ]; then echo ours; exit 0; fi
if [ -z "$(ls -A -- "$d")" ]; then
  printf '%s
' "imagepipe builder folder: the project is mirrored here (rsync --delete)" > "$d/$2"
  echo claimed; exit 0
fi
echo foreign
"""
FACTS_END = "imagepipe-facts-end"  # between wire.FACTS' output and CLAIM_DIR's in one round trip
# Builds on a builder publish here (relative to its dir), whatever its invoke.yaml says.
REMOTE_OUTPUT = "output"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


# --------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A validated builder: SSH host (alias), build dir on it, arch, and the ssh_config to use."""

    name: str
    host: str
    dir: str                      # relative to the remote home, or absolute; no '~', no '..'
    arch: Arch | None = None
    ssh_config: Path | None = None
    compress: Compress = Compress.AUTO   # how images cross its link (pipeline.builders.wire)

    def path(self, *parts: str) -> str:
        """A path under the build dir on the builder."""
        return str(PurePosixPath(self.dir, *parts))

    @property
    def prefix(self) -> str:
        return f"[{self.name}] "


def check_host(host: str) -> str:
    """Refuse host names that ssh, rsync or a shell would read as something else."""
    reason = _host_problem(host)
    if reason:
        raise UsageError(f"builder host {host!r} refused: {reason}",
                         hint="use a Host alias from your ssh config or a plain hostname; "
                              "configure builders under `builders:` in invoke.yaml")
    return host


def _host_problem(host: str) -> str | None:
    if not host:
        return "it is empty"
    checks: list[tuple[bool, str]] = [
        (host.startswith("-"), "it starts with '-' (ssh and rsync would read it as an option)"),
        ("\n" in host or "\r" in host or "\0" in host, "it contains a line break or NUL"),
        (any(ch.isspace() for ch in host), "it contains whitespace"),
        ("$(" in host or "`" in host, "it contains a command substitution ($( or `)"),
        (any(ch in host for ch in ";&|<>"), "it contains a shell operator (; & | < >)"),
        (any(ch in host for ch in "'\"\\"), "it contains a quote or backslash"),
        (":" in host or "/" in host, "it contains ':' or '/' (rsync would read a path)"),
        (host_problem(host) is not None, host_problem(host) or ""),
    ]
    return next((why for bad, why in checks if bad), None)


def check_dir(raw: str) -> str:
    """A builder dir as a plain remote path: '~/x' → 'x' (relative to home); no '..' escapes."""
    bad = _dir_problem(raw)
    if bad:
        raise UsageError(f"builder dir {raw!r} refused: {bad}",
                         hint="use an absolute path or one under ~ without '..', e.g. ~/imagepipe")
    if raw in ("~", "~/"):
        return "."
    return raw.removeprefix("~/")


def _dir_problem(raw: str) -> str | None:
    if not raw.strip():
        return "it is empty"
    if any(ch in raw for ch in "\n\r\0"):
        return "it contains a line break or NUL"
    if raw.startswith("-"):
        return "it starts with '-'"
    if raw.startswith("~") and not (raw == "~" or raw.startswith("~/")):
        return "'~user' paths are not supported"
    if ".." in PurePosixPath(raw).parts:
        return "a '..' component would leave the build dir"
    return None


def check_name(value: str, what: str) -> str:
    """A file or build name read from a builder: one plain path component."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise BuildFailed(f"the builder's {what} {value!r} is not a plain file name; refusing to use it")
    return value


def resolve(cfg: Config, name: str, ssh_config: str | None = None) -> Target:
    """The builder called `name` (configured, or an SSH alias with defaults), fully validated."""
    check_host(name)
    configured = cfg.builders.get(name)
    host = check_host(configured.host) if configured else name
    raw_dir = configured.dir if configured else "~/imagepipe"
    path = None
    if ssh_config:
        path = Path(ssh_config).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"ssh_config_path {ssh_config!r} does not exist",
                             hint="point ssh_config_path in invoke.yaml at an OpenSSH client config file")
    return Target(name, host, check_dir(raw_dir), configured.arch if configured else None, path,
                  configured.compress if configured else Compress.AUTO)


def ssh_config_path(invoke_config: Any) -> str | None:
    """`ssh_config_path` from the Invoke config (top-level key, the one Fabric uses)."""
    value = invoke_config.get("ssh_config_path") if hasattr(invoke_config, "get") else None
    return str(value) if value else None


# --------------------------------------------------------------------------------- host keys


def fingerprint(key: Any) -> str:
    """OpenSSH-style SHA256 fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_files(ssh_options: Mapping[str, Any]) -> list[Path]:
    """UserKnownHostsFile from the looked-up ssh config, else ~/.ssh/known_hosts."""
    raw = ssh_options.get("userknownhostsfile")
    items = raw if isinstance(raw, list) else str(raw or "").split()
    files = [Path(i).expanduser() for i in items if i and i != "none"]
    return files or [Path("~/.ssh/known_hosts").expanduser()]


def _policy(known_hosts: Path, accept_new: bool, builder: str) -> Any:
    """A paramiko policy: unknown key → refused (or, when asked, added like accept-new)."""
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            fp = fingerprint(key)
            if not accept_new:
                raise HostKeyUnknown(
                    f"builder {builder}: host key {key.get_name()} {fp} of {hostname} is not in {known_hosts}",
                    hint=f"check the fingerprint with the builder's admin, then re-run with "
                         f"--accept-new-host-key (or connect once with ssh {builder})")
            known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(known_hosts, "a", encoding="utf-8") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            client.get_host_keys().add(hostname, key.get_name(), key)

    return Policy()


def _pin_host_keys(conn: Any, accept_new: bool, builder: str) -> None:
    """Replace Fabric's AutoAddPolicy on the connection (and its ProxyJump hops)."""
    files = known_hosts_files(conn.ssh_config)
    for f in files:
        if f.is_file():
            conn.client.load_system_host_keys(str(f))
    conn.client.set_missing_host_key_policy(_policy(files[0], accept_new, builder))
    gateway = getattr(conn, "gateway", None)
    if gateway is not None and hasattr(gateway, "client"):
        _pin_host_keys(gateway, accept_new, builder)


# --------------------------------------------------------------------------------- connecting


def connect(target: Target, *, accept_new_host_key: bool = False, timeout: float = 20) -> Any:
    """An open Fabric Connection to the builder, host key verified."""
    import paramiko
    from fabric import Config as FabricConfig
    from fabric import Connection

    fab = FabricConfig(runtime_ssh_path=str(target.ssh_config)) if target.ssh_config else FabricConfig()
    conn = Connection(target.host, config=fab, connect_timeout=timeout)
    _pin_host_keys(conn, accept_new_host_key, target.name)
    where = f"{conn.user}@{conn.host}:{conn.port}"
    try:
        conn.open()
    except ImagepipeError:  # our host key policy refused
        conn.close()
        raise
    except paramiko.BadHostKeyException as exc:
        conn.close()
        raise HostKeyChanged(
            f"builder {target.name}: the host key of {where} CHANGED (now {fingerprint(exc.key)}); refusing to connect",
            hint="if the builder was reinstalled, remove its old line from known_hosts "
                 "(ssh-keygen -R) after checking the new fingerprint; otherwise someone may be intercepting") from None
    except paramiko.AuthenticationException as exc:
        conn.close()
        raise BuilderUnreachable(f"builder {target.name}: authentication to {where} failed: {exc}",
                                 hint="check IdentityFile/User in your ssh config or load the key into ssh-agent") from None
    except (OSError, paramiko.SSHException, EOFError) as exc:
        conn.close()
        raise BuilderUnreachable(f"builder {target.name}: cannot connect to {where}: {exc}",
                                 hint=f"check that `ssh {target.host}` works (HostName, Port, ProxyJump)") from None
    return conn


def runner_for(conn: Any, timeout: float = 60) -> Runner:
    """A host.Runner that runs argv on the builder (missing program → 127, as locally)."""

    def run_remote(argv: Sequence[str]) -> Result:
        try:
            res = conn.run(shlex.join(argv), hide=True, warn=True, in_stream=False, timeout=timeout)
        except CommandTimedOut:
            return Result(tuple(argv), 124, "", f"timed out after {timeout:.0f}s")
        return Result(tuple(argv), res.exited, res.stdout, res.stderr)

    return run_remote


def in_dir(directory: str, argv: Sequence[str]) -> list[str]:
    """argv run inside `directory` on the builder (the directory is an argument, not script text)."""
    return ["sh", "-c", IN_DIR, "imagepipe", directory, *argv]


# --------------------------------------------------------------------------------- facts


def builder_facts(conn: Any, target: Target) -> HostFacts:
    """The builder's facts through the same probes and parsers as `invoke doctor` uses locally."""
    run_remote = runner_for(conn)
    disk = target.dir if run_remote(("test", "-d", target.dir)).ok else "."
    facts = probe(run_remote, disk_path=disk, local=False)
    if facts.os != "linux":
        return facts

    def exists(path: str) -> bool:
        return run_remote(("test", "-e", path)).ok

    firmware = {arch: fw for arch in Arch if (fw := find_firmware(arch, {}, exists=exists))}
    return replace(facts, firmware=firmware)


# --------------------------------------------------------------------------------- sync + venv


def claim_dir(conn: Any, target: Target) -> tuple[str, wire.Facts]:
    """Make sure the builder dir is imagepipe's before anything is deleted there: returns "ours"
    or "claimed" (a new or empty folder, now marked), and what the builder says about its end of
    the link (wire.FACTS, asked in the same round trip); UnsafePath for anything else."""
    script = f"{wire.FACTS}\necho {FACTS_END}\n(\n{CLAIM_DIR})"
    res = runner_for(conn)(("sh", "-c", script, "imagepipe", target.dir, MARKER))
    facts_text, _, claimed = res.stdout.partition(f"{FACTS_END}\n")
    verdict = claimed.strip().splitlines()[-1] if res.ok and claimed.strip() else ""
    if verdict in ("ours", "claimed"):
        return verdict, wire.parse_facts(facts_text)
    where = f"builder {target.name}: {target.dir!r} on {target.host}"
    fix = (f"set builders.{target.name}.dir in invoke.yaml to a folder of its own (new or empty), "
           "e.g. ~/imagepipe")
    problems = {
        "not-a-folder": "exists and is not a folder",
        "root": "is the root folder /",
        "home": "is the home folder",
        "above-home": "is a folder above the home folder",
        "foreign": f"is not empty and has no {MARKER} marker, so it is not imagepipe's",
    }
    if verdict not in problems:
        raise BuildFailed(f"{where}: cannot check or create it: {visible((res.stderr or claimed).strip()[-300:])}")
    if verdict == "foreign":
        fix += (f"; if it holds only an earlier imagepipe sync, mark it as imagepipe's: "
                f"ssh {target.host} touch {shlex.quote(target.path(MARKER))}")
    raise UnsafePath(f"{where} {problems[verdict]}: syncing with rsync --delete would remove what else is "
                     "there; nothing was changed", fix)


@dataclass(frozen=True)
class Synced(rsync.Stats):
    """rsync's stats of one sync, and how the project crossed the link (a Wire's text)."""

    how: str = ""


def sync(conn: Any, target: Target, root: Path, extra_excludes: Sequence[str] = ()) -> Synced:
    """Mirror the project into the builder dir over the same SSH settings; returns rsync's stats
    and the compression used. The dir must be imagepipe's (`claim_dir`) before rsync --delete
    runs against it."""
    rsync.require_capable()
    _, facts = claim_dir(conn, target)
    # the project is small: compressed unless the builder is this machine, never worth a measurement
    chosen = wire.for_link(target.name, target.compress.value, facts, lambda enough: None)
    argv = rsync.push_argv(root, target.host, target.dir, target.ssh_config,
                           (*rsync.SYNC_EXCLUDES, *extra_excludes), compress=chosen.rsync_args())
    result = stream(argv, timeout=main_thread_timeout(3600),
                    hint=f"check that `ssh {target.host}` works and rsync is installed there")
    return Synced(**vars(rsync.parse_stats(result.stdout)), how=chosen.text)


def main_thread_timeout(seconds: float) -> float | None:
    """run.stream's timeout uses SIGALRM, which only the main thread may set: none in workers."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def local_excludes(cfg: Config) -> list[str]:
    """The configured output dir, when it lies inside the project and is not output/."""
    try:
        rel = cfg.output_dir.resolve().relative_to(cfg.root.resolve())
    except ValueError:
        return []
    return [f"/{rel.as_posix()}/"] if rel.as_posix() not in (".", "output") else []


def pyproject_hash(root: Path) -> str:
    return hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()


def ensure_venv(conn: Any, target: Target, root: Path, say: Callable[[str], None]) -> None:
    """A venv with this project installed in the builder dir; recreated only when pyproject changes."""
    argv = ["sh", "-c", ENSURE_VENV, "imagepipe", target.dir, pyproject_hash(root)]
    sink = LineSink(lambda line: say(target.prefix + visible(line)))
    res = conn.run(shlex.join(argv), warn=True, hide=False, out_stream=sink, err_stream=sink,
                   in_stream=False, timeout=1800)
    sink.close()
    if res.exited != 0:
        raise BuildFailed(f"builder {target.name}: could not prepare the venv in {target.dir} (exit {res.exited})",
                          hint="the builder needs python3 with venv (apt-get install python3-venv) and PyPI access")


# --------------------------------------------------------------------------------- remote tasks


class LineSink:
    """A file-like target for Fabric's output streams that hands over whole lines."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.buf = ""
        self.lock = threading.Lock()

    def write(self, data: str) -> int:
        with self.lock:
            self.buf += data
            *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.on_line(line.rstrip("\r"))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.buf:
            rest, self.buf = self.buf, ""
            self.on_line(rest)


def local_public_key(cfg: Config) -> str:
    """This machine's project public key (created if needed) as `type base64`: what a remote
    build adds for ssh_user (the comment stays here)."""
    return " ".join(keys.public_key(keys.project_key(cfg.output_dir, cfg.defaults.ssh_key)).split()[:2])


def remote_build(conn: Any, target: Target, image: str, accel: str | None, say: Callable[[str], None],
                 extra: Sequence[str] = (), authorize: str | None = None) -> int:
    """Run `invoke build IMAGE [--accel A] [--authorize-key KEY] --json [EXTRA]` in the builder dir,
    streaming its events; returns its exit code. Without `accel` the builder's own defaults.accel
    applies. `authorize`: this machine's public key, so the image fetched back here logs in with
    the key `invoke ssh` and `run` use here (the builder's own project key is baked in as well)."""
    accel_args = ["--accel", accel] if accel else []
    key_args = ["--authorize-key", authorize] if authorize else []
    argv = in_dir(target.dir, ["env", f"INVOKE_DEFAULTS_OUTPUT_DIR={REMOTE_OUTPUT}",
                               f"{VENV}/bin/invoke", "build", image, *accel_args, *key_args, "--json", *extra])
    progress = Progress(image, prefix=target.prefix, live=False)

    def on_stdout(line: str) -> None:
        parsed = events.parse(line)
        if parsed is not None:
            _, ev = parsed
            # one line per event, so every line of a multi-line message carries the prefix
            for part in ev.message.splitlines() or [""]:
                progress.emit(replace(ev, message=visible(part), source=visible(ev.source)))
        elif line.strip():
            say(target.prefix + visible(line))

    out = LineSink(on_stdout)
    # A pty: Ctrl-C here is forwarded as ^C, which the builder's terminal turns into SIGINT for the
    # remote build, so its own cleanup runs (packer and qemu stopped, staging removed) and its exit
    # status (130) comes back. stderr shares the pty; JSON events are told apart line by line.
    with progress:
        res = conn.run(shlex.join(argv), warn=True, hide=False, out_stream=out, in_stream=False, pty=True)
    out.close()
    return int(res.exited)
