"""NixOS images built on another machine by Nix's own remote builds.

Two routes, both evaluated HERE against the local flake.lock, so a remote build can never
evaluate another nixpkgs than a local one (the builder only ever receives derivations):

`NixBuilders` - builders nix already knows (`builders` in nix.conf, /etc/nix/machines; what
    nix-darwin's linux-builder registers). When this host cannot build an image (another OS or
    arch), imagepipe checks that one of them fits and runs the ordinary `nix build`: nix sends
    the derivations there itself, with its own credentials (often root's, e.g. the
    linux-builder's key) and its own host-key pins. imagepipe does not touch that SSH.

`SshNg` - a builder named on the command line (`--builder HOST`, `remote-build-nixos-x86 HOST`):
    `nix build --eval-store <local store> --store ssh-ng://HOST --no-link --json`. The local
    nix evaluates and copies the derivations to the builder's store, the builder's nix-daemon
    builds them there, and imagepipe rsyncs only the image file out of the builder's store.
    Chosen over `--builders 'ssh-ng://HOST ...' --max-jobs 0` because with a store URI the
    local nix client runs ssh itself, so NIX_SSHOPTS (imagepipe's ssh_config, strict host-key
    checking, BatchMode) applies even where a nix-daemon does the local building - a daemon
    ignores `--builders` from untrusted users and would connect as root with root's
    known_hosts; and it needs no trusted user on the builder (only .drv files are built there).
    Chosen over `nix copy --from` for the way back because a local store accepts unsigned
    paths only from trusted users (nix 2.8 here: "lacks a valid signature"), and imagepipe
    needs the image file, not the path in its store. The builder's host key is checked (or
    pinned with --accept-new-host-key) by OpenSSH before nix connects.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from pipeline.base.errors import BuildFailed, HostUnsuitable, ToolMissing, UsageError
from pipeline.base.run import install_hint, run
from pipeline.builders import openssh, rsync, transfer, wire
from pipeline.builders.remote import Target, check_name
from pipeline.drivers.nixcli import nix_argv, nix_error
from pipeline.host import parse_nix_config, parse_version
from pipeline.model import Image
from pipeline.nixmachines import DISK_IMAGE_FEATURES, Machine, Needs, check_store_path, fitting, parse_show_derivation
from pipeline.output import artifacts

SSHOPTS = "NIX_SSHOPTS"
# One round trip to a builder: exit 127 without nix, 126 without nix-daemon (what ssh-ng runs);
# else nix's version line, then its settings (`config show`, or `show-config` before nix 2.20).
BUILDER_PROBE = (
    "command -v nix >/dev/null || exit 127; command -v nix-daemon >/dev/null || exit 126; nix --version; "
    # whether make-disk-image's VM gets KVM there: /dev/kvm, and on x86 the CPU's vmx/svm flag
    "printf 'imagepipe-kvm: %s %s\\n' \"$([ -e /dev/kvm ] && echo present || echo missing)\" "
    "\"$(grep -qsE '(^| )(vmx|svm)( |$)' /proc/cpuinfo && echo virt || echo no-virt)\"; "
    "nix --extra-experimental-features nix-command config show 2>/dev/null "
    "|| nix --extra-experimental-features nix-command show-config"
)
KVM_LINE = re.compile(r"^imagepipe-kvm: (present|missing) (virt|no-virt)$", re.M)
# Host names of a Linux builder that runs as a VM on this very Mac: nix-darwin's linux-builder
# (ssh-ng://builder@linux-builder), or one reached on loopback.
LOCAL_VM_HOSTS = ("linux-builder", "localhost", "127.0.0.1", "::1")
# Prints "dir" and the entries of directory $1, or "file" when $1 is a file (exit 3: missing).
LIST_OUT = '[ -e "$1" ] || exit 3; if [ -d "$1" ]; then echo dir; ls -1A -- "$1"; else echo file; fi'


# --------------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class NixBuilders:
    """nix's configured builders that can take the image (nix picks among them itself)."""

    machines: tuple[Machine, ...]
    kind: ClassVar[str] = "nix-builders"

    @property
    def where(self) -> str:
        return ", ".join(m.uri for m in self.machines)

    def describe(self) -> str:
        return "nix's configured builders: " + "; ".join(m.describe() for m in self.machines)

    def as_manifest(self) -> dict[str, Any]:
        return {"route": self.kind, "machines": [m.as_json() for m in self.machines]}

    def lacks(self, needs: Needs) -> str | None:
        whys = [f"{m.uri} {why}" for m in self.machines if (why := m.lacks(needs.system, needs.features))]
        return None if len(whys) < len(self.machines) else "; ".join(whys)


@dataclass(frozen=True)
class SshNg:
    """A builder reached over ssh-ng with imagepipe's SSH settings; nix builds in its store."""

    target: Target
    systems: tuple[str, ...]
    features: frozenset[str]
    eval_store: str = "auto"          # the local store nix evaluates into (nix.conf `store`)
    nix_version: str | None = None
    user_sshopts: str = field(default="", compare=False)
    # the OpenSSH master opened to check the host key: nix's ssh, rsync and the package list
    # ride on it (one handshake); it ends when imagepipe exits (or 30 s after it was killed)
    conn: openssh.Connection | None = field(default=None, compare=False, repr=False)
    kvm: str | None = None            # the builder's `imagepipe-kvm:` probe line (None: not read)
    kind: ClassVar[str] = "ssh-ng"

    @property
    def store_uri(self) -> str:
        return f"ssh-ng://{self.target.host}"

    @property
    def where(self) -> str:
        return self.target.name

    def machine(self) -> Machine:
        return Machine(self.store_uri, self.systems, supported=self.features, source="--builder")

    def describe(self) -> str:
        return f"builder {self.target.name} over ssh-ng: {self.machine().describe()}"

    def as_manifest(self) -> dict[str, Any]:
        return {"route": self.kind, "builder": self.target.name, "store": self.store_uri,
                "systems": list(self.systems), "features": sorted(self.features), "nix": self.nix_version}

    def lacks(self, needs: Needs) -> str | None:
        why = self.machine().lacks(needs.system, needs.features)
        return f"{self.target.name}'s nix {why}" if why else None

    def store_args(self) -> list[str]:
        """Where nix evaluates (here) and where it builds (the builder)."""
        return ["--eval-store", self.eval_store, "--store", self.store_uri]

    def env(self) -> dict[str, str]:
        """NIX_SSHOPTS for nix's own ssh (on the open master when there is one)."""
        reuse = self.conn.rsync_ssh_options() if self.conn is not None and self.conn.socket.exists() else []
        return {SSHOPTS: nix_sshopts(self.target.ssh_config, " ".join([*reuse, self.user_sshopts]))}


Route = NixBuilders | SshNg


def nix_sshopts(ssh_config: Path | None, existing: str = "") -> str:
    """NIX_SSHOPTS for nix's own ssh: imagepipe's ssh_config, strict host keys, never a prompt.

    nix splits the value on whitespace, so a config path with spaces cannot be passed; ours come
    first (ssh keeps the first value of an option), the user's own follow.
    """
    opts = []
    if ssh_config is not None:
        if any(ch.isspace() for ch in str(ssh_config)):
            raise UsageError(f"ssh_config_path {str(ssh_config)!r} contains whitespace, which nix's "
                             "NIX_SSHOPTS cannot carry", hint="move the ssh_config to a path without spaces")
        opts += ["-F", str(ssh_config)]
    opts += ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
    return " ".join([*opts, existing]).strip()


# --------------------------------------------------------------------------------- choosing


def for_configured(image: Image, machines: Sequence[Machine]) -> NixBuilders | None:
    """nix's builders that offer the image's system with what make-disk-image needs (`kvm`);
    None when none does. The derivation's real needs are checked again before the build."""
    found = fitting(machines, image.arch.nix_system, DISK_IMAGE_FEATURES)
    return NixBuilders(tuple(found)) if found else None


def not_fitting(image: Image, machines: Sequence[Machine]) -> str:
    """One line per configured builder saying why it cannot build `image`."""
    return "; ".join(f"{m.uri} {m.lacks(image.arch.nix_system, DISK_IMAGE_FEATURES)}" for m in machines)


def parse_builder_nix(settings: Mapping[str, str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The systems (system + extra-platforms) and system-features a builder's nix offers."""
    systems = [settings.get("system", ""), *settings.get("extra-platforms", "").split()]
    return tuple(dict.fromkeys(s for s in systems if s)), frozenset(settings.get("system-features", "").split())


def for_builder(target: Target, image: Image, *, accept_new_host_key: bool = False,
                eval_store: str = "auto") -> SshNg:
    """Connect to `target` (host key checked, or pinned when asked), read its nix's settings and
    refuse a builder that cannot build the image's system. Nothing is built yet; the connection
    stays open for the build (closed when imagepipe exits)."""
    conn = openssh.Connection(target, accept_new_host_key=accept_new_host_key)
    atexit.register(conn.close)
    try:
        res = conn.run(("sh", "-c", BUILDER_PROBE))
    except BaseException:
        conn.close()
        raise
    settings = parse_nix_config(res.stdout) if res.ok else None
    version = parse_version("nix", res.stdout) if res.ok else None
    if settings is None or "system" not in settings:
        conn.close()
        missing = "nix-daemon" if res.returncode == 126 else "nix"
        raise HostUnsuitable(
            f"builder {target.name} has no {missing} on the PATH of a non-interactive SSH session",
            hint=f"install nix there (nix's remote builds run `nix-daemon --stdio` over ssh), or use "
                 f"the project-sync route: invoke remote-sync-build {target.name} --image {image.name}")
    systems, features = parse_builder_nix(settings)
    kvm = KVM_LINE.search(res.stdout)
    route = SshNg(target, systems, features, eval_store, version, os.environ.get(SSHOPTS, ""), conn,
                  kvm.group(0) if kvm else None)
    system = image.arch.nix_system
    if system not in systems:
        conn.close()
        raise HostUnsuitable(
            f"builder {target.name} cannot build {image.name}: its nix builds {', '.join(systems) or 'nothing'}, "
            f"not {system}",
            hint=f"name a Linux {image.arch.value} builder (its nix `system` or `extra-platforms` must list {system})")
    return route


def tcg_warning(route: Route, image: Image, host_os: str) -> str | None:
    """A warning when the builder advertises `kvm` but make-disk-image's VM will get none there
    and run under TCG (QEMU's `accel=kvm:tcg` falls back silently): the build works, many times
    slower. For `--builder HOST` it is read (/dev/kvm and the CPU's vmx/svm there); for nix's
    configured builders it is inferred (a Linux builder that is a VM on this Mac, nix-darwin's
    linux-builder: Apple's hypervisor gives its guests no KVM)."""
    slow = (f"{image.name}'s disk image is made inside a VM (make-disk-image's QEMU) that will run under TCG, "
            "not KVM: expect the build to take several times longer")
    if isinstance(route, SshNg):
        found = KVM_LINE.search(route.kvm or "")
        if found is None or "kvm" not in route.features:
            return None
        if found.group(1) == "missing":
            return f"{slow} (read on {route.target.name}: its nix lists kvm, but it has no /dev/kvm)"
        if found.group(2) == "no-virt" and image.arch.value == "x86_64":
            return f"{slow} (read on {route.target.name}: /dev/kvm is there, but the CPU has no vmx/svm flag)"
        return None
    if host_os != "darwin":
        return None
    local = [m.uri for m in route.machines if _uri_host(m.uri) in LOCAL_VM_HOSTS and "kvm" in m.supported]
    if not local:
        return None
    return (f"{slow} (inferred, not read: {', '.join(local)} is a Linux VM on this Mac, such as nix-darwin's "
            "linux-builder, whose hypervisor gives it no KVM although its nix lists kvm)")


def _uri_host(uri: str) -> str:
    """The host of `ssh-ng://user@host:port` (or ssh://…, or a bare host)."""
    rest = uri.split("://", 1)[-1].rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.split(":", 1)[0] if rest.count(":") <= 1 else rest


def check_fit(route: Route, needs: Needs, image: Image) -> None:
    """Refuse a route none of whose machines can build the derivation (nix would stop with
    'required system or feature not available' after copying everything)."""
    why = route.lacks(needs)
    if why:
        raise HostUnsuitable(
            f"{image.name}'s derivation needs {needs.describe()}: {why}",
            hint="give the builder's nix that system and `system-features` (make-disk-image.nix needs kvm "
                 "on a host where /dev/kvm works), or name another builder")


# --------------------------------------------------------------------------------- nix calls


def show_derivation_argvs(installable: str, store_args: Sequence[str] = ()) -> list[list[str]]:
    """`nix derivation show` (nix >= 2.15), else `nix show-derivation` (nix 2.8 here)."""
    return [nix_argv("derivation", "show", *store_args, installable),
            nix_argv("show-derivation", *store_args, installable)]


def derivation_needs(installable: str, store_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> Needs:
    """The image derivation's system and requiredSystemFeatures (evaluates it, nothing built)."""
    newer, older = show_derivation_argvs(installable, store_args)
    res = run(newer, check=False, timeout=1800, env=env)
    if not res.ok and "is not a recognised command" in res.stderr:
        res = run(older, check=False, timeout=1800, env=env)
    if not res.ok:
        raise BuildFailed(f"nix cannot evaluate {installable}: {nix_error(res.stderr)}",
                          hint="the same evaluation runs before a local build: fix the flake first")
    try:
        return parse_show_derivation(res.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildFailed(f"cannot read nix's description of {installable}: {exc}") from None


def out_path(line: str) -> str | None:
    """The `out` path from `nix build --json`'s line ([{"drvPath": ..., "outputs": {...}}])."""
    if not line.startswith('[{"drvPath"'):
        return None
    try:
        outputs = json.loads(line)[0]["outputs"]
        path = outputs.get("out") or next(iter(outputs.values()))
        return check_store_path(str(path))
    except (ValueError, KeyError, IndexError, StopIteration, TypeError):
        return None


# --------------------------------------------------------------------------------- the image back


@dataclass(frozen=True)
class Copied:
    path: Path
    sent: int            # bytes that crossed the wire
    seconds: float
    wire: str = ""       # how: compressed or not, and why
    delta: bool = False  # against the image published here before


def fetch_image(route: SshNg, out: str, image: Image, stage: Path, *, pick: Any, artifact_name: str) -> Copied:
    """rsync the image file inside the builder's store path `out` into `stage` (named as the
    image's artifact), over one OpenSSH connection with imagepipe's host-key policy: compressed
    as the builder's link calls for, and as a delta against the image published here before
    (pipeline.builders.wire, pipeline.builders.transfer).
    `pick(names, image)`: which entry of a folder output is the image (drivers.nix.pick_image)."""
    target = route.target
    started = time.monotonic()
    reuse = route.conn is not None and route.conn.socket.exists()
    with contextlib.nullcontext(route.conn) if reuse else openssh.Connection(target) as conn:
        assert conn is not None
        listing = conn.run(("sh", "-c", LIST_OUT + "; " + wire.FACTS, "imagepipe", out))
        if not listing.ok:
            raise BuildFailed(f"nix built {out} on {target.name}, but it is not in its store any more",
                              hint="the builder's nix garbage collector may have removed it: build again")
        kind, *lines = listing.stdout.splitlines()
        names, facts = _split_facts(lines)
        # `out` is a checked store path; a name found in it must be one plain file name
        source = out if kind == "file" else str(PurePosixPath(out, check_name(pick(names, image, out), "image file")))
        chosen = wire.for_link(target.name, target.compress.value, facts, conn.link_rate)
        arrived = stage / PurePosixPath(source).name
        with _previous_image(stage, arrived.name, artifact_name) as basis:
            got = transfer.pull(target, [source], stage, wire=chosen, basis=basis, resume=False,
                                ssh_extra=conn.rsync_ssh_options(), algorithm=None,
                                hint=f"check that rsync is installed on {target.name}")
    dest = stage / artifact_name
    os.chmod(arrived, 0o644)  # store files are read-only
    os.replace(arrived, dest)
    return Copied(dest, got.stats.received, time.monotonic() - started, chosen.text, basis is not None)


def _split_facts(lines: list[str]) -> tuple[list[str], wire.Facts]:
    """LIST_OUT's names, then wire.FACTS' output (from its $SSH_CONNECTION line on: four fields,
    which no store file name has, or an empty line)."""
    for i, line in enumerate(lines):
        if not line.strip() or len(line.split()) == 4:
            return lines[:i], wire.parse_facts("\n".join(lines[i:]))
    return lines, wire.parse_facts("")


@contextlib.contextmanager
def _previous_image(stage: Path, name: str, artifact_name: str) -> Iterator[Path | None]:
    """A folder in `stage` where the image published here before is `name` (a hard link, read
    only by rsync as the basis of the new one), or None when there is none or no link can be made."""
    build = artifacts.current_build(stage.parent.parent)
    older = build / artifact_name if build is not None else None
    if older is None or not older.is_file() or older.is_symlink():
        yield None
        return
    folder = stage / ".previous"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        os.link(older, folder / name)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        yield None
        return
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def need_local_tools() -> None:
    """The ssh-ng route's local tools: ssh for nix and for the copy, rsync for the copy."""
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} not found on PATH (needed to build on a builder over ssh-ng)",
                              install_hint(tool))
    rsync.require_capable()  # the copy back: refused before the build, not after it
