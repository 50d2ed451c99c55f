"""One image build as named steps: probe → plan → prepare+drive → verify → [boot test] → publish.

Every step is announced on the progress view. Whatever happens after staging starts (a tool
failure, a failed check, Ctrl-C, SIGTERM), the staging folder is removed and the published
image is left exactly as it was; the build's logs stay under output/<image>/logs/<id>/.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__, artifacts, keys
from pipeline.config import Accel, Config, Distro, Image
from pipeline.host import HostFacts, existing_parent, probe
from pipeline.plan import BuildPlan, make_build_plan
from pipeline.progress import Event, Progress
from pipeline.run import interrupt_guard


@dataclass(frozen=True)
class BuildOptions:
    accel: Accel = Accel.AUTO
    on_error: str = "cleanup"      # passed to packer: cleanup | abort
    dry_run: bool = False
    boot_test: bool = False
    json: bool = False


@dataclass(frozen=True)
class BuildResult:
    image: str
    build_id: str
    build_dir: Path | None         # None for a dry run
    manifest: dict[str, Any] | None


def probe_for_build(cfg: Config) -> HostFacts:
    """Local host facts (output dir's free disk included)."""
    return probe(disk_path=str(existing_parent(cfg.output_dir)))


def build_image(
    cfg: Config, image: Image, opts: BuildOptions, *, facts: HostFacts | None = None,
    progress: Progress | None = None, say: Callable[[str], None] = print,
) -> BuildResult:
    """Build `image` on this host and publish it; raises an ImagepipeError on any failure."""
    facts = facts or probe_for_build(cfg)
    driver = _driver(image)
    if hasattr(driver, "check_can_build"):
        driver.check_can_build(image, facts, cfg)
    key = keys.project_key(cfg.output_dir, cfg.defaults.ssh_key)
    plan = make_build_plan(cfg, image, facts, opts.accel, key)
    if image.distro.builder == "packer":
        say(f"{image.name}: accelerator {plan.accel.accel.value} ({plan.accel.reason})")
    elif facts.os == "linux" and not facts.kvm.usable:
        say(f"{image.name}: warning: make-disk-image.nix runs its own VM and KVM is not usable here "
            f"({facts.kvm.why_not()}): expect it to crawl; prefer a builder with working KVM")
    if opts.dry_run:
        _print_plan(plan, say)
        return BuildResult(image.name, plan.build_id, None, None)
    progress = progress or Progress(image.name, json_lines=opts.json)
    with interrupt_guard(), progress, _staging(plan) as stage:
        started = time.time()
        produced = driver.drive(plan, stage, progress, on_error=opts.on_error)
        progress.step_event("verify (qemu-img check, sha256)")
        verified = artifacts.verify(produced, image.format.value)
        if opts.boot_test:
            progress.step_event("boot test")
            _boot_test(cfg, plan, produced, opts)
        progress.step_event("publish")
        manifest = _manifest(plan, facts, verified, stage, started)
        sums = {verified.file: verified.sha256, **manifest["inputs"]}
        artifacts.write_build_files(stage, manifest, sums)
        final = artifacts.publish(stage, plan.image_dir, plan.build_id, image.artifact_name)
        progress.emit(Event("done", f"published {plan.image_dir / image.artifact_name} "
                                    f"({verified.size / 1e6:.1f} MB, sha256 {verified.sha256[:12]}…)"))
    return BuildResult(image.name, plan.build_id, final, manifest)


def _driver(image: Image) -> Any:
    if image.distro.builder == "nix":
        from pipeline.drivers import nix

        return nix
    from pipeline.drivers import packer

    return packer


@contextlib.contextmanager
def _staging(plan: BuildPlan) -> Iterator[Path]:
    """The staging folder; removed on any failure or interrupt (publish moves it away on success)."""
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    plan.staging.mkdir(parents=True)
    try:
        yield plan.staging
    except BaseException:
        artifacts.discard(plan.staging)
        raise
    artifacts.discard(plan.staging)  # already moved into builds/ when publish succeeded


def _boot_test(cfg: Config, plan: BuildPlan, produced: Path, opts: BuildOptions) -> None:
    from pipeline import vm

    boot = _boot_info(plan.image)
    if boot:
        boot = {k: str(plan.staging / v) if k in ("kernel", "initrd") else v for k, v in boot.items()}
    vm.boot_test(cfg, plan.image, produced, boot, cfg.output_dir, opts.accel)


def _boot_info(image: Image) -> dict[str, str] | None:
    if image.distro is Distro.DEMO:
        from pipeline.render import demo

        return demo.boot_info(image)
    return None


def _manifest(plan: BuildPlan, facts: HostFacts, v: artifacts.Verified, stage: Path, started: float) -> dict[str, Any]:
    """What was built, where, how and from what — never a secret."""
    image = plan.image
    finished = time.time()
    inputs = {p.name: artifacts.sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file() and p.name != v.file}
    manifest: dict[str, Any] = {
        "image": image.name,
        "build_id": plan.build_id,
        "distro": image.distro.value,
        "version": image.version,
        "arch": image.arch.value,
        "started": _iso(started),
        "finished": _iso(finished),
        "duration_s": round(finished - started, 1),
        "host": {"name": socket.gethostname(), "os": facts.os, "machine": facts.machine, "where": "local"},
        "accelerator": {"name": plan.accel.accel.value, "reason": plan.accel.reason},
        "tools": {n: t.version for n, t in sorted(facts.tools.items()) if t.found},
        "imagepipe": __version__,
        "inputs": inputs,
        "artifact": {"file": v.file, "format": v.format, "size": v.size,
                     "virtual_size": v.virtual_size, "sha256": v.sha256},
    }
    boot = _boot_info(image)
    if boot:
        manifest["boot"] = boot
    if image.distro is Distro.NIXOS:
        from pipeline.drivers import nix

        manifest["nixpkgs"] = nix.plan_nixpkgs_revision(plan)  # None until nixos/flake.lock exists
    return manifest


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _print_plan(plan: BuildPlan, say: Callable[[str], None]) -> None:
    """--dry-run: the plan and the exact command, with prepared inputs named."""
    image = plan.image
    say(f"plan for {image.name} (build {plan.build_id}):")
    for label, value in (
        ("distro", f"{image.distro.value} {image.version} {image.arch.value}"),
        ("accelerator", f"{plan.accel.accel.value}: {plan.accel.reason}"),
        ("cpu model", plan.cpu_model),
        ("firmware", plan.firmware.code if plan.firmware else "BIOS / direct kernel boot"),
        ("template", str(plan.template)),
        ("staging", str(plan.staging)),
        ("publishes", str(plan.image_dir / image.artifact_name)),
        ("logs", str(plan.log_dir)),
    ):
        say(f"  {label:12} {value}")
    if image.distro.builder == "packer":
        from pipeline.drivers import packer

        variables = {**packer.host_variables(plan, plan.staging), **{
            v: f"<prepared at build time: {v}>" for v in _distro_variables(image)}}
        say("  command      " + shlex.join(packer.build_argv(plan.staging / "template.pkr.hcl", variables)))
    else:
        from pipeline.drivers import nix

        say("  command      " + shlex.join(nix.build_argv(plan, plan.staging)))


def _distro_variables(image: Image) -> list[str]:
    from pipeline.render.packer import COMMON_VARIABLES, renderer

    blocks = renderer(image).blocks(image, False)
    return [b.labels[0] for b in blocks if b.type == "variable" and b.labels[0] not in COMMON_VARIABLES
            and "default" not in b.body]
