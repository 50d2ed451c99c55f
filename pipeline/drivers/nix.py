"""The Nix driver: `nix build` of a NixOS image, its log as progress events, the qcow2 out of the store.

Contract with pipeline.build:

    check_can_build(image, facts, cfg)     early; HostUnsuitable when this host cannot build it
    drive(plan, stage, progress) -> Path   runs nix build, returns stage/<image.artifact_name>

Also here: the nixpkgs revision from flake.lock (for the manifest), the `kvm` system-feature
warning, and the lint check over every .nix file.

The flake is always evaluated purely: `--impure` is never passed (everything the flake reads is
tracked in git or an input). Nix's experimental `nix-command flakes` are switched on per call
with --extra-experimental-features, so Debian's nix 2.8 works without touching nix.conf; other
host settings (sandbox, build-users-group) come from the host's nix.conf or NIX_CONFIG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, Image
from pipeline.errors import BuildFailed, CommandFailed, HostUnsuitable
from pipeline.host import HostFacts
from pipeline.plan import BuildPlan
from pipeline.progress import Event, Progress
from pipeline.run import run, stream, which

FEATURES = ("--extra-experimental-features", "nix-command flakes")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STORE_NAME_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-(.+?)(\.drv)?$")

# nix's internal-json activity and result types (libutil/logging.hh).
ACT_FILE_TRANSFER = 101
ACT_BUILD = 105
ACT_SUBSTITUTE = 108
RES_BUILD_LOG_LINE = 101
RES_SET_PHASE = 104
RES_POST_BUILD_LOG_LINE = 107
LEVEL_INFO = 3

# make-disk-image.nix names its output nixos.qcow2 (qcow2 formats) or nixos.img (raw).
IMAGE_NAMES = {"qcow2": ("nixos.qcow2",), "raw": ("nixos.img", "nixos.raw")}
OUT_LINK = "result"


def nix_argv(*args: str) -> list[str]:
    """argv of a nix (new CLI) command with flakes enabled for this call only."""
    return ["nix", *FEATURES, *args]


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


def nix_build_argv(target: str, out_link: Path, keep_failed: bool = False) -> list[str]:
    """The nix build command line (pure: tests assert on it, e.g. that --impure never appears).

    -L must come before --log-format: nix 2.8 treats -L as a log format of its own, and the last
    one given wins.
    """
    argv = nix_argv("build", target, "--out-link", str(out_link), "-L", "--log-format", "internal-json")
    return argv + ["--keep-failed"] if keep_failed else argv


def build_argv(plan: BuildPlan, stage: Path, on_error: str = "cleanup") -> list[str]:
    """The nix build of plan.image into `stage` (on_error=abort keeps a failed build's folder)."""
    target = installable(plan.image, plan.root)
    return nix_build_argv(target, stage / OUT_LINK, keep_failed=on_error == "abort")


# ---------------------------------------------------------------------------------------------
# nix's internal-json log -> progress events


def clean(text: str) -> str:
    """A nix message without its colour codes."""
    return ANSI_RE.sub("", text).strip()


def store_name(path: str) -> str:
    """/nix/store/<hash>-nixos-image.drv -> nixos-image."""
    m = STORE_NAME_RE.match(path)
    return m.group(1) if m else path


class LogParser:
    """Turns `@nix {...}` lines into Events; remembers which activity builds which derivation."""

    def __init__(self) -> None:
        self.builds: dict[int, str] = {}

    def feed(self, line: str) -> Event | None:
        """The event for one output line of `nix ... --log-format internal-json` (None: noise)."""
        if not line.startswith("@nix "):
            text = clean(line)
            return Event("message", text, source="nix") if text else None
        try:
            record = json.loads(line[5:])
        except json.JSONDecodeError:
            return Event("message", clean(line), source="nix")
        if not isinstance(record, dict):
            return None
        handler = {"start": self._start, "result": self._result, "msg": self._msg}.get(record.get("action", ""))
        return handler(record) if handler else None

    def _start(self, r: Mapping[str, Any]) -> Event | None:
        kind, text = r.get("type"), clean(str(r.get("text", "")))
        if kind == ACT_BUILD:
            fields = r.get("fields") or [""]
            name = store_name(str(fields[0]))
            self.builds[int(r.get("id", 0))] = name
            return Event("step", f"building {name}", source="nix", data=(str(fields[0]),))
        if text and (kind in (ACT_SUBSTITUTE, ACT_FILE_TRANSFER) or int(r.get("level", 9)) <= LEVEL_INFO):
            return Event("message", text, source="nix")
        return None

    def _result(self, r: Mapping[str, Any]) -> Event | None:
        kind, fields = r.get("type"), r.get("fields") or []
        name = self.builds.get(int(r.get("id", 0)), "")
        source = f"nix:{name}" if name else "nix"
        if kind in (RES_BUILD_LOG_LINE, RES_POST_BUILD_LOG_LINE) and fields:
            text = clean(str(fields[0]))
            return Event("message", text, source=source) if text else None
        if kind == RES_SET_PHASE and fields:
            return Event("message", f"{name or 'build'}: phase {fields[0]}", source=source)
        return None

    def _msg(self, r: Mapping[str, Any]) -> Event | None:
        text, level = clean(str(r.get("msg", ""))), int(r.get("level", 9))
        if not text or level > LEVEL_INFO:
            return None
        return Event("error" if level == 0 else "message", text, source="nix")


# ---------------------------------------------------------------------------------------------
# Can this host build it?


def build_host_problem(image: Image, facts: HostFacts) -> str | None:
    """Why this host cannot build `image` (None when it can). Pure."""
    if facts.os == "darwin":
        return (f"{image.name} cannot be built on macOS: NixOS disk images are made inside a Linux VM "
                "by make-disk-image.nix, which needs a Linux builder")
    if facts.os != "linux":
        return f"{image.name} cannot be built on {facts.os}: NixOS disk images need a Linux host"
    if facts.arch is not image.arch:
        return (f"{image.name} is an {image.arch.value} image and this host is {facts.machine}: "
                "NixOS disk images cannot be cross-built")
    return None


def remote_task(image: Image) -> str:
    """The task that builds `image` on a remote builder."""
    if image.name == f"nixos-{image.arch.value}":
        return f"invoke remote-build-nixos-{image.arch.short} HOST"
    return f"invoke remote-sync-build HOST --image {image.name}"


def remote_hint(image: Image, cfg: Config) -> str:
    """Where else `image` can be built: the remote task and the configured builders that fit."""
    arch = image.arch.value
    fitting = [b.name for b in cfg.builders.values() if b.arch is image.arch]
    unknown = [b.name for b in cfg.builders.values() if b.arch is None]
    lines = [f"build it on a Linux {arch} machine: {remote_task(image)}"]
    if fitting:
        lines.append(f"configured {arch} builders: {', '.join(fitting)}")
    else:
        lines.append(f"no builder with `arch: {arch}` is configured: add one under builders: in {cfg.source}")
    if unknown:
        lines.append(f"builders without an arch (add `arch:` to use them): {', '.join(unknown)}")
    return "\n  ".join(lines)


def check_can_build(image: Image, facts: HostFacts, cfg: Config) -> None:
    """Raise HostUnsuitable (naming the remote task and fitting builders) if this host cannot build."""
    problem = build_host_problem(image, facts)
    if problem is not None:
        raise HostUnsuitable(problem, remote_hint(image, cfg))


def parse_nix_config(text: str) -> dict[str, str]:
    """`nix show-config` output (`key = value` lines) as a dict. Pure."""
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key.strip():
            settings[key.strip()] = value.strip()
    return settings


def kvm_warnings(show_config: str, facts: HostFacts | None = None) -> list[str]:
    """Warnings about nix's `kvm` system feature, which make-disk-image.nix requires. Pure."""
    features = parse_nix_config(show_config).get("system-features", "").split()
    if "kvm" not in features:
        return [
            "nix on this host lacks the `kvm` system feature (system-features = "
            f"{' '.join(features) or 'none'}): make-disk-image.nix will stop with 'required system or "
            "feature not available'. Add `extra-system-features = kvm` to /etc/nix/nix.conf on a host "
            "where /dev/kvm works, or build on a remote builder"
        ]
    if facts is not None and facts.os == "linux" and not facts.kvm.usable:
        return [
            f"nix advertises `kvm`, but KVM is not usable here ({facts.kvm.why_not()}): the VM "
            "inside the image build may crawl or hang. Prefer a builder with working KVM"
        ]
    return []


def show_config() -> str:
    """`nix show-config` of this host."""
    return run(nix_argv("show-config"), timeout=60).stdout


# ---------------------------------------------------------------------------------------------
# The build


def failure_hint(tail: str, image: Image, log: Path) -> str:
    """What to do about a failed nix build, from the end of its log."""
    if "cptofs failed" in tail or "No space left on device" in tail:
        why = (f"the disk is too small for the system: raise images.{image.name}.disk_size "
               f"(now {image.disk_size} MiB) in invoke.yaml")
    elif "required system or feature not available" in tail:
        why = (f"this nix cannot build {image.arch.nix_system} with `kvm`: use a Linux "
               f"{image.arch.value} host whose nix has `kvm` in system-features")
    elif "does not provide attribute" in tail:
        why = (f"the flake has no output {attribute(image)}: check images.{image.name}.flake / "
               "attribute (`nix flake show FLAKE` lists the outputs)")
    elif "unable to download" in tail or "resolve host" in tail:
        why = "nix needs the network to fetch the flake's inputs (nixpkgs) the first time"
    else:
        why = "see nix's messages above"
    return f"{why}; full log: {log}"


def find_image(out: Path, image: Image) -> Path:
    """The image file inside a build result (the file itself, or nixos.qcow2 in a folder)."""
    target = out.resolve()
    if target.is_file():
        return target
    fmt = image.format.value
    for name in IMAGE_NAMES.get(fmt, ()):
        if (target / name).is_file():
            return target / name
    found = sorted(p for p in target.glob(f"*.{fmt}") if p.is_file()) if target.is_dir() else []
    if len(found) == 1:
        return found[0]
    listing = ", ".join(sorted(p.name for p in target.iterdir())) if target.is_dir() else "nothing"
    raise BuildFailed(
        f"nix built {target}, but it holds no single {fmt} image (found: {listing or 'nothing'})",
        hint=f"point images.{image.name}.attribute at a derivation whose output is the image "
        f"or a folder with {IMAGE_NAMES.get(fmt, ('nixos.' + fmt,))[0]}",
    )


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


def drive(
    plan: BuildPlan, stage: Path, progress: Progress, *, on_error: str = "cleanup", timeout: float | None = None,
) -> Path:
    """Build plan.image with nix and return the image copied to stage/<image.artifact_name>.

    The flake.lock the image was built from (if any) is copied next to it, so the build's
    inputs are recorded. Raises CommandFailed (nix's last messages, and a hint) when nix fails;
    nothing of this build is left in `stage` then. The raw internal-json log goes to
    plan.build_log. on_error="abort" passes --keep-failed (nix says where it kept the build).
    """
    image = plan.image
    which("nix")
    for warning in kvm_warnings(show_config()):
        progress.emit(Event("message", f"warning: {warning}", source="imagepipe"))
    stage.mkdir(parents=True, exist_ok=True)
    plan.build_log.parent.mkdir(parents=True, exist_ok=True)
    out_link = stage / OUT_LINK
    argv = build_argv(plan, stage, on_error)
    progress.step_event(f"nix build {argv[4]}")
    result, tail = _run_build(argv, progress, plan.build_log, timeout)
    if not result.ok:
        out_link.unlink(missing_ok=True)
        raise CommandFailed(argv, result.returncode, tail, hint=failure_hint(tail, image, plan.build_log))
    try:
        if not out_link.is_symlink():
            raise BuildFailed(f"nix build succeeded but left no result at {out_link}",
                              hint=f"full log: {plan.build_log}")
        dest = copy_out(find_image(out_link, image), stage / image.artifact_name)
    finally:
        # The out-link is a GC root into the store; the copy in staging is what we keep.
        out_link.unlink(missing_ok=True)
    keep_lock(flake_dir(image, plan.root), stage)
    progress.emit(Event("artifact", f"image copied out of the store: {dest}", source="nix", data=(str(dest),)))
    return dest


def keep_lock(directory: Path | None, stage: Path) -> None:
    """Copy the flake's flake.lock into the build (it pins nixpkgs: the build's real input)."""
    lock = directory / "flake.lock" if directory is not None else None
    if lock is not None and lock.is_file():
        copy_out(lock, stage / "flake.lock")


def _run_build(argv: Sequence[str], progress: Progress, log: Path, timeout: float | None) -> tuple[Any, str]:
    """Stream nix build, emitting events; returns the Result and the last human-readable lines."""
    parser = LogParser()
    tail: deque[str] = deque(maxlen=25)

    def on_line(line: str) -> None:
        event = parser.feed(line)
        if event is not None:
            tail.append(event.message)
            progress.emit(event)

    result = stream(argv, on_line=on_line, log_path=log, timeout=timeout, check=False)
    return result, "\n".join(tail)


# ---------------------------------------------------------------------------------------------
# The manifest's nixpkgs revision


def parse_nixpkgs_revision(lock_text: str) -> str | None:
    """The git revision the root's `nixpkgs` input is locked to (None if absent or unreadable)."""
    try:
        lock = json.loads(lock_text)
        nodes = lock["nodes"]
        node = nodes[nodes[lock.get("root", "root")]["inputs"]["nixpkgs"]]
        rev = node["locked"]["rev"]
    except (ValueError, KeyError, TypeError):
        return None
    return rev if isinstance(rev, str) else None


def nixpkgs_revision(directory: Path | None) -> str | None:
    """The nixpkgs revision from <directory>/flake.lock (None without a lock or a local flake)."""
    if directory is None:
        return None
    lock = directory / "flake.lock"
    return parse_nixpkgs_revision(lock.read_text(encoding="utf-8")) if lock.is_file() else None


def plan_nixpkgs_revision(plan: BuildPlan) -> str | None:
    """The nixpkgs revision the plan's image is built from (for the manifest)."""
    return nixpkgs_revision(flake_dir(plan.image, plan.root))


# ---------------------------------------------------------------------------------------------
# Lint

SKIP_DIRS = {".git", "output", "node_modules", ".venv", "result"}
NETWORK_ERRORS = ("unable to download", "resolve host", "Network is unreachable", "cannot connect")


def nix_files(root: Path) -> list[Path]:
    """Every .nix file of the project (not under .git, output/ or virtualenvs, which are pruned)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(folder) / n for n in names if n.endswith(".nix")]
    return sorted(found)


def parse_problem(path: Path, root: Path) -> str | None:
    """`nix-instantiate --parse` of one file: None if it parses, else `file: error`."""
    r = run(["nix-instantiate", "--parse", str(path)], check=False, timeout=60)
    if r.ok:
        return None
    lines = [clean(line) for line in r.stderr.strip().splitlines() if line.strip()]
    return f"{path.relative_to(root)}: {' / '.join(lines[:3])}"


def flake_show_problem(directory: Path, root: Path, on_note: Callable[[str], None]) -> str | None:
    """`nix flake show` offline: a problem if the flake does not evaluate, a note if only the
    network (an unfetched or unlocked input such as nixpkgs) stands in the way."""
    argv = nix_argv("flake", "show", "--offline", "--no-write-lock-file", str(directory))
    r = run(argv, check=False, timeout=300)
    rel = directory.relative_to(root) if directory.is_relative_to(root) else directory
    if r.ok:
        return None
    text = clean(r.stderr)
    if any(marker in text for marker in NETWORK_ERRORS):
        why = "no flake.lock yet" if not (directory / "flake.lock").exists() else "inputs not in the local store"
        on_note(f"{rel}: nix flake show needs the network here ({why}); "
                f"run `nix flake lock` in {rel} on a machine with network access and commit flake.lock")
        return None
    return f"{rel}: nix flake show failed: {' / '.join(text.splitlines()[-3:])}"


def lint_problems(root: Path, on_note: Callable[[str], None] | None = None) -> list[str]:
    """Lint check for `invoke lint`: every .nix file parses; nixos/ evaluates where it can offline.

    Returns problems (empty: clean). Checks that cannot run here for lack of network are not
    problems: they are reported through `on_note`.
    """
    which("nix-instantiate")
    note = on_note or (lambda _msg: None)
    problems = [p for p in (parse_problem(f, root) for f in nix_files(root)) if p]
    flake = root / "nixos"
    if (flake / "flake.nix").is_file() and not problems:
        which("nix")
        problem = flake_show_problem(flake, root, note)
        if problem:
            problems.append(problem)
    return problems
