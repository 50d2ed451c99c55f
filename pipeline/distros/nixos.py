"""NixOS: `nix build` of the project's flake (nixos/), which calls nixpkgs' make-disk-image.nix.

The flake is hand-written; each image's parameters are rendered into nixos/params/<image>.json
(pipeline.render.nix). make-disk-image.nix builds the disk inside a Linux VM of the image's
architecture, so only a Linux host of that arch can build it here; anything else gets a hint
naming the remote task and the configured builders that fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, Image
from pipeline.distros import Profile, Report
from pipeline.errors import HostUnsuitable

if TYPE_CHECKING:
    from pipeline.drivers.nix import NixDriver
    from pipeline.host import HostFacts
    from pipeline.packages import Package
    from pipeline.plan import BuildPlan


class NixOS(Profile):
    name = "nixos"
    title = "NixOS"
    tcg_duration = "make-disk-image's VM crawls without KVM: hours"

    @property
    def driver(self) -> NixDriver:
        from pipeline.drivers.nix import NixDriver

        return NixDriver()

    def family(self, image: Image) -> str:
        return "nixos"

    def artifact_name(self, image: Image) -> str:
        """make-disk-image's own name (nixos.qcow2): people who know NixOS images expect it."""
        return f"nixos.{image.format.value}"

    def flake_dir(self, root: Path, image: Image) -> Path:
        """The image's flake folder: `flake:` when it is a local path, else the project's nixos/."""
        from pipeline.drivers.nix import flake_dir

        return flake_dir(image, root) or root / "nixos"

    def template(self, root: Path, image: Image) -> Path:
        return self.flake_dir(root, image) / "flake.nix"

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        from pipeline.render import nix

        return nix.files(image, root, source)

    def input_files(self, root: Path, image: Image) -> list[Path]:
        """flake.nix, flake.lock (the nixpkgs pin), the image's params and every module."""
        flake = self.flake_dir(root, image)
        modules = flake / "modules"
        tree = [p for p in modules.rglob("*") if p.is_file()] if modules.is_dir() else []
        return [flake / "flake.nix", flake / "flake.lock", flake / "params" / f"{image.name}.json", *tree]

    def hash_tools(self, image: Image) -> list[str]:
        return ["nix"]  # make-disk-image's QEMU comes from nixpkgs, not from the host

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        return {"nix": f"building {image.name}", "qemu-img": "verifying images"}

    def host_problem(self, image: Image, facts: HostFacts, cfg: Config) -> HostUnsuitable | None:
        problem = build_host_problem(image, facts)
        return HostUnsuitable(problem, remote_hint(image, cfg)) if problem else None

    def announce(self, plan: BuildPlan, facts: HostFacts) -> str | None:
        """Warnings about nix's `kvm` feature; make-disk-image's VM crawls without KVM."""
        from pipeline.drivers.nix import kvm_warnings

        warnings = kvm_warnings(facts.nix_config, facts)
        return "\n".join(f"warning: {w}" for w in warnings) or None

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """The flake output that is built and the nixpkgs it is pinned to."""
        from pipeline.drivers.nix import installable, nixpkgs_revision

        flake = self.flake_dir(root, image)
        lock = flake / "flake.lock"
        pinned = (f"nixpkgs {nixpkgs_revision(flake) or '?'} ({lock})" if lock.is_file() else
                  f"NOT PINNED: no {lock} (nix resolves nixpkgs when the build starts; "
                  "run `nix flake lock` there and commit it)")
        return {"flake output": installable(image, root), "nixpkgs": pinned}

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """The runtime closure of the image's system (store paths, names, versions)."""
        from pipeline.drivers.nix import closure_packages

        return closure_packages(plan.image, plan.root, report)

    def manifest_extra(self, plan: BuildPlan) -> dict[str, Any]:
        from pipeline.drivers.nix import nixpkgs_revision

        # None until the flake has a flake.lock
        return {"nixpkgs": nixpkgs_revision(self.flake_dir(plan.root, plan.image))}


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


PROFILE = NixOS()
