"""The Packer driver: init/build, machine-readable output → events (implements drivers.Driver).

The committed template targets current Packer; for the build the driver renders the same data
for the installed version (no `required_plugins` before 1.7, the version comes from the host
facts) into the staging folder, runs `packer init` only where Packer knows it, and always passes
the accelerator the plan chose. What the template needs from the host (ISO, kickstart, guest
files) comes from the profile's prepare step.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.base.errors import BuildFailed, CommandFailed, StorageError, ToolMissing, UnsafePath
from pipeline.base.fsutil import atomic_write, ensure_dir, free_space, open_nofollow
from pipeline.base.numbers import int_or_none
from pipeline.base.qmpwatch import DiskFullWatch, short_socket_dir
from pipeline.base.run import install_hint, run, stream, tool_groups
from pipeline.base.text import visible, visible_lines
from pipeline.drivers import PackerSource, Prepared
from pipeline.output.artifacts import hash_ahead
from pipeline.progress import Event, Progress
from pipeline.render import hcl
from pipeline.render.hcl import dumps
from pipeline.render.packer import supports_plugins

if TYPE_CHECKING:
    from pipeline.host import HostFacts
    from pipeline.model import Image
    from pipeline.plan import BuildPlan
    from pipeline.render.hcl import Block

STEP_RE = re.compile(r"^(?:==>|-->) (?:[^\s:]+: )?(.*)$")
PREFIX_RE = re.compile(r"^\s*[a-z0-9_-]+\.[^\s:]+: ", re.MULTILINE)  # a build's name: `qemu.demo-x86_64: `
# Packer lines that are bookkeeping for people: our demo template boots a blank disk with
# iso_checksum "none" on purpose (AlmaLinux builds always pass a sha256), so Packer's warning
# about it is noise; the raw log (build.raw.log) keeps it.
NOISE = ("A checksum of 'none' was specified",)


def parse_machine_line(line: str) -> Event | None:
    """One `-machine-readable` line (`ts,target,type,data...`) → an Event (None: not for people).

    Never raises: a line that does not parse is shown as it is (as text, control characters made
    visible) and the build goes on. The event's text is always made visible here: it is what a
    guest or a tool printed. Packer's own `==> name: text` lines are kind "say" (progress inside
    imagepipe's `packer build` step), with the build name removed from every line; artifact lines
    stay "artifact" (kept for scripts in --json, never shown to people).
    """
    parts = line.split(",")
    ts_value = int_or_none(parts[0], hi=2**35) if len(parts) >= 3 else None  # a sane epoch second
    if ts_value is None:
        return Event("message", visible(line)) if line.strip() else None
    ts, target, kind = float(ts_value), visible(parts[1]), parts[2]
    raw = [_unescape(p) for p in parts[3:]]
    data = [visible(p) for p in raw]
    if kind == "ui" and len(raw) >= 2:
        # Packer's text may span lines (escaped \n): each line is made visible, the breaks kept
        level, text = data[0], ",".join(raw[1:]).strip()
        if not text or any(n in text for n in NOISE):
            return None
        step = STEP_RE.match(text)
        if step:
            text = step.group(1).strip()
        text = visible_lines(PREFIX_RE.sub("", text))
        kind_out = "error" if level == "error" else "say" if level == "say" else "message"
        return Event(kind_out, text, source=target or "packer", ts=ts) if text else None
    if kind == "artifact" and len(data) >= 2:
        return Event("artifact", " ".join(data[1:]), source=target, ts=ts, data=tuple(data))
    if kind == "error":
        return Event("error", ",".join(data), source=target, ts=ts)
    return None


def _unescape(s: str) -> str:
    return s.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")


def build_argv(template: Path, variables: Mapping[str, str], on_error: str = "cleanup") -> list[str]:
    """`packer build` with every variable as -var (secrets never go here: see PackerInputs)."""
    argv = ["packer", "build", "-machine-readable", "-force", f"-on-error={on_error}"]
    for name in sorted(variables):
        argv += ["-var", f"{name}={variables[name]}"]
    return argv + [str(template)]


def render_for(plan: BuildPlan, profile: PackerSource, stage: Path, packer_version: tuple[int, ...]) -> Path:
    """Write the template for the installed Packer into the staging folder.

    Serialising HCL (python-hcl2 and its lark grammar) costs ~0.5 s per build, more than the
    rest of imagepipe's own work around Packer, so the text is kept in a cache keyed by the
    template's data and the serialiser's code: the same blocks give the same text."""
    legacy = not supports_plugins(packer_version[:2])
    path = stage / "template.pkr.hcl"
    output_dir = plan.image_dir.parent
    text = cached_dumps(profile.blocks(plan.image, legacy), output_dir / ".cache" / "render", output_dir)
    path.write_text(text, encoding="utf-8")
    return path


def cached_dumps(blocks: list[Block], cache_dir: Path, output_dir: Path) -> str:
    """hcl.dumps(blocks), remembered in `cache_dir` (inside imagepipe's `output_dir`) under a key
    made of the blocks' data and the serialiser's code (pipeline.render.hcl, python-hcl2 and lark,
    by file size and mtime), so an upgrade of either renders afresh. The cache is only a
    speed-up: an entry that cannot be read or written is rendered (and written) again; it is
    never read or written through a link (fsutil's checks, as for every folder of ours)."""
    key = hashlib.sha256("\n".join([repr(blocks), *_serialiser_stamp()]).encode()).hexdigest()
    entry = cache_dir / f"{key[:32]}.pkr.hcl"
    try:
        with os.fdopen(open_nofollow(entry, os.O_RDONLY), encoding="utf-8") as cached:
            return cached.read()
    except (OSError, ValueError, UnsafePath):
        pass
    text = dumps(blocks)
    try:
        ensure_dir(cache_dir, output_dir)
        atomic_write(entry, text)
    except (OSError, UnsafePath):
        pass
    return text


def _serialiser_stamp() -> list[str]:
    """What decides dumps()' output besides the blocks: pipeline.render.hcl (size, mtime) and the
    installed python-hcl2 and lark (their package folder and dist-info names, which carry the
    version), found without importing them."""
    stamps = []
    here = os.stat(hcl.__file__)
    stamps.append(f"{hcl.__file__}:{here.st_size}:{here.st_mtime_ns}")
    for package, dist in (("hcl2", "python_hcl2-"), ("lark", "lark")):
        spec = find_spec(package)
        if spec is None or not spec.origin:
            continue
        folder = Path(spec.origin).parent
        try:
            infos = sorted(e.name for e in os.scandir(folder.parent)
                           if e.name.startswith(dist) and e.name.endswith((".dist-info", ".egg-info")))
            st = os.stat(spec.origin)
        except OSError:
            continue
        stamps.append(f"{spec.origin}:{st.st_size}:{st.st_mtime_ns}:{','.join(infos)}")
    return stamps


def host_variables(plan: BuildPlan, profile: PackerSource, stage: Path) -> dict[str, str]:
    """The variables every template declares, from the plan (host choices), and the ones the
    profile derives from the plan (e.g. AlmaLinux's ssh_timeout)."""
    return {
        "accelerator": plan.accel.accel.value,
        "cpu_model": plan.cpu_model,
        "output_dir": str(stage / "packer-out"),
        "console_log": str(plan.console_log),
        "ssh_private_key_file": str(plan.ssh_key),
        **profile.plan_variables(plan),
    }


def packer_env(plan: BuildPlan, prepared: Prepared) -> dict[str, str]:
    """Environment for packer: a shared ISO/plugin cache, and secrets as PKR_VAR_* (never argv)."""
    env = {"PACKER_CACHE_DIR": str(plan.image_dir.parent / ".cache" / "packer")}
    env.update({f"PKR_VAR_{k}": v for k, v in prepared.secret_env.items()})
    return env


class PackerDriver:
    """Packer's qemu builder, for a profile that renders the template and prepares its inputs."""

    name = "packer"
    tools: tuple[str, ...] = ("packer",)

    def __init__(self, profile: PackerSource) -> None:
        self.profile = profile

    def check(self, plan: BuildPlan, facts: HostFacts) -> None:
        """packer must be installed and report a version."""
        if not facts.tool("packer").found:
            raise ToolMissing(f"packer not found on PATH (needed to build {plan.image.name})", install_hint("packer"))
        if facts.version("packer") is None:
            raise BuildFailed("cannot read the installed Packer's version (`packer version`)",
                              "reinstall Packer, or check that `packer version` works")

    def steps(self, facts: HostFacts) -> list[str]:
        """The steps drive() announces, in order (the build shows them as N/M)."""
        ver = facts.version("packer") or (0,)
        return ["prepare inputs", *(["packer init"] if supports_plugins(ver[:2]) else []), "packer build"]

    def command(self, plan: BuildPlan, stage: Path, known: Mapping[str, str] | None = None) -> list[str]:
        """The build command; values prepared at build time come from `known` (the dry run
        resolves what it can without downloading) or show as placeholders."""
        known = known or {}
        variables = {**host_variables(plan, self.profile, stage),
                     **{v: known.get(v, f"<prepared at build time: {v}>")
                        for v in self.profile.prepared_variables(plan.image)}}
        return build_argv(stage / "template.pkr.hcl", variables)

    def template_text(self, image: Image, legacy: bool = False) -> str | None:
        """The template the profile renders (legacy=True: for Packer < 1.7; the committed file is
        legacy=False)."""
        return dumps(self.profile.blocks(image, legacy))

    def describe_failure(self, exc: CommandFailed) -> str:
        """Packer's own error lines, unwrapped from its machine-readable output."""
        errors = [_error_line(line) for line in exc.tail.splitlines() if "error" in line.lower()]
        detail = "; ".join(dict.fromkeys(e for e in errors if e))
        return f"packer exited {exc.returncode}" + (f": {detail}" if detail else "")

    def drive(self, plan: BuildPlan, facts: HostFacts, stage: Path, progress: Progress, *,
              on_error: str = "cleanup") -> Path:
        """Run the whole Packer build into `stage`; returns the image file inside `stage`."""
        ver = facts.version("packer") or (0,)
        progress.step_event("prepare inputs")
        prepared = self.profile.prepare(plan, stage, progress.report())

        hash_ahead(prepared.extra_files)  # published as they are: hashed while Packer works
        variables = {**host_variables(plan, self.profile, stage), **prepared.variables}
        template = render_for(plan, self.profile, stage, ver)
        if supports_plugins(ver[:2]):
            progress.step_event("packer init")
            run(["packer", "init", template], timeout=600, hint="packer init needs network once to fetch the qemu plugin")
        progress.step_event(f"packer build ({plan.accel.accel.value}, packer {'.'.join(map(str, ver))})")
        self._packer_build(plan, stage, progress, prepared, template, variables, on_error)
        produced = stage / "packer-out" / plan.artifact_name
        if not produced.exists():
            raise BuildFailed(f"packer finished but {produced} is missing", hint=f"see {plan.build_log}")
        final = stage / plan.artifact_name
        produced.rename(final)
        for leftover in ("packer-out", "inputs"):
            shutil.rmtree(stage / leftover, ignore_errors=True)
        return final


    def _packer_build(self, plan: BuildPlan, stage: Path, progress: Progress, prepared: Prepared, template: Path,
                      variables: Mapping[str, str], on_error: str) -> None:
        """`packer build`, its VM's QMP socket watched: a write that finds the host's disk full
        stops the build at once (Packer would otherwise wait for SSH until its ssh_timeout) and
        fails it with the same "ran out of disk space" as every other step."""
        socket_dir = short_socket_dir()
        groups: list[int] = []

        def stop_packer(device: str) -> None:
            progress.log_only(f"imagepipe: QEMU says the host's disk is full (BLOCK_IO_ERROR on {device}): "
                              "stopping packer")
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGINT)  # Packer's own cleanup stops its QEMU

        argv = build_argv(template, {**variables, "qmp_socket": str(socket_dir / "qmp.sock")}, on_error)
        try:
            with DiskFullWatch(socket_dir / "qmp.sock", stop_packer) as watch, tool_groups(groups.append):
                try:
                    stream(argv, on_line=lambda line: _emit(progress, line), cwd=stage, env=packer_env(plan, prepared),
                           log_path=plan.raw_log, hint=f"build log: {plan.build_log}; serial console: {plan.console_log}")
                except CommandFailed:
                    if watch.full is None:
                        raise
            if watch.full is not None:
                raise StorageError(f"the build VM ran out of disk space writing {stage} ({free_space(stage)})",
                                   f"free some space (invoke gc removes old builds) or move defaults.output_dir; "
                                   f"full log: {plan.build_log}")
        finally:
            shutil.rmtree(socket_dir, ignore_errors=True)


def _error_line(line: str) -> str:
    """An error line's text; Packer machine-readable lines unwrapped."""
    ev = parse_machine_line(line)
    return ev.message.replace("\n", " ").strip(" =>-") if ev else ""


def _emit(progress: Progress, line: str) -> None:
    ev = parse_machine_line(line)
    if ev is not None:
        progress.emit(ev)
