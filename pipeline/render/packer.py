"""Packer templates: the variables every template declares, and the shared building blocks.

A Packer-built distro's profile (pipeline.distros.PackerProfile) returns its template as
`blocks(image, legacy)`: legacy=True renders for Packer < 1.7 (no `packer { required_plugins }`
block; only arguments Packer 1.6.6's qemu builder accepts); the committed file under packer/ is
the legacy=False rendering. Its templates live beside this module (demo.py, almalinux.py).

Host choices (accelerator, CPU model, firmware, ISO, output dir, keys) are variables declared
here and supplied at build time, so committed templates stay host-independent and secret-free.
"""

from __future__ import annotations

from pipeline.render.hcl import Block, Expr

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


def supports_plugins(version: tuple[int, ...] | None) -> bool:
    """True when this Packer knows required_plugins and `packer init` (>= 1.7)."""
    return version is not None and version >= PLUGINS_SINCE
