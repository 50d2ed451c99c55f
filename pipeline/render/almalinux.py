"""AlmaLinux templates: one Packer source per image, rendered from config (never copied per arch).

x86_64: q35, UEFI (OVMF) by default or BIOS, the installer reached by editing the default GRUB
entry and appending the kickstart URL (Packer's HTTP server, bound to loopback). aarch64: virt,
UEFI (Packer's `-boot` replaced: aarch64 refuses it), the kickstart on a CD labelled OEMDRV, which Anaconda reads with no
typing at all (typed keys over VNC are the known failure mode on HVF and aarch64).

Everything host-specific is a variable: the driver passes the common ones (accelerator, CPU
model, output dir, console log, key), the profile's prepare step (pipeline.distros.almalinux)
the ISO, the kickstart folder and the firmware; the SSH password only ever travels as
PKR_VAR_ssh_password. Rendering here is pure: no file is read or written.

legacy=True renders for Packer < 1.7 (Debian's 1.6.6): no `packer` block, and what newer
plugins say with `efi_*` arguments is said with `qemuargs` (`-machine ...,pflash0=,pflash1=` and
`-blockdev`, which leave Packer's own `-drive` list intact: overriding `-drive` would drop the
output disk and both CDs, whose paths the template cannot know).
"""

from __future__ import annotations

from typing import Any

from pipeline.contents.packages import GUEST_RPM_LIST
from pipeline.model import Arch, Firmware, Image
from pipeline.plan import machine_type
from pipeline.render import kickstart
from pipeline.render.hcl import Block, Expr
from pipeline.render.packer import WATCH_ARGS, common_variables, packer_block, variable

SOURCE = "almalinux"
PASSWORD_ENV = "IMAGEPIPE_SSH_PASSWORD"
# The default for a plain `packer build`; imagepipe passes the plan's value (1h with KVM/HVF,
# 4h under TCG, pipeline.plan.SSH_TIMEOUT).
SSH_TIMEOUT = "4h"
BOOT_WAIT = "30s"   # GRUB's menu waits 60 s; firmware under TCG needs ~15 s to reach it

VARIABLES: dict[str, str] = {
    "iso_url": "the AlmaLinux boot ISO (a local path after imagepipe downloaded and verified it)",
    "iso_checksum": "sha256:<hex> of the ISO, from the mirror's CHECKSUM file (iso.lock.json)",
    "kickstart_dir": "folder holding this image's ks.cfg (as committed under kickstart/almalinux<major>/<arch>/<image>)",
    "ssh_username": "account Packer logs in with once the installed system has rebooted",
    "ssh_timeout": "how long Packer waits for the installed system's SSH (imagepipe: 1h with KVM/HVF, 4h with TCG)",
    "packages_file": "where the guest's package list is downloaded to (imagepipe: the build's staging folder)",
}
UEFI_VARIABLES: dict[str, str] = {
    "efi_firmware_code": "UEFI firmware code for this host (OVMF, AAVMF or Homebrew edk2)",
    "efi_firmware_vars": "a writable copy of the matching UEFI variable store, one per build",
}
SECRET_DESCRIPTION = f"password Packer logs in with; set through PKR_VAR_ssh_password (imagepipe: {PASSWORD_ENV})"


def uses_uefi(image: Image) -> bool:
    """aarch64 always boots UEFI; x86_64 follows `firmware`."""
    return image.arch is Arch.AARCH64 or image.firmware is Firmware.UEFI


def variables(image: Image) -> list[Block]:
    """Every variable the template reads (host-specific values have no default)."""
    blocks = common_variables()
    blocks += [variable(n, d) for n, d in VARIABLES.items() if n not in ("ssh_username", "ssh_timeout")]
    blocks.append(variable("ssh_username", VARIABLES["ssh_username"], default=image.ssh_user))
    blocks.append(variable("ssh_timeout", VARIABLES["ssh_timeout"], default=SSH_TIMEOUT))
    if uses_uefi(image):
        blocks += [variable(n, d) for n, d in UEFI_VARIABLES.items()]
    blocks.append(variable("ssh_password", SECRET_DESCRIPTION, default="", sensitive=True))
    return blocks


def boot_command(image: Image) -> list[str]:
    """Edit the default GRUB entry (same menu under BIOS and UEFI on EL10): select the install
    entry, `e`, go to the end of the linux line, append, boot with Ctrl-X."""
    args = (
        " inst.text inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg"
        f" console=tty0 {kickstart.console_arg(image.arch)}"
    )
    return ["<up><wait>", "e<wait2>", "<down><down><end><wait>", args, "<wait><leftCtrlOn>x<leftCtrlOff>"]


def qemuargs(image: Image, legacy: bool) -> list[list[str]]:
    """Switches added to (or replacing) Packer's defaults; see the module docstring."""
    args = [
        # The SSH forward bound to loopback (Packer's default -netdev listens on all interfaces).
        ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
        ["-serial", "file:${var.console_log}"],
        ["-cpu", "${var.cpu_model}"],
    ]
    if image.arch is Arch.AARCH64:
        # Replaces Packer's own `-boot once=d` (a qemuargs key replaces Packer's value for it),
        # which qemu-system-aarch64 refuses ("no function defined to set boot device list"). Any
        # -boot would do: strict=on itself acts on nothing here, since it only applies to devices
        # with a bootindex and Packer's -drive lines carry none (the empty disk falls through to
        # the installer CD, the installed disk boots after the reboot).
        args.append(["-boot", "strict=on"])
    args += WATCH_ARGS  # the QMP socket imagepipe watches for a full host disk; werror=report
    if legacy and uses_uefi(image):
        machine = f"type={machine_type(image.arch)},accel=${{var.accelerator}},pflash0=fw-code,pflash1=fw-vars"
        args += [
            ["-machine", machine],
            ["-blockdev", "node-name=fw-code,driver=file,filename=${var.efi_firmware_code},read-only=on"],
            ["-blockdev", "node-name=fw-vars,driver=file,filename=${var.efi_firmware_vars}"],
        ]
    return args


def source(image: Image, legacy: bool, *, artifact_name: str) -> Block:
    """The `source "qemu"` block."""
    body: dict[str, Any] = {
        "vm_name": artifact_name,
        "output_directory": Expr("var.output_dir"),
        "iso_url": Expr("var.iso_url"),
        "iso_checksum": Expr("var.iso_checksum"),
        "qemu_binary": image.arch.qemu_binary,
        # the same machine as `invoke run` (plan.machine_type); the plugin writes
        # -machine type=<this>,accel=<accelerator>
        "machine_type": machine_type(image.arch),
        "accelerator": Expr("var.accelerator"),
        "cpus": image.cpus,
        "memory": image.memory,
        "disk_size": f"{image.disk_size}M",
        "disk_interface": "virtio",
        "disk_discard": "unmap",
        "disk_compression": image.compress_qcow2,
        "format": image.format.value,
        "net_device": "virtio-net",
        "headless": image.headless,
        # VNC (for watching the installer) listens on loopback only. No vnc_use_password: it
        # turns on a QMP socket inside output_dir, and QEMU refuses socket paths >= 108 bytes,
        # which deep staging folders reach.
        "vnc_bind_address": "127.0.0.1",
    }
    if uses_uefi(image) and not legacy:
        body.update(
            efi_boot=True,
            efi_firmware_code=Expr("var.efi_firmware_code"),
            efi_firmware_vars=Expr("var.efi_firmware_vars"),
        )
    if image.arch is Arch.AARCH64:
        # Typing over VNC is unreliable on aarch64/HVF: Anaconda reads /ks.cfg from this CD.
        body.update(
            cdrom_interface="virtio-scsi",  # virt's default virtio bus has no CD-ROM
            cd_files=["${var.kickstart_dir}/ks.cfg"],
            cd_label="OEMDRV",
            boot_wait="5s",
        )
    else:
        body.update(
            http_directory=Expr("var.kickstart_dir"),
            http_bind_address="127.0.0.1",  # the guest reaches it through slirp's 10.0.2.2
            boot_wait=BOOT_WAIT,
            boot_command=boot_command(image),
        )
    shutdown = "/sbin/shutdown -P now" if image.ssh_user == "root" else "sudo -n /sbin/shutdown -P now"
    body.update(
        communicator="ssh",
        ssh_username=Expr("var.ssh_username"),
        ssh_password=Expr("var.ssh_password"),
        ssh_private_key_file=Expr("var.ssh_private_key_file"),
        ssh_timeout=Expr("var.ssh_timeout"),
        shutdown_command=shutdown,
        shutdown_timeout="15m",
        qemuargs=qemuargs(image, legacy),
    )
    return Block("source", ("qemu", SOURCE), body)


def blocks(image: Image, legacy: bool, *, artifact_name: str) -> list[Block]:
    """The whole template for `image` (legacy=True: Packer < 1.7)."""
    head = [] if legacy else [packer_block()]
    build = Block("build", body={"sources": [f"source.qemu.{SOURCE}"], "provisioner": [package_list()]})
    return head + variables(image) + [source(image, legacy, artifact_name=artifact_name), build]


def package_list() -> Block:
    """Download the package list the kickstart's %post wrote (pipeline.contents.packages: manifest, SBOM)."""
    return Block("provisioner", ("file",), {
        "direction": "download",
        "source": GUEST_RPM_LIST,
        "destination": Expr("var.packages_file"),
    })
