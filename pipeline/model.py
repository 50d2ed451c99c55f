"""The configuration's model: what invoke.yaml describes, as enums and frozen dataclasses.

Pure data with the few derived values every layer needs (QEMU binary and machine of an Arch, the
CPU model of an Accel, the bootable formats, the output folder of a Config). Loading and
validating invoke.yaml into it is pipeline.config's job; what differs per distro (the published
file's name, say) is the distro profile's (pipeline.distros). Imports no other pipeline module
but errors and validate's did_you_mean, so every layer can use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pipeline.base.errors import UsageError
from pipeline.base.validate import did_you_mean


class Arch(StrEnum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.value}"

    @property
    def machine(self) -> str:
        """QEMU machine type: q35 on x86_64, virt on aarch64."""
        return "q35" if self is Arch.X86_64 else "virt"

    @property
    def console(self) -> str:
        """The serial console device the guest kernel writes to."""
        return "ttyS0" if self is Arch.X86_64 else "ttyAMA0"

    @property
    def nix_system(self) -> str:
        return f"{self.value}-linux"

    @property
    def short(self) -> str:
        """The short name used in task aliases (x86 / arm)."""
        return "x86" if self is Arch.X86_64 else "arm"

    @classmethod
    def from_machine(cls, machine: str) -> Arch | None:
        """Map `uname -m` output (x86_64, amd64, arm64, aarch64) to an Arch."""
        m = machine.strip().lower()
        if m in ("x86_64", "amd64"):
            return cls.X86_64
        if m in ("aarch64", "arm64"):
            return cls.AARCH64
        return None


class Compress(StrEnum):
    """A builder's `compress`: how images cross its link (pipeline.builders.wire)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"
    ZSTD = "zstd"
    LZ4 = "lz4"
    ZLIB = "zlib"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    HVF = "hvf"
    TCG = "tcg"

    @property
    def cpu_model(self) -> str:
        """`host` passes the real CPU through (KVM/HVF); TCG emulates the richest model."""
        return "max" if self is Accel.TCG else "host"


class Firmware(StrEnum):
    UEFI = "uefi"
    BIOS = "bios"


class Network(StrEnum):
    """An instance's network: QEMU's user networking, or only its forwarded SSH port (restrict=on)."""

    USER = "user"
    ISOLATED = "isolated"


class Format(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"
    VHDX = "vhdx"
    VDI = "vdi"

    @property
    def bootable(self) -> bool:
        """Formats the engines write and `invoke run` boots (the others are converted from it)."""
        return self in (Format.QCOW2, Format.RAW)


@dataclass(frozen=True)
class User:
    """A guest account: crypt hash only (never plaintext), public keys, sudo rights."""

    name: str
    password_hash: str | None = None
    public_keys: tuple[str, ...] = ()
    sudo: bool = False


@dataclass(frozen=True)
class Image:
    """One entry of the image catalogue."""

    name: str
    distro: str        # a distro profile's name (pipeline.distros: almalinux, nixos, demo, ...)
    arch: Arch
    version: str = "latest"
    format: Format = Format.QCOW2      # the primary format: the engine writes it, `run` boots it
    formats: tuple[Format, ...] = ()   # every published format, the primary first (() = (format,))
    compress_qcow2: bool = False       # qcow2 files are written compressed (qemu-img convert -c)
    firmware: Firmware = Firmware.UEFI
    disk_size: int = 20480
    memory: int = 2048
    cpus: int = 2
    ssh_port: int = 2222
    ssh_user: str = "root"
    headless: bool = True
    users: tuple[User, ...] = ()
    iso: str | None = None
    flake: str | None = None
    attribute: str | None = None
    schedule: str | None = None
    retention: int = 3
    lang: str = "en_US.UTF-8"
    keyboard: str = "us"
    timezone: str = "UTC"
    root_ssh: bool = False      # root may log in over SSH with its password (pipeline.contract)
    variant: str | None = None  # a build of the distro for other CPUs (AlmaLinux 10: x86_64_v2)
    mirror: str | None = None   # Debian: the mirror to build from (None: the one the host's apt sources name)
    packages: tuple[str, ...] = ()  # Debian: further packages to install

    def __post_init__(self) -> None:
        # `formats` wins: its first entry is the primary format; without it, just `format`.
        if self.formats:
            object.__setattr__(self, "format", self.formats[0])
        else:
            object.__setattr__(self, "formats", (self.format,))

    def user(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)


@dataclass(frozen=True)
class Builder:
    """A remote Linux machine reached over SSH (`host` is an ssh_config alias or hostname)."""

    name: str
    host: str
    dir: str = "~/imagepipe"
    arch: Arch | None = None
    compress: Compress = Compress.AUTO


@dataclass(frozen=True)
class Defaults:
    accel: Accel = Accel.AUTO
    output_dir: str = "output"
    retention: int = 3
    ssh_key: str | None = None
    schedule: str = "weekly"
    boot_timeout: int = 0  # seconds a boot test waits for SSH (and for each later step); 0: by accelerator
    virtiofsd: str | None = None
    instance_network: Network = Network.USER


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    root: Path
    source: str
    defaults: Defaults
    images: Mapping[str, Image]
    builders: Mapping[str, Builder] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        out = Path(self.defaults.output_dir).expanduser()
        return out if out.is_absolute() else self.root / out

    def image(self, name: str) -> Image:
        """The image called `name`, or a UsageError listing the valid names."""
        try:
            return self.images[name]
        except KeyError:
            raise UsageError(
                f"unknown image {name!r}{did_you_mean(name, self.images)}",
                hint="valid images: " + ", ".join(sorted(self.images)),
            ) from None
