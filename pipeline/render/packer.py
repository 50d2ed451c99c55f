"""Packer templates: the shared variables and the per-distro renderer contract.

Each Packer-built distro has a module `pipeline.render.<distro>` (demo, almalinux) with:

    blocks(image: Image, legacy: bool) -> list[Block]
        The whole template. legacy=True renders for Packer < 1.7 (no `packer { required_plugins }`
        block; only arguments Packer 1.6.6's qemu builder accepts). The committed file under
        packer/ is the legacy=False rendering.
    prepare(plan: BuildPlan, stage: Path) -> PackerInputs
        Host-side preparation for one build (downloads, blank disks, ISO resolution) and the
        values of the host-specific variables.

Host choices (accelerator, CPU model, firmware, ISO, output dir, keys) are variables declared
here and supplied at build time, so committed templates stay host-independent and secret-free.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from pipeline.config import Image
from pipeline.render.hcl import Block, Expr, dumps

QEMU_PLUGIN = {"source": "github.com/hashicorp/qemu", "version": ">= 1.1.0"}
PLUGINS_SINCE = (1, 7)  # first Packer that understands required_plugins / packer init

# name -> description; every template declares these, the driver always sets them.
COMMON_VARIABLES: dict[str, str] = {
    "accelerator": "QEMU accelerator chosen by imagepipe for this host (kvm, hvf or tcg); always set",
    "cpu_model": "QEMU CPU model: host with KVM/HVF, max with TCG",
    "output_dir": "where Packer writes the image (a staging folder; imagepipe publishes it after verification)",
    "console_log": "file receiving the guest's serial console (kept outside output_dir, survives failures)",
    "ssh_private_key_file": "private key the build logs in with",
}


@dataclass(frozen=True)
class PackerInputs:
    """Values for one build: `variables` go on the command line (logged); `secret_env` goes
    into the environment as PKR_VAR_<name> and is never logged."""

    variables: dict[str, str]
    secret_env: dict[str, str] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()  # staged files published next to the image (kernel, ...)


def packer_block() -> Block:
    return Block("packer", body={"required_plugins": Block("required_plugins", body={"qemu": dict(QEMU_PLUGIN)})})


def variable(name: str, description: str, default: str | None = None, sensitive: bool = False) -> Block:
    body: dict[str, object] = {"type": Expr("string"), "description": description}
    if default is not None:
        body["default"] = default
    if sensitive:
        body["sensitive"] = True
    return Block("variable", (name,), body)


def common_variables() -> list[Block]:
    return [variable(n, d) for n, d in COMMON_VARIABLES.items()]


def renderer(image: Image) -> ModuleType:
    """The module that renders templates for this image's distro."""
    return importlib.import_module(f"pipeline.render.{image.distro.value}")


def render_text(image: Image, legacy: bool = False) -> str:
    """The template text (legacy=False is what gets committed under packer/)."""
    return dumps(renderer(image).blocks(image, legacy))


def supports_plugins(version: tuple[int, int] | None) -> bool:
    """True when this Packer knows required_plugins and `packer init` (>= 1.7)."""
    return version is not None and version >= PLUGINS_SINCE
