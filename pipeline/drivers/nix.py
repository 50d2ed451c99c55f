"""The Nix driver: `nix build` of a NixOS image, its log as progress events, the image out of the store.

`NixDriver` implements pipeline.drivers.Driver. Also here: the nixpkgs revision from flake.lock
(for the manifest) and the `kvm` system-feature warning. The log parser is in drivers/nixlog.py,
the lint check in pipeline/lint/nix.py, what a host needs to build NixOS in distros/nixos.py.

The flake is always evaluated purely: `--impure` is never passed (everything the flake reads is
tracked in git or an input). Nix's experimental `nix-command flakes` are switched on per call
with --extra-experimental-features, so Debian's nix 2.8 works without touching nix.conf; other
host settings (sandbox, build-users-group) come from the host's nix.conf or NIX_CONFIG.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.base.errors import BuildFailed, CommandFailed, ToolMissing
from pipeline.base.fsutil import atomic_write
from pipeline.base.run import Result, install_hint, run, stream
from pipeline.drivers.nixcli import json_flags, local_nix_version, nix_argv, nix_error
from pipeline.drivers.nixlog import LogParser
from pipeline.model import Image
from pipeline.nixmachines import physical
from pipeline.progress import Event, Progress

if TYPE_CHECKING:
    from pipeline.contents.packages import Package
    from pipeline.drivers import Source
    from pipeline.drivers.nixremote import SshNg
    from pipeline.host import HostFacts
    from pipeline.plan import BuildPlan

# make-disk-image.nix names its output nixos.qcow2 (qcow2 formats) or nixos.img (raw).
IMAGE_NAMES = {"qcow2": ("nixos.qcow2",), "raw": ("nixos.img", "nixos.raw")}
OUT_LINK = "result"


# ---------------------------------------------------------------------------------------------
# What to build


def is_local_flake(ref: str) -> bool:
    """True when a `flake:` value is a filesystem path rather than a flake URL (github:...)."""
    return ref.startswith(("/", "./", "../", "~")) or ":" not in ref


def flake_dir(image: Image, root: Path) -> Path | None:
    """The local directory of the image's flake (None for a remote flake URL)."""
    if image.flake is None:
        return root / "nixos"
    if not is_local_flake(image.flake):
        return None
    path = Path(image.flake).expanduser()
    return (path if path.is_absolute() else root / path).resolve()


def flake_ref(image: Image, root: Path) -> str:
    """The flake to build from: the image's own `flake:` (path or URL) or the project's nixos/."""
    local = flake_dir(image, root)
    return str(local) if local is not None else str(image.flake)


def attribute(image: Image) -> str:
    """The output to build: the image's `attribute:`, else packages.<system>.<image>-image."""
    return image.attribute or f"packages.{image.arch.nix_system}.{image.name}-image"


def installable(image: Image, root: Path) -> str:
    """flake#attribute, as nix build takes it."""
    return f"{flake_ref(image, root)}#{attribute(image)}"


def toplevel(image: Image, root: Path, flake: str | None = None) -> str:
    """flake#nixosConfigurations.<image>.config.system.build.toplevel: the system whose runtime
    closure is the image's package list (`flake`: the copy the build ran on, else the image's)."""
    name = image.name if image.name.replace("-", "").replace("_", "").isalnum() else f'"{image.name}"'
    return f"{flake or flake_ref(image, root)}#nixosConfigurations.{name}.config.system.build.toplevel"


def path_info_argv(target: str, store_args: Sequence[str] = (), version: tuple[int, ...] | None = None) -> list[str]:
    """Every store path `target` needs at run time, as JSON (it must be in the store already);
    `version`: the nix that runs it (2.33+ is given `--json-format 1`)."""
    return nix_argv("path-info", "-r", *json_flags(version), *store_args, target)


def closure_packages(image: Image, root: Path, report: Callable[[str], None] | None = None,
                     flake: str | None = None, *, store_args: Sequence[str] = (),
                     env: Mapping[str, str] | None = None) -> list[Package]:
    """The runtime closure of the image's system (its toplevel, built with the image), one
    Package per store path. A flake without nixosConfigurations.<image> gets the closure of the
    image output itself (said through `report`). `flake`: the staged copy the build ran on;
    `store_args`/`env`: the store it was built in (a builder's, over ssh-ng)."""
    from pipeline.contents.packages import parse_path_info  # noqa: PLC0415 (kept off the no-op build and the input hash)

    version = local_nix_version()  # path-info runs here, also against a builder's store (ssh-ng)
    res = run(path_info_argv(toplevel(image, root, flake), store_args, version), check=False, timeout=900, env=env)
    if not res.ok and "does not provide attribute" in res.stderr:
        if report:
            report(f"the flake has no nixosConfigurations.{image.name}: the package list is the closure of "
                   f"{attribute(image)} instead")
        target = f"{flake}#{attribute(image)}" if flake else installable(image, root)
        res = run(path_info_argv(target, store_args, version), check=False, timeout=900, env=env)
    if not res.ok:
        raise BuildFailed(f"cannot list the image's store paths: {nix_error(res.stderr)}",
                          hint="the system's toplevel must be in the store after the image build: "
                               "nix path-info -r " + toplevel(image, root, flake))
    return parse_path_info(res.stdout)


def nix_build_argv(target: str, out_link: Path, keep_failed: bool = False) -> list[str]:
    """The nix build command line (pure: tests assert on it, e.g. that --impure never appears).

    -L must come before --log-format: nix 2.8 treats -L as a log format of its own, and the last
    one given wins.
    """
    argv = nix_argv("build", target, "--out-link", str(out_link), "-L", "--log-format", "internal-json")
    return argv + ["--keep-failed"] if keep_failed else argv


def remote_build_argv(target: str, store_args: Sequence[str], keep_failed: bool = False) -> list[str]:
    """The nix build on a builder's store (`store_args`: --eval-store here, --store there): no
    out-link (it would point into the builder's store), the result path as JSON on stdout."""
    argv = nix_argv("build", target, *store_args, "--no-link", "--json", "-L", "--log-format", "internal-json")
    return argv + ["--keep-failed"] if keep_failed else argv


def build_target(plan: BuildPlan, flake: str | None = None) -> str:
    """flake#attribute of plan.image: `flake` is the flake the profile prepared for this build
    (a staged copy), else the image's own."""
    return f"{flake}#{attribute(plan.image)}" if flake else installable(plan.image, plan.root)


def build_argv(plan: BuildPlan, stage: Path, on_error: str = "cleanup", flake: str | None = None) -> list[str]:
    """The nix build of plan.image into `stage` (on_error=abort keeps a failed build's folder);
    `flake`: the flake the profile prepared for this build (a staged copy), else the image's.
    Over ssh-ng (plan.route) the same flake is evaluated here and built in the builder's store."""
    from pipeline.drivers.nixremote import SshNg  # noqa: PLC0415 (kept off the no-op build and the input hash)

    target = build_target(plan, flake)
    if isinstance(plan.route, SshNg):
        return remote_build_argv(target, plan.route.store_args(), keep_failed=on_error == "abort")
    return nix_build_argv(target, stage / OUT_LINK, keep_failed=on_error == "abort")


# ---------------------------------------------------------------------------------------------
# What this host's nix can do


def kvm_warnings(settings: Mapping[str, str] | None, facts: HostFacts | None = None) -> list[str]:
    """Warnings about nix's `kvm` system feature, which make-disk-image.nix requires. Pure."""
    features = (settings or {}).get("system-features", "").split()
    if "kvm" not in features:
        return [
            ("nix on this host lacks the `kvm` system feature (system-features = "
            f"{' '.join(features) or 'none'}): make-disk-image.nix will stop with 'required system or "
            "feature not available'. Add `extra-system-features = kvm` to /etc/nix/nix.conf on a host "
            "where /dev/kvm works, or build on a remote builder")
        ]
    if facts is not None and facts.os == "linux" and not facts.kvm.usable:
        return [
            (f"nix advertises `kvm`, but KVM is not usable here ({facts.kvm.why_not()}): the VM "
            "inside the image build may crawl or hang. Prefer a builder with working KVM")
        ]
    return []


# ---------------------------------------------------------------------------------------------
# The build


def failure_hint(tail: str, image: Image, log: Path) -> str:
    """What to do about a failed nix build, from the end of its log."""
    if "cptofs failed" in tail or "No space left on device" in tail:
        why = (f"the disk is too small for the system: raise images.{image.name}.disk_size "
               f"(now {image.disk_size} MiB) in invoke.yaml")
    elif "required system or feature not available" in tail or "is required to build" in tail:
        why = (f"this nix cannot build {image.arch.nix_system} with `kvm`: use a Linux "
               f"{image.arch.value} host whose nix has `kvm` in system-features")
    elif "unable to start any build" in tail:
        why = "none of nix's builders can take it (and nix may not build here): see `invoke doctor`"
    elif "Host key verification failed" in tail or "Permission denied" in tail:
        why = "nix's ssh to the builder was refused: check `ssh HOST` with the same ssh config and known_hosts"
    elif "lacks a valid signature" in tail:
        why = "the local store refused unsigned paths from the builder (add yourself to trusted-users)"
    elif "does not provide attribute" in tail:
        why = (f"the flake has no output {attribute(image)}: check images.{image.name}.flake / "
               "attribute (`nix flake show FLAKE` lists the outputs)")
    elif "unable to download" in tail or "resolve host" in tail:
        why = "nix needs the network to fetch the flake's inputs (nixpkgs) the first time"
    else:
        why = "see nix's messages above"
    return f"{why}; full log: {log}"


def pick_image(names: Sequence[str], image: Image, where: str | Path) -> str:
    """Which entry of a folder output `where` is the image: make-disk-image's name for the
    format, else the one file with the format's suffix. Pure (the builder's store is listed over
    ssh, the local one here)."""
    fmt = image.format.value
    for name in IMAGE_NAMES.get(fmt, ()):
        if name in names:
            return name
    found = sorted(n for n in names if n.endswith(f".{fmt}"))
    if len(found) == 1:
        return found[0]
    raise BuildFailed(
        f"nix built {where}, but it holds no single {fmt} image (found: {', '.join(sorted(names)) or 'nothing'})",
        hint=f"point images.{image.name}.attribute at a derivation whose output is the image "
        f"or a folder with {IMAGE_NAMES.get(fmt, ('nixos.' + fmt,))[0]}",
    )


def find_image(out: Path, image: Image, store: str | None = None) -> Path:
    """The image file inside a build result (the file itself, or nixos.qcow2 in a folder);
    `store`: nix's `store` setting, whose files a chroot store keeps under its root."""
    target = physical(os.readlink(out), store) if out.is_symlink() else out
    target = target.resolve()
    if target.is_file():
        return target
    names = [p.name for p in target.iterdir() if p.is_file()] if target.is_dir() else []
    return target / pick_image(names, image, target)


def copy_out(src: Path, dest: Path) -> Path:
    """Copy `src` (read-only in the store) to `dest`, writable by its owner; all or nothing."""
    part = dest.with_name(dest.name + ".part")
    try:
        shutil.copyfile(src, part)
        os.chmod(part, 0o644)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


class NixDriver:
    """`nix build` of the image's flake output, copied out of the store into the staging folder."""

    name = "nix"
    tools: tuple[str, ...] = ("nix",)

    def __init__(self, profile: Source) -> None:
        self.profile = profile

    def check(self, plan: BuildPlan, facts: HostFacts) -> None:
        """nix must be installed (the profile has already judged the host's OS and arch)."""
        if not facts.tool("nix").found:
            raise ToolMissing(f"nix not found on PATH (needed to build {plan.image.name})", install_hint("nix"))

    def steps(self, facts: HostFacts) -> list[str]:
        """The steps drive() announces (the build shows them as N/M)."""
        return ["nix build"]

    def command(self, plan: BuildPlan, stage: Path, known: Mapping[str, str] | None = None) -> list[str]:
        """The build command; a flake the profile prepares at build time comes from `known`,
        else shows as a placeholder."""
        staged = "flake" in self.profile.prepared_variables(plan.image)
        flake = (known or {}).get("flake", "<prepared at build time: flake>") if staged else None
        return build_argv(plan, stage, flake=flake)

    def template_text(self, image: Image, legacy: bool = False) -> str | None:
        """None: the flake is hand-written (the params JSON the profile renders is not the input)."""
        return None

    def describe_failure(self, exc: CommandFailed) -> str:
        """nix's own error lines (`error: ...`), not its argv."""
        errors = [line.strip() for line in exc.tail.splitlines()
                  if line.strip().startswith("error") and line.strip() != "error:"]  # newer nix: "error:" heads a trace
        detail = "; ".join(dict.fromkeys(errors))
        return f"nix exited {exc.returncode}" + (f": {detail}" if detail else "")

    def drive(self, plan: BuildPlan, facts: HostFacts, stage: Path, progress: Progress, *,
              on_error: str = "cleanup", timeout: float | None = None) -> Path:
        """Build plan.image with nix and return the image copied to stage/<artifact name>.

        The flake.lock the image was built from (if any) is copied next to it, so the build's
        inputs are recorded. Raises CommandFailed (nix's last messages, and a hint) when nix fails;
        nothing of this build is left in `stage` then. The raw internal-json log goes to
        plan.raw_log (the readable one, plan.build_log, is written by the progress view).
        on_error="abort" passes --keep-failed (nix says where it kept the build).
        """
        from pipeline.drivers.nixremote import SshNg  # noqa: PLC0415 (kept off the no-op build and the input hash)

        image = plan.image
        stage.mkdir(parents=True, exist_ok=True)
        plan.build_log.parent.mkdir(parents=True, exist_ok=True)
        out_link = stage / OUT_LINK
        flake = self.profile.prepare(plan, stage, progress.info).variables.get("flake")
        argv = build_argv(plan, stage, on_error, flake)
        if plan.route is not None:
            _check_route(plan, build_target(plan, flake), progress, facts.os)
        progress.step_event(f"nix build {argv[4]}" + (f" on {plan.route.where}" if plan.route else ""))
        env = plan.route.env() if isinstance(plan.route, SshNg) else None
        result, tail, built = _run_build(argv, progress, plan.raw_log, timeout, env)
        if not result.ok:
            out_link.unlink(missing_ok=True)
            raise CommandFailed(argv, result.returncode, tail, hint=failure_hint(tail, image, plan.build_log))
        if isinstance(plan.route, SshNg):
            dest = _copy_from_builder(plan.route, built, image, stage, progress, artifact_name=plan.artifact_name)
        else:
            dest = _copy_from_store(out_link, image, stage, (facts.nix_config or {}).get("store"), plan.build_log,
                                    artifact_name=plan.artifact_name)
        keep_lock(Path(flake.removeprefix("path:")) if flake else flake_dir(image, plan.root), stage)
        project_flake = flake_dir(image, plan.root) if image.flake is None else None
        if project_flake is not None:  # without a committed lock, the one nix just wrote becomes it
            adopted = adopt_lock(stage / "flake.lock", project_flake / "flake.lock", plan.root, who="nix")
            if adopted:
                progress.info(adopted)
        progress.emit(Event("artifact", f"image copied out of the store: {dest}", source="nix", data=(str(dest),)))
        return dest


def _check_route(plan: BuildPlan, target: str, progress: Progress, host_os: str = "") -> None:
    """The image derivation's (`target`: the flake#attribute built) real needs (system,
    requiredSystemFeatures) against the builders of plan.route, before anything is copied; a
    warning when the builder's `kvm` will not give make-disk-image's VM KVM."""
    from pipeline.drivers.nixremote import check_fit, derivation_needs, tcg_warning  # noqa: PLC0415 (kept off the no-op build and the input hash)

    assert plan.route is not None
    progress.step_event("evaluate the image derivation (system, required features)")
    needs = derivation_needs(target)
    check_fit(plan.route, needs, plan.image)  # type: ignore[arg-type]
    progress.info(f"{plan.image.name} needs {needs.describe()}: {plan.route.describe()}")
    slow = tcg_warning(plan.route, plan.image, host_os)  # type: ignore[arg-type]
    if slow:
        progress.info(f"warning: {slow}")


def _copy_from_store(out_link: Path, image: Image, stage: Path, store: str | None, log: Path,
                     *, artifact_name: str) -> Path:
    """The image out of the local store into `stage`; the out-link (a GC root) goes either way."""
    try:
        if not out_link.is_symlink():
            raise BuildFailed(f"nix build succeeded but left no result at {out_link}", hint=f"full log: {log}")
        return copy_out(find_image(out_link, image, store), stage / artifact_name)
    finally:
        # The out-link is a GC root into the store; the copy in staging is what we keep.
        out_link.unlink(missing_ok=True)


def _copy_from_builder(route: SshNg, built: str | None, image: Image, stage: Path, progress: Progress,
                       *, artifact_name: str) -> Path:
    """The image file out of the builder's store, over rsync with imagepipe's SSH settings."""
    from pipeline.drivers.nixremote import fetch_image  # noqa: PLC0415 (kept off the no-op build and the input hash)

    if built is None:
        raise BuildFailed(f"nix built {image.name} on {route.where} but did not say where the result is",
                          hint="nix build --json printed no result line; see the build log")
    progress.step_event(f"copy the image from {route.where} ({built})")
    copied = fetch_image(route, built, image, stage, pick=pick_image, artifact_name=artifact_name)
    delta = ", a delta against the image published here" if copied.delta else ""
    progress.info(f"copied {copied.path.name} from {route.where}: {copied.sent} bytes in {copied.seconds:.1f}s "
                  f"({copied.wire}{delta})")
    return copied.path


def adopt_lock(fetched: Path, local: Path, root: Path, who: str = "the builder's nix") -> str | None:
    """Copy a build's flake.lock (`fetched`: one a builder's nix wrote, or the one nix wrote into
    this build's staged copy) to the flake's `local` lock when that does not exist yet (never
    through a link): nix writes locks, imagepipe only moves the one it wrote to where the next
    build reads it. Returns what to tell the user (None: nothing to say)."""
    if not fetched.is_file():
        return None
    text = fetched.read_text(encoding="utf-8")
    rev = parse_nixpkgs_revision(text)
    pinned = f"nixpkgs {short_pin(rev)}" if rev else "its inputs"
    shown = local.relative_to(root) if local.is_relative_to(root) else local
    if local.is_symlink() or (local.exists() and not local.is_file()):
        return f"warning: {shown} is not a regular file; the builder's lock was left in {fetched}"
    if not local.exists():
        atomic_write(local, text)
        return f"{shown} written from the lock {who} wrote for this build ({pinned}): commit it"
    if local.read_text(encoding="utf-8") != text:
        here = parse_nixpkgs_revision(local.read_text(encoding="utf-8"))
        return (f"warning: the builder built from another flake.lock than {shown} ({pinned} there, "
                f"nixpkgs {short_pin(here or '?')} here): sync again so both use the committed lock")
    return None


def keep_lock(directory: Path | None, stage: Path) -> None:
    """Copy the flake's flake.lock into the build (it pins nixpkgs: the build's real input)."""
    lock = directory / "flake.lock" if directory is not None else None
    if lock is not None and lock.is_file():
        copy_out(lock, stage / "flake.lock")


def _run_build(argv: Sequence[str], progress: Progress, log: Path, timeout: float | None,
               env: Mapping[str, str] | None = None) -> tuple[Result, str, str | None]:
    """Stream nix build, emitting events; returns the Result, the last human-readable lines and
    the result path `--json` printed (None without --json)."""
    from pipeline.drivers.nixremote import out_path  # noqa: PLC0415 (kept off the no-op build and the input hash)

    parser = LogParser()
    tail: deque[str] = deque(maxlen=25)
    built: list[str] = []

    def on_line(line: str) -> None:
        path = out_path(line)
        if path is not None:
            built.append(path)
            return
        event = parser.feed(line)
        if event is not None:
            tail.append(event.message)
            progress.emit(event)

    result = stream(argv, on_line=on_line, log_path=log, timeout=timeout, check=False, env=env)
    return result, "\n".join(tail), (built[-1] if built else None)


# ---------------------------------------------------------------------------------------------
# The manifest's nixpkgs revision


def parse_nixpkgs_revision(lock_text: str) -> str | None:
    """What the root's `nixpkgs` input is locked to: its git revision, or for an input without
    one (a path or tarball) its content hash, `narHash:sha256-…` (None: no nixpkgs input, or
    an unreadable lock)."""
    try:
        lock = json.loads(lock_text)
        nodes = lock["nodes"]
        locked = nodes[nodes[lock.get("root", "root")]["inputs"]["nixpkgs"]]["locked"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(locked, dict):
        return None
    if isinstance(locked.get("rev"), str):
        return str(locked["rev"])
    return f"narHash:{locked['narHash']}" if isinstance(locked.get("narHash"), str) else None


def short_pin(pin: str) -> str:
    """A nixpkgs pin (parse_nixpkgs_revision) shortened for a message: 12 hex digits of a git
    revision, `narHash:sha256-` and 8 characters of a content hash."""
    return pin[:23] if pin.startswith("narHash:") else pin[:12]


def nixpkgs_revision(directory: Path | None) -> str | None:
    """The nixpkgs revision from <directory>/flake.lock (None without a lock or a local flake)."""
    if directory is None:
        return None
    lock = directory / "flake.lock"
    return parse_nixpkgs_revision(lock.read_text(encoding="utf-8")) if lock.is_file() else None


def plan_nixpkgs_revision(plan: BuildPlan) -> str | None:
    """The nixpkgs revision the plan's image is built from (for the manifest)."""
    return nixpkgs_revision(flake_dir(plan.image, plan.root))
