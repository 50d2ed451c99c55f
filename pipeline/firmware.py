"""UEFI firmware for QEMU: QEMU's firmware descriptors (docs/interop/firmware.json), then known
paths, then QEMU_EFI_AARCH64.

Looked up on the local filesystem once per command (pipeline.host.probe puts the result into
HostFacts.firmware); the descriptor parser and the choice are pure and tested with plain asserts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.model import Arch


@dataclass(frozen=True)
class FirmwareInfo:
    """UEFI firmware found for one arch: the code and vars flash images, and where they were found."""

    arch: Arch
    code: str
    vars: str | None
    source: str


@dataclass(frozen=True)
class Descriptor:
    """What imagepipe reads from a QEMU firmware descriptor (docs/interop/firmware.json)."""

    archs: tuple[str, ...]
    machines: tuple[str, ...]
    code: str
    vars: str | None
    features: frozenset[str]
    format: str = "raw"   # the flash images' format: QEMU's pflash here is loaded as raw


def parse_descriptor(text: str) -> Descriptor | None:
    """A QEMU firmware descriptor (JSON) → Descriptor; None for anything but a flash mapping."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("mapping"), dict):
        return None
    mapping = data["mapping"]
    executable = mapping.get("executable")
    if mapping.get("device") != "flash" or not isinstance(executable, dict) or not executable.get("filename"):
        return None
    targets = [t for t in data.get("targets") or [] if isinstance(t, dict)]
    nvram = mapping.get("nvram-template")
    return Descriptor(
        archs=tuple(str(t.get("architecture")) for t in targets),
        machines=tuple(str(m) for t in targets for m in t.get("machines") or []),
        code=str(executable["filename"]),
        vars=str(nvram["filename"]) if isinstance(nvram, dict) and nvram.get("filename") else None,
        features=frozenset(str(f) for f in data.get("features") or []),
        format=str(executable.get("format", "raw")),
    )


def choose_descriptor(descriptors: Iterable[tuple[str, Descriptor]], arch: Arch) -> FirmwareInfo | None:
    """First descriptor (in name order) for `arch` whose flash is raw, without secure boot / enrolled keys.

    Fedora lists qcow2-format firmware first (50-edk2-*-qcow2*.json); QEMU command lines here load
    pflash as raw, so those would never run.
    """
    for source, d in sorted(descriptors, key=lambda item: item[0]):
        if arch.value not in d.archs or d.features & {"secure-boot", "enrolled-keys"} or d.format != "raw":
            continue
        return FirmwareInfo(arch, d.code, d.vars, f"descriptor {source}")
    return None


KNOWN_FIRMWARE: dict[Arch, list[tuple[str, str | None]]] = {
    Arch.X86_64: [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
        ("/opt/homebrew/share/qemu/edk2-x86_64-code.fd", "/opt/homebrew/share/qemu/edk2-i386-vars.fd"),
    ],
    Arch.AARCH64: [
        ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
        ("/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw", "/usr/share/edk2/aarch64/vars-template-pflash.raw"),
        ("/opt/homebrew/share/qemu/edk2-aarch64-code.fd", "/opt/homebrew/share/qemu/edk2-arm-vars.fd"),
        ("/usr/local/share/qemu/edk2-aarch64-code.fd", "/usr/local/share/qemu/edk2-arm-vars.fd"),
    ],
}


DESCRIPTOR_DIRS = (
    "/etc/qemu/firmware",
    "/usr/share/qemu/firmware",
    "/opt/homebrew/share/qemu/firmware",
    "/usr/local/share/qemu/firmware",
)


def find_firmware(
    arch: Arch,
    env: Mapping[str, str],
    exists: Callable[[str], bool] = os.path.exists,
    descriptors: Iterable[tuple[str, Descriptor]] = (),
) -> FirmwareInfo | None:
    """UEFI firmware for `arch`: QEMU descriptors first, then known paths, then QEMU_EFI_AARCH64."""
    found = choose_descriptor(((s, d) for s, d in descriptors if exists(d.code)), arch)
    if found:
        return found
    for code, vars_ in KNOWN_FIRMWARE[arch]:
        if exists(code):
            return FirmwareInfo(arch, code, vars_ if vars_ and exists(vars_) else None, "known path")
    override = env.get("QEMU_EFI_AARCH64") if arch is Arch.AARCH64 else None
    if override and exists(override):
        return FirmwareInfo(arch, override, None, "QEMU_EFI_AARCH64")
    return None


def qemu_firmware_dirs(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """share/qemu/firmware beside each QEMU binary in use (realpath(qemu-system-*)/../../share):
    where a Nix or Homebrew QEMU keeps the descriptors of the firmware it ships."""
    dirs = []
    for arch in Arch:
        found = which(arch.qemu_binary)
        if found:
            prefix = Path(os.path.realpath(found)).parent.parent
            dirs.append(str(prefix / "share" / "qemu" / "firmware"))
    return list(dict.fromkeys(dirs))


def local_descriptors(dirs: Iterable[str] | None = None) -> list[tuple[str, Descriptor]]:
    """Every QEMU firmware descriptor on this host, parsed (default: the fixed folders and the
    ones beside the QEMU binaries on PATH)."""
    found = []
    for d in dict.fromkeys(dirs if dirs is not None else (*DESCRIPTOR_DIRS, *qemu_firmware_dirs())):
        p = Path(d)
        if not p.is_dir():
            continue
        for f in sorted(p.glob("*.json")):
            parsed = parse_descriptor(f.read_text(encoding="utf-8", errors="replace"))
            if parsed:
                found.append((str(f), parsed))
    return found
