"""The QEMU command line: a pure function of the image, the accelerator choice, the firmware,
the disk, the state folder, the SSH port and what an instance attaches (its NoCloud seed, its
shared folders): the same inputs give the same argv."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.errors import UsageError
from pipeline.contract import AGENT_PORT
from pipeline.firmware import FirmwareInfo
from pipeline.model import Arch, Firmware, Image
from pipeline.plan import AccelChoice, machine_type
from pipeline.vm.state import StatePaths

GUEST_SSH_PORT = 22


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (the demo image): no firmware, the kernel and initrd beside the disk."""

    kernel: Path
    initrd: Path
    append: str


@dataclass(frozen=True)
class RunOptions:
    """How to run: overlay, display, attached console."""

    snapshot: bool = False     # writes go to a temporary overlay: the image file stays untouched
    gui: bool = False          # a display window instead of -display none
    foreground: bool = False   # console on this terminal instead of -daemonize
    isolated: bool = False     # the guest's network reaches only its forwarded ports (restrict=on)


@dataclass(frozen=True)
class ShareDevice:
    """One shared folder as QEMU gets it: virtiofs (a vhost-user socket that virtiofsd serves)
    or 9p (QEMU serves `path` itself)."""

    tag: str
    method: str                # "virtiofs" | "9p"
    socket: Path | None = None  # virtiofs: virtiofsd's socket
    path: Path | None = None    # 9p: the host folder


@dataclass(frozen=True)
class Attached:
    """What an instance adds to its VM: the NoCloud seed (a read-only disk labelled cidata) and
    its shared folders."""

    seed: Path | None = None
    shares: tuple[ShareDevice, ...] = ()


def _opt(value: Path | str) -> str:
    """A value inside a QEMU `key=value,...` option: commas are doubled."""
    return os.fspath(value).replace(",", ",,")


def qemu_argv(
    image: Image,
    accel: AccelChoice,
    firmware: FirmwareInfo | None,
    disk: Path,
    state: StatePaths,
    port: int,
    *,
    disk_format: str = "qcow2",
    boot: BootSpec | None = None,
    opts: RunOptions = RunOptions(),
    attached: Attached = Attached(),
    name: str | None = None,
) -> list[str]:
    """The full QEMU command line for `image` (pure: the same inputs give the same argv);
    `name`: the instance's name, shown as QEMU's -name (default: the image's)."""
    argv = [image.arch.qemu_binary, "-name", name or image.name]
    argv += _machine(image.arch, accel)
    argv += ["-smp", str(image.cpus), "-m", str(image.memory)]
    argv += _shared_memory(image, attached)
    argv += _boot_args(image, firmware, state, boot)
    argv += disk_args(disk, disk_format, first=boot is None)
    if opts.snapshot:
        argv.append("-snapshot")
    if attached.seed is not None:  # after the disk's device: the guest's second disk (vdb), read-only
        argv += ["-drive", f"if=none,id=seed,format=raw,readonly=on,file={_opt(attached.seed)}",
                 "-device", "virtio-blk-pci,drive=seed,id=seed-disk"]
    argv += share_args(attached.shares)
    restrict = "restrict=on," if opts.isolated else ""
    argv += [
        "-netdev", f"user,id=net0,{restrict}hostfwd=tcp:127.0.0.1:{port}-:{GUEST_SSH_PORT}",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",  # entropy: sshd key generation does not stall at boot
    ]
    argv += _console_args(state, opts.foreground)
    argv += ["-chardev", f"socket,id=qmp,path={_opt(state.qmp)},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]
    argv += agent_channel(state)
    argv += _display_args(image.arch, opts.gui)
    argv += ["-pidfile", os.fspath(state.pid)]
    if not opts.foreground:
        argv.append("-daemonize")
    return argv


BOOT_DISK_ID = "boot-disk"  # the disk's device id (QMP: /machine/peripheral/boot-disk)


def disk_args(disk: Path, disk_format: str, *, first: bool = True) -> list[str]:
    """The image as a virtio disk; `first`: first in the firmware's boot order (bootindex=0, the
    only thing `-boot strict=on` acts on: UEFI then never falls through to PXE). A direct kernel
    boot (-kernel) has the firmware's first place itself, so its disk takes none.

    A write that finds the host's disk full pauses the guest (werror=enospc, QEMU's default, said
    here): the guest's file systems stay whole, and the pause is what the boot test and `ssh`
    see on QMP (status io-error) to fail at once with "ran out of disk space" instead of waiting
    out their deadline; `invoke status` says it too. A read error is the guest's to see.
    """
    return ["-drive", f"if=none,id=disk0,format={disk_format},file={_opt(disk)}",
            "-device", f"virtio-blk-pci,drive=disk0,id={BOOT_DISK_ID}{',bootindex=0' if first else ''},"
                       "werror=enospc,rerror=report"]


def _shared_memory(image: Image, attached: Attached) -> list[str]:
    """virtiofs needs the guest's RAM shared with virtiofsd: a memfd backend as its one NUMA node."""
    if not any(s.method == "virtiofs" for s in attached.shares):
        return []
    return ["-object", f"memory-backend-memfd,id=mem0,size={image.memory}M,share=on", "-numa", "node,memdev=mem0"]


def share_args(shares: tuple[ShareDevice, ...]) -> list[str]:
    """The devices of the shared folders: vhost-user-fs on virtiofsd's socket, or 9p (-virtfs;
    security_model=none: files keep the owners and modes they have on the host)."""
    argv: list[str] = []
    for i, share in enumerate(shares):
        if share.method == "virtiofs" and share.socket is not None:
            argv += ["-chardev", f"socket,id=vfs{i},path={_opt(share.socket)}",
                     "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={share.tag}"]
        elif share.method == "9p" and share.path is not None:
            argv += ["-virtfs", f"local,id=fs{i},path={_opt(share.path)},mount_tag={share.tag},security_model=none"]
        else:
            raise UsageError(f"shared folder {share.tag}: no {share.method} endpoint")
    return argv


def agent_channel(state: StatePaths) -> list[str]:
    """The guest agent's virtio-serial port, a socket in the state folder (the guest contract:
    qemu-guest-agent starts only when this port exists)."""
    return ["-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga,path={_opt(state.qga)},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga,name={AGENT_PORT}"]


def has_agent_channel(argv: list[str]) -> bool:
    """True when a QEMU command line gives the guest the agent's port (the contract's check)."""
    return any(a.startswith("virtserialport,") and f"name={AGENT_PORT}" in a.split(",") for a in argv)


def _machine(arch: Arch, accel: AccelChoice) -> list[str]:
    argv = ["-machine", machine_type(arch), "-accel", accel.accel.value, "-cpu", accel.cpu_model]
    if arch is Arch.AARCH64:
        argv += ["-boot", "strict=on"]  # UEFI boots the disk (bootindex=0) and nothing after it
    return argv


def _boot_args(image: Image, firmware: FirmwareInfo | None, state: StatePaths, boot: BootSpec | None) -> list[str]:
    if boot is not None:
        return ["-kernel", os.fspath(boot.kernel), "-initrd", os.fspath(boot.initrd), "-append", boot.append]
    if image.firmware is Firmware.BIOS:
        if image.arch is Arch.AARCH64:
            raise UsageError(f"{image.name}: aarch64 guests have no BIOS", "set firmware: uefi for this image in invoke.yaml")
        return []  # SeaBIOS, QEMU's default on q35
    if firmware is None:
        raise UsageError(f"{image.name}: UEFI firmware is required but none was given")
    if firmware.vars is None:
        return ["-bios", os.fspath(firmware.code)]  # a code-only build (e.g. QEMU_EFI_AARCH64)
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(firmware.code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={_opt(state.efivars)}",
    ]


def _console_args(state: StatePaths, foreground: bool) -> list[str]:
    if foreground:
        # the console on this terminal (Ctrl-A X quits, Ctrl-C goes to the guest), logged too
        return ["-chardev", f"stdio,id=console,mux=on,signal=off,logfile={_opt(state.console)}",
                "-serial", "chardev:console", "-mon", "chardev=console,mode=readline"]
    # a socket `invoke console` attaches to; everything the guest writes is logged either way
    return ["-chardev", f"socket,id=console,path={_opt(state.serial)},server=on,wait=off,logfile={_opt(state.console)}",
            "-serial", "chardev:console", "-monitor", "none"]


def _display_args(arch: Arch, gui: bool) -> list[str]:
    if not gui:
        return ["-display", "none"]
    if arch is Arch.AARCH64:  # virt has no default display or input devices
        return ["-device", "virtio-gpu-pci", "-device", "qemu-xhci", "-device", "usb-kbd", "-device", "usb-tablet"]
    return []
