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


# The build VM's QMP socket, where imagepipe watches for a write that found the host's disk full
# (pipeline.vm.qmp.DiskFullWatch); a plain `packer build` gets one in its working folder.
QMP_VARIABLE = ("qmp_socket", "QMP socket of the build VM (imagepipe watches it for a full host disk)",
                "packer-qmp.sock")
# qemuargs every template adds: the QMP socket, and a full host disk handed to the guest as an
# I/O error (werror=report) instead of QEMU's default, a paused guest that Packer would wait on
# until its ssh_timeout. A qemuargs key of Packer's own (-drive) would replace all of Packer's
# disks, so the disk's property is set with -global.
WATCH_ARGS = [["-qmp", "unix:${var.qmp_socket},server=on,wait=off"], ["-global", "virtio-blk-pci.werror=report"]]


def common_variables() -> list[Block]:
    return [variable(n, d) for n, d in COMMON_VARIABLES.items()] + [variable(*QMP_VARIABLE)]


def supports_plugins(version: tuple[int, ...] | None) -> bool:
    """True when this Packer knows required_plugins and `packer init` (>= 1.7)."""
    return version is not None and version >= PLUGINS_SINCE
