"""`invoke build IMAGE --dry-run`: what a build would do, read before committing to hours of work.

In the spirit of `mkosi summary`: the image, its distro, arch and accelerator (and why), the
firmware and CPU model, the template and the distro's own inputs (the kickstart, the resolved
ISO with URL and sha256 - from iso.lock.json or the configured `iso:`, never downloaded), the
tools found and missing, the steps, where the result and the logs go, the exact command, and a
loud note when the build will run under TCG. Every problem that would stop a real build (a
missing tool, no firmware, a foreign arch) is listed, and the first one - in the order a real
build meets them - decides the exit code.

Nothing here writes: no SSH key is created, no tool-version cache is updated, nothing is
locked, probed twice or downloaded. `summarize` returns a `Summary` (as_json: one object);
`format_text` is what people read on stdout.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import distros, inputs
from pipeline.base.errors import ImagepipeError, ToolMissing
from pipeline.base.run import install_hint
from pipeline.host import HostFacts
from pipeline.keys import KEY_NAME
from pipeline.model import Accel, Config, Image
from pipeline.output import artifacts
from pipeline.plan import (
    AccelChoice,
    choose_accel,
    cpu_level_problem,
    firmware_for,
    make_build_plan,
)

if TYPE_CHECKING:
    from pipeline.builders.remote import Target
    from pipeline.drivers import Driver

BUILD_ID = "<build-id>"  # decided when a real build starts


@dataclass(frozen=True)
class Problem:
    """Something that stops a real build: the message, how to fix it, the exit code."""

    message: str
    hint: str | None
    exit_code: int
    exc: ImagepipeError | None = field(default=None, compare=False)

    @classmethod
    def of(cls, exc: ImagepipeError) -> Problem:
        return cls(exc.message, exc.hint, exc.exit_code, exc)

    def error(self) -> ImagepipeError:
        """The error a real build would have raised (same type, message and exit code)."""
        if self.exc is not None:
            return self.exc
        err = ImagepipeError(self.message, self.hint)
        err.exit_code = self.exit_code
        return err


@dataclass
class Summary:
    """Everything the dry run found out (see the module docstring)."""

    image: Image
    host: str
    accelerator: dict[str, Any]
    cpu_model: str | None
    firmware: dict[str, Any]
    engine: str
    template: str
    distro: dict[str, Any]
    tools: list[dict[str, Any]]
    steps: list[str]
    input_hash: str
    up_to_date: str | None
    outputs: dict[str, str]
    ssh_key: dict[str, Any]
    command: list[str] | None
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return self.problems[0].exit_code if self.problems else 0

    def as_json(self) -> dict[str, Any]:
        img = self.image
        return {
            "image": img.name, "distro": img.distro, "version": img.version, "arch": img.arch.value,
            "format": img.format.value, "host": self.host, "accelerator": self.accelerator,
            "cpu_model": self.cpu_model, "firmware": self.firmware, "engine": self.engine,
            "template": self.template, **self.distro, "tools": self.tools, "steps": self.steps,
            "input_hash": self.input_hash, "up_to_date": self.up_to_date, "outputs": self.outputs,
            "ssh_key": self.ssh_key, "command": self.command, "warnings": self.warnings,
            "problems": [{"message": p.message, "hint": p.hint, "exit_code": p.exit_code} for p in self.problems],
            "ok": self.ok, "exit_code": self.exit_code,
        }


def summarize(cfg: Config, image: Image, facts: HostFacts, *, accel: Accel = Accel.AUTO,
              boot_test: bool = False, builder: Target | None = None,
              accept_new_host_key: bool = False) -> Summary:
    """The dry run of building `image` here with these facts (pure but for reading files), or
    through the engine's own remote builds (`builder`, or nix's configured builders)."""
    profile = distros.profile(image)
    driver = profile.driver
    problems: list[Problem] = []
    route = None
    try:
        route = profile.engine_route(image, facts, cfg, builder, accept_new_host_key)
    except ImagepipeError as exc:
        problems.append(Problem.of(exc))
    if route is None and (unfit := profile.host_problem(image, facts, cfg)) is not None:
        problems.append(Problem.of(unfit))
    # a foreign arch is refused under `auto` only where a whole build would be emulated (as the plan does)
    choice = _accel(accel, facts, image, problems, purpose="build" if profile.build_vm and not route else "run")
    cpu_model, cpu_fits = None, True
    if choice is not None:  # a variant may ask for a named model (Nehalem); the guest's level must fit it
        cpu_model = profile.cpu_model(image, choice.accel)
        # no build VM runs here when the engine builds elsewhere: the CPU level is the builder's business
        cpu_fits = route is not None or _cpu_level(image, profile.cpu_level(image), cpu_model, choice, facts, problems)
    # without a build VM, only a boot test needs the firmware (and it refuses on its own)
    firmware = _firmware(image, facts, problems if profile.build_vm else [])
    tools = _tools(image, facts, problems)
    facts_of_distro = profile.summary(image, cfg.root, cfg.output_dir)
    for extra in facts_of_distro.pop("problems", []):
        problems.append(Problem(extra["message"], extra.get("hint"), int(extra.get("exit_code", 1))))
    known = facts_of_distro.pop("variables", {})
    notes = list(facts_of_distro.pop("notes", []))
    key = _ssh_key(cfg, problems)
    plan = None
    if choice is not None and cpu_fits and not firmware.get("error"):
        plan = make_build_plan(cfg, image, profile, facts, accel, Path(key["path"]), build_id=BUILD_ID, route=route)
    command = driver.command(plan, plan.staging, known) if plan is not None else None
    image_dir = cfg.output_dir / image.name
    log_dir = image_dir / "logs" / BUILD_ID
    versions = {t: facts.tool(t).version for t in inputs.tools_for(image)}
    try:  # a profile's pins may need the network (Debian's Release files): a failure is the first problem
        ihash = inputs.compute(cfg, image, versions).value
    except ImagepipeError as exc:
        problems.insert(0, Problem.of(exc))
        ihash = ""
    steps = step_names(driver, image, facts, boot_test)
    announced = (profile.announce(plan, facts) or "") if plan is not None else ""
    notes += [line.removeprefix("warning: ") for line in announced.splitlines() if line.startswith("warning:")]
    if route is not None:
        notes.insert(0, f"{driver.name} builds it on {route.where}; the image is copied back, verified and published here")
    warnings = notes + _warnings(choice, image, facts)
    return Summary(
        image=image, host=f"{facts.os} {facts.machine}",
        accelerator=_accel_json(accel, choice, problems), cpu_model=cpu_model,
        firmware=firmware, engine=driver.name, template=str(profile.template(cfg.root, image)),
        distro=facts_of_distro, tools=tools, steps=steps, input_hash=ihash,
        up_to_date=inputs.up_to_date(image_dir, ihash),
        outputs={"publishes": ", ".join(str(image_dir / artifacts.format_file(distros.artifact_name(image), f.value))
                                        for f in image.formats),
                 "staging": str(image_dir / ".staging" / BUILD_ID),
                 "build_log": str(log_dir / "build.log"), "raw_log": str(log_dir / "build.raw.log"),
                 "console_log": str(log_dir / "console.log")},
        ssh_key=key, command=command, warnings=warnings, problems=problems,
    )


def _accel(requested: Accel, facts: HostFacts, image: Image, problems: list[Problem],
           purpose: str = "build") -> AccelChoice | None:
    try:
        return choose_accel(requested, facts, image.arch, purpose=purpose)
    except ImagepipeError as exc:
        if not any(p.message == exc.message for p in problems):
            problems.append(Problem.of(exc))
        return None


def _cpu_level(image: Image, need: int | None, cpu_model: str, choice: AccelChoice, facts: HostFacts,
               problems: list[Problem]) -> bool:
    """False (and the problem listed) when the guest needs a higher x86-64 level than the build VM gets."""
    problem = cpu_level_problem(image, need, cpu_model, choice, facts)
    if problem is not None:
        problems.append(Problem.of(problem))
    return problem is None


def _accel_json(requested: Accel, choice: AccelChoice | None, problems: list[Problem]) -> dict[str, Any]:
    if choice is None:
        return {"requested": requested.value, "name": None, "reason": problems[-1].message if problems else ""}
    return {"requested": requested.value, "name": choice.accel.value, "reason": choice.reason,
            "fallback": choice.fallback}


def _firmware(image: Image, facts: HostFacts, problems: list[Problem]) -> dict[str, Any]:
    try:
        fw = firmware_for(image, facts)
    except ImagepipeError as exc:
        problems.append(Problem.of(exc))
        return {"mode": image.firmware.value, "error": exc.message}
    if fw is None:
        return {"mode": image.firmware.value}
    return {"mode": image.firmware.value, "code": fw.code, "vars": fw.vars, "source": fw.source}


def _tools(image: Image, facts: HostFacts, problems: list[Problem]) -> list[dict[str, Any]]:
    """Every tool the build runs, found or not; the missing ones are one problem (exit 127)."""
    profile = distros.profile(image)
    need = {tool: f"{profile.driver.name}" for tool in profile.driver.tools}
    need.update(profile.needed_tools(image, facts))
    rows: list[dict[str, Any]] = [{"name": t, "found": facts.tool(t).found, "version": facts.tool(t).version,
                                   "why": why} for t, why in sorted(need.items())]
    missing = {t: why for t, why in sorted(need.items()) if not facts.tool(t).found}
    if missing:
        err = ToolMissing("; ".join(f"{t} not found on PATH (needed for {why})" for t, why in missing.items()),
                          "; ".join(install_hint(t) for t in missing))
        problems.append(Problem.of(err))
    return rows


def _ssh_key(cfg: Config, problems: list[Problem]) -> dict[str, Any]:
    """The key the build logs in with; the dry run never creates it (a real build does)."""
    if cfg.defaults.ssh_key:
        path = Path(cfg.defaults.ssh_key).expanduser()
        if not path.exists():
            problems.append(Problem(f"defaults.ssh_key: {path} does not exist", "point it at a private key", 2))
        return {"path": str(path), "exists": path.exists(), "configured": True}
    path = cfg.output_dir / ".keys" / KEY_NAME
    return {"path": str(path), "exists": path.exists(), "configured": False}


def step_names(driver: Driver, image: Image, facts: HostFacts, boot_test: bool) -> list[str]:
    """A build's steps in order, as its progress view counts them (N/M) and the dry run lists
    them: the engine's own, verify, [boot test], a conversion per further format, the package
    list and SBOM, publish (pipeline.build.produce announces each)."""
    formats = [f"convert to {f.value}" for f in image.formats[1:]]
    return [*driver.steps(facts), "verify", *(["boot test"] if boot_test else []), *formats, "package list and SBOM", "publish"]


def _warnings(choice: AccelChoice | None, image: Image, facts: HostFacts) -> list[str]:
    """The loud note for a build under TCG: how much slower, how long for this distro, and where
    it would be fast."""
    profile = distros.profile(image)
    if choice is None or choice.accel is not Accel.TCG or not profile.build_vm:
        return []
    how_long = f" {profile.tcg_duration}." if profile.tcg_duration else ""
    note = (f"TCG: no hardware acceleration ({choice.reason}). Every guest instruction is emulated, "
            f"10-20x slower than KVM.{how_long} A Linux builder with KVM does it in minutes: "
            f"invoke remote-sync-build HOST --image {image.name}")
    return [note]


# ------------------------------------------------------------------------------------- text


def format_text(s: Summary) -> str:
    """The summary as people read it (stdout)."""
    img = s.image
    out = [f"{img.name}: dry run - nothing was built, written or downloaded", ""]
    accel = s.accelerator
    accel_line = f"{accel['name']} ({accel['reason']})" if accel.get("name") else f"none: {accel['reason']}"
    _section(out, "image", [
        ("image", img.name), ("distro", f"{distros.profile(img).title or img.distro} {img.version}"),
        ("arch", img.arch.value),
        ("format", (f"{img.format.value}, {img.disk_size} MiB disk, {img.memory} MiB RAM, "
                    f"{img.cpus} CPU{'s' if img.cpus != 1 else ''}")),
    ])
    fw = s.firmware
    fw_line = (f"{fw['mode']}: {fw['code']}" + (f" (vars {fw['vars']})" if fw.get("vars") else "")
               if fw.get("code") else f"{fw['mode']}: {fw['error']}" if fw.get("error")
               else f"{fw['mode']} (no UEFI firmware needed)")
    _section(out, "host", [("host", s.host), ("accelerator", accel_line), ("cpu model", s.cpu_model or "-"),
                           ("firmware", fw_line)])
    _section(out, "inputs", [("engine", s.engine), ("template", s.template), *_distro_rows(s.distro),
                             ("input hash", s.input_hash), ("published", s.up_to_date or "not with these inputs")])
    tool_rows = [(t["name"], (t["version"] or "found") if t["found"] else f"MISSING ({t['why']})") for t in s.tools]
    _section(out, "tools", tool_rows)
    key = s.ssh_key
    _section(out, "build", [
        ("steps", " -> ".join(s.steps)), ("publishes", s.outputs["publishes"]),
        ("logs", f"{s.outputs['build_log']} (+ build.raw.log, console.log)"),
        ("ssh key", key["path"] + ("" if key["exists"] else " (created by the first build)")),
    ])
    if s.command:
        out += ["  command", "    " + shlex.join(s.command), ""]
    for warning in s.warnings:
        out.append(f"  !! {warning}")
    if s.warnings:
        out.append("")
    if s.problems:
        out.append("  a real build could not start:")
        for p in s.problems:
            out.append(f"    x {p.message}")
            if p.hint:
                out += [f"      {line}" for line in p.hint.splitlines()]
    else:
        out.append(f"  ready: invoke build {img.name}")
    return "\n".join(out)


def _section(out: list[str], title: str, rows: list[tuple[str, str]]) -> None:
    out.append(f"  {title}")
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        lines = str(value).splitlines() or [""]
        out.append(f"    {key:>{width}}  {lines[0]}")
        out += [f"    {'':>{width}}  {line}" for line in lines[1:]]
    out.append("")


def _distro_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The distro's own facts: plain values as they are, nested ones (the ISO) as lines."""
    rows = []
    for key, value in facts.items():
        if isinstance(value, dict):
            lines = [str(value.get("summary") or "")] if value.get("summary") else []
            lines += [f"{k}: {v}" for k, v in value.items() if k != "summary" and v not in (None, "")]
            rows.append((key, "\n".join(lines)))
        elif value not in (None, ""):
            rows.append((key, str(value)))
    return rows
