"""The Packer driver: version detection, init/validate/build, machine-readable output → events.

The committed template targets current Packer; for the build the driver renders the same data
for the installed version (no `required_plugins` before 1.7) into the staging folder, runs
`packer init` only where Packer knows it, and always passes the accelerator it probed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.errors import BuildFailed
from pipeline.plan import BuildPlan
from pipeline.progress import Event, Progress
from pipeline.render.hcl import dumps
from pipeline.render.packer import PackerInputs, renderer, supports_plugins
from pipeline.run import run, stream

STEP_RE = re.compile(r"^==> [^:]+: (.*)$")


def version() -> tuple[int, int, int]:
    """The installed Packer's version, e.g. (1, 6, 6)."""
    out = run(["packer", "version"]).stdout
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise BuildFailed(f"cannot read the Packer version from: {out.strip()[:80]!r}")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def parse_machine_line(line: str) -> Event | None:
    """One `-machine-readable` line (`ts,target,type,data...`) → an Event (None: not for people)."""
    parts = line.split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return Event("message", line) if line.strip() else None
    ts, target, kind, data = float(parts[0]), parts[1], parts[2], [_unescape(p) for p in parts[3:]]
    if kind == "ui" and len(data) >= 2:
        level, text = data[0], ",".join(data[1:]).rstrip()
        step = STEP_RE.match(text.strip())
        if step and level == "say":
            return Event("step", step.group(1), source=target or "packer", ts=ts)
        kind_out = "error" if level == "error" else "say" if level == "say" else "message"
        text = re.sub(r"^\s*[^:\s]+: ", "", text.strip()) if level == "message" else text.strip()
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


def render_for(plan: BuildPlan, stage: Path, packer_version: tuple[int, int, int]) -> Path:
    """Write the template for the installed Packer into the staging folder."""
    legacy = not supports_plugins(packer_version[:2])
    path = stage / "template.pkr.hcl"
    path.write_text(dumps(renderer(plan.image).blocks(plan.image, legacy)), encoding="utf-8")
    return path


def host_variables(plan: BuildPlan, stage: Path) -> dict[str, str]:
    """The variables every template declares, from the plan (host choices)."""
    return {
        "accelerator": plan.accel.accel.value,
        "cpu_model": plan.cpu_model,
        "output_dir": str(stage / "packer-out"),
        "console_log": str(plan.console_log),
        "ssh_private_key_file": str(plan.ssh_key),
    }


def packer_env(plan: BuildPlan, inputs: PackerInputs) -> dict[str, str]:
    """Environment for packer: a shared ISO/plugin cache, and secrets as PKR_VAR_* (never argv)."""
    env = {"PACKER_CACHE_DIR": str(plan.image_dir.parent / ".cache" / "packer")}
    env.update({f"PKR_VAR_{k}": v for k, v in inputs.secret_env.items()})
    return env


def prepare(plan: BuildPlan, stage: Path) -> tuple[PackerInputs, dict[str, str]]:
    """Distro-specific preparation plus the host variables: (inputs, all -var values)."""
    inputs: PackerInputs = renderer(plan.image).prepare(plan, stage)
    return inputs, {**host_variables(plan, stage), **inputs.variables}


def drive(
    plan: BuildPlan, stage: Path, progress: Progress, *, on_error: str = "cleanup",
    on_argv: Callable[[list[str]], None] | None = None,
) -> Path:
    """Run the whole Packer build into `stage`; returns the image file inside `stage`."""
    ver = version()
    inputs, variables = prepare(plan, stage)
    template = render_for(plan, stage, ver)
    if supports_plugins(ver[:2]):
        progress.step_event("packer init")
        run(["packer", "init", template], timeout=600, hint="packer init needs network once to fetch the qemu plugin")
    argv = build_argv(template, variables, on_error)
    if on_argv:
        on_argv(argv)
    progress.step_event(f"packer build ({plan.accel.accel.value}, packer {'.'.join(map(str, ver))})")
    stream(argv, on_line=lambda line: _emit(progress, line), cwd=stage, env=packer_env(plan, inputs),
           log_path=plan.build_log, hint=f"full log: {plan.build_log}; serial console: {plan.console_log}")
    produced = stage / "packer-out" / plan.image.artifact_name
    if not produced.exists():
        raise BuildFailed(f"packer finished but {produced} is missing", hint=f"see {plan.build_log}")
    final = stage / plan.image.artifact_name
    produced.rename(final)
    for leftover in ("packer-out", "inputs"):
        shutil.rmtree(stage / leftover, ignore_errors=True)
    return final


def _emit(progress: Progress, line: str) -> None:
    ev = parse_machine_line(line)
    if ev is not None:
        progress.emit(ev)
