"""Decisions as pure functions of configuration + host facts: accelerator, CPU, firmware, paths.

Nothing here touches the system; `choose_accel` and `make_build_plan` are table-tested.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pipeline.base.errors import AccelUnavailable, HostUnsuitable
from pipeline.base.run import install_hint
from pipeline.firmware import FirmwareInfo
from pipeline.host import HostFacts, missing_for
from pipeline.model import Accel, Arch, Config, Firmware, Image


class PlanProfile(Protocol):
    """What a plan asks of the image's distro profile (pipeline.distros.Profile): the plan is
    decided from it, and holds the answers, not the profile (drivers and distros build on plans)."""

    @property
    def build_vm(self) -> bool:
        """The engine builds inside a VM of the image's arch (else only a boot test runs one)."""

    def cpu_model(self, image: Image, accel: Accel) -> str: ...

    def cpu_level(self, image: Image) -> int | None: ...

    def artifact_name(self, image: Image) -> str: ...

    def template(self, root: Path, image: Image) -> Path: ...


class Delegated(Protocol):
    """The engine builds the image on another machine it drives itself (NixOS: nix's remote
    builds, pipeline.drivers.nixremote); the plan carries it, the manifest and history name it."""

    kind: ClassVar[str]

    @property
    def where(self) -> str: ...

    def describe(self) -> str: ...

    def as_manifest(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
    fallback: bool = False  # auto had to settle for TCG

    @property
    def cpu_model(self) -> str:
        return self.accel.cpu_model


def choose_accel(requested: Accel, facts: HostFacts, guest: Arch, *, purpose: str = "run") -> AccelChoice:
    """The accelerator for a `guest` VM on this host.

    auto: KVM when /dev/kvm opens read-write and the CPU can run guests (Linux, same arch);
    HVF when kern.hv_support is 1 (macOS, same arch); otherwise TCG, with the reason.
    For purpose="build", a foreign-arch guest under auto is refused: emulating a whole
    installation is hours of TCG, so it must be asked for (`--accel tcg`) or sent to a builder.
    An explicit request that cannot be met raises AccelUnavailable with a fix hint.
    """
    native = facts.arch is guest
    foreign = f"guest is {guest.value}, host is {facts.machine}"
    if requested is Accel.TCG:
        return AccelChoice(Accel.TCG, "requested with --accel tcg")
    if requested is Accel.KVM:
        if facts.os != "linux":
            raise AccelUnavailable(f"KVM is Linux-only; this host runs {facts.os}", "use --accel auto, hvf or tcg")
        if not native:
            raise AccelUnavailable(f"KVM cannot run this guest: {foreign}", "use --accel tcg (slow) or a builder of that arch")
        if not facts.kvm.usable:
            raise AccelUnavailable(f"KVM is not usable: {facts.kvm.why_not()}", "use --accel tcg, or fix KVM (see invoke doctor)")
        return AccelChoice(Accel.KVM, "requested; /dev/kvm is usable")
    if requested is Accel.HVF:
        if facts.os != "darwin" or not facts.hvf:
            raise AccelUnavailable("HVF is not available (needs macOS with kern.hv_support = 1)", "use --accel auto or tcg")
        if not native:
            raise AccelUnavailable(f"HVF cannot run this guest: {foreign}", "use --accel tcg (slow) or a builder of that arch")
        return AccelChoice(Accel.HVF, "requested; kern.hv_support = 1")
    # auto
    if not native:
        if purpose == "build":
            raise HostUnsuitable(
                f"cannot build {guest.value} natively here ({foreign})",
                "build on a builder of that arch (invoke remote-sync-build HOST), or force emulation with --accel tcg",
            )
        return AccelChoice(Accel.TCG, f"{foreign}: emulating with TCG (slow)", fallback=True)
    if facts.os == "linux" and facts.kvm.usable:
        return AccelChoice(Accel.KVM, "/dev/kvm opens read-write and the CPU supports virtualisation")
    if facts.os == "darwin" and facts.hvf:
        return AccelChoice(Accel.HVF, "kern.hv_support = 1")
    if facts.os == "linux":
        return AccelChoice(Accel.TCG, f"falling back to TCG: {facts.kvm.why_not()}", fallback=True)
    if facts.os == "darwin":
        return AccelChoice(Accel.TCG, "falling back to TCG: kern.hv_support is not 1", fallback=True)
    return AccelChoice(Accel.TCG, f"falling back to TCG: no known accelerator on {facts.os}", fallback=True)


def machine_type(arch: Arch) -> str:
    """The QEMU machine type, the same for the build (Packer) and for run / boot test: q35, or
    virt with gic-version=max (the host's GIC under KVM/HVF, GICv3 under TCG; GICv2 caps a guest
    at 8 vCPUs and GICv3-only hosts refuse it)."""
    return arch.machine + (",gic-version=max" if arch is Arch.AARCH64 else "")


# How long Packer waits for the installed system's sshd: an AlmaLinux install takes minutes
# with KVM/HVF (the official templates allow an hour) and hours under TCG.
SSH_TIMEOUT = {Accel.KVM: "1h", Accel.HVF: "1h", Accel.TCG: "4h"}

# QEMU's TCG emulates AVX, AVX2, FMA and F16C since 7.2: `-cpu max` is x86-64-v3 from then on
# (measured here on 7.2 with QMP query-cpu-model-expansion), v2 before.
TCG_V3_SINCE = (7, 2)
NAMED_MODEL_LEVEL = {"Nehalem": 2}  # named CPU models a build may ask for, and their level


def build_cpu_level(cpu_model: str, accel: Accel, facts: HostFacts) -> tuple[int | None, str]:
    """The x86-64 level the build VM's CPU offers, and where that comes from (pure)."""
    if cpu_model in NAMED_MODEL_LEVEL:
        return NAMED_MODEL_LEVEL[cpu_model], f"QEMU CPU model {cpu_model}"
    if accel is Accel.TCG:
        qemu = facts.version(Arch.X86_64.qemu_binary)
        if qemu is None:
            return None, "the installed QEMU's version is unknown"
        shown = ".".join(map(str, qemu))
        return (3 if qemu[:2] >= TCG_V3_SINCE else 2), f"QEMU {shown}'s TCG `-cpu max`"
    return facts.cpu_level, "this host's CPU"


def cpu_level_problem(image: Image, need: int | None, cpu_model: str, accel: AccelChoice,
                      facts: HostFacts) -> HostUnsuitable | None:
    """Refuse a build whose guest needs a higher x86-64 level (`need`, the profile's) than the
    build VM gets: the installer would not even start and Packer would wait for SSH for hours."""
    if need is None or image.arch is not Arch.X86_64:
        return None
    have, source = build_cpu_level(cpu_model, accel.accel, facts)
    if cpu_model in NAMED_MODEL_LEVEL and accel.accel is not Accel.TCG and (facts.cpu_level or 0) < (have or 0):
        have, source = facts.cpu_level, f"this host's CPU (under the {cpu_model} model)"
    if have is None or have >= need:
        return None

    lacking = (f" (lacks {' '.join(missing_for(facts.cpu_flags, need))})"
               if source == "this host's CPU" and facts.cpu_flags else "")
    hint = ("build on a newer host (invoke remote-sync-build HOST)" if accel.accel is not Accel.TCG
            else f"install QEMU >= {'.'.join(map(str, TCG_V3_SINCE))}")
    if need == 3:
        hint += f", or build the x86_64_v2 variant: `variant: x86_64_v2` under images.{image.name}"
    return HostUnsuitable(f"{image.name} needs an x86-64-v{need} CPU, but {source} is x86-64-v{have}{lacking}", hint)


def firmware_for(image: Image, facts: HostFacts) -> FirmwareInfo | None:
    """The UEFI firmware an image needs here (None for BIOS), or HostUnsuitable with a hint."""
    if image.firmware is Firmware.BIOS:
        return None
    fw = facts.firmware.get(image.arch)
    if fw is None:
        raise HostUnsuitable(
            f"no UEFI firmware for {image.arch.value} found (QEMU descriptors, known paths"
            f"{', QEMU_EFI_AARCH64' if image.arch is Arch.AARCH64 else ''})",
            install_hint(f"uefi-{image.arch.value}", facts.package_manager)
            + (", or export QEMU_EFI_AARCH64=/path/to/code.fd" if image.arch is Arch.AARCH64 else ""),
        )
    return fw


def _firmware(image: Image, facts: HostFacts, *, elsewhere: bool) -> FirmwareInfo | None:
    """firmware_for, except that an image built elsewhere is not refused for firmware missing
    here (only a boot test here needs it, and that refuses on its own)."""
    if not elsewhere:
        return firmware_for(image, facts)
    return None if image.firmware is Firmware.BIOS else facts.firmware.get(image.arch)


def new_build_id(now: float | None = None) -> str:
    """Sortable, unique: 20261123T210000Z-1a2b."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs to know, decided before anything runs."""

    image: Image
    build_id: str
    root: Path         # the project (invoke.yaml, packer/, kickstart/, nixos/)
    accel: AccelChoice
    firmware: FirmwareInfo | None
    image_dir: Path    # output/<image>
    staging: Path      # output/<image>/.staging/<id>  (renamed into builds/<id> on publish)
    log_dir: Path      # output/<image>/logs/<id>      (kept for failed builds too)
    template: Path     # the committed, host-independent template (Packer) or flake (Nix)
    ssh_key: Path      # private key the build and `invoke ssh` log in with
    host_os: str
    host_machine: str
    cpu_model: str     # the build VM's QEMU CPU model (the profile's choice for this accelerator)
    artifact_name: str  # the published image file's name (the profile's)
    route: Delegated | None = None  # the engine builds it on another machine (nix's remote builds)
    # further keys for ssh_user in the staged files: on a builder, the key of the machine that
    # asked for the build, so the image it fetches logs in with its own key (`invoke ssh`, run)
    extra_keys: tuple[str, ...] = ()

    @property
    def ssh_timeout(self) -> str:
        """How long the build waits for the guest's SSH, from the accelerator."""
        return SSH_TIMEOUT[self.accel.accel]

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def build_log(self) -> Path:
        """The readable log: timestamp + text of every event shown during the build."""
        return self.log_dir / "build.log"

    @property
    def raw_log(self) -> Path:
        """The tool's own output, unchanged (Packer's machine-readable lines, nix's internal-json)."""
        return self.log_dir / "build.raw.log"


def make_build_plan(
    cfg: Config, image: Image, profile: PlanProfile, facts: HostFacts, requested: Accel, ssh_key: Path,
    build_id: str | None = None, route: Delegated | None = None, extra_keys: tuple[str, ...] = (),
) -> BuildPlan:
    """Decide accelerator, firmware and paths for building `image` (its distro `profile`:
    `distros.profile(image)`) on this host (or, with a `route`, through an engine that builds it
    elsewhere: the accelerator is then only the one a boot test here would use, so a foreign
    arch falls back to TCG instead of being refused)."""
    bid = build_id or new_build_id()
    image_dir = cfg.output_dir / image.name
    # a foreign arch is refused under `auto` only where a whole build would be emulated
    accel = choose_accel(requested, facts, image.arch, purpose="build" if profile.build_vm and not route else "run")
    cpu_model = profile.cpu_model(image, accel.accel)
    # no build VM runs here when the engine builds elsewhere: the CPU level is the builder's business
    problem = None if route else cpu_level_problem(image, profile.cpu_level(image), cpu_model, accel, facts)
    if problem is not None:
        raise problem
    return BuildPlan(
        image=image,
        build_id=bid,
        root=cfg.root,
        accel=accel,
        firmware=_firmware(image, facts, elsewhere=route is not None or not profile.build_vm),
        image_dir=image_dir,
        staging=image_dir / ".staging" / bid,
        log_dir=image_dir / "logs" / bid,
        template=profile.template(cfg.root, image),
        ssh_key=ssh_key,
        host_os=facts.os,
        host_machine=facts.machine,
        cpu_model=cpu_model,
        artifact_name=profile.artifact_name(image),
        route=route,
        extra_keys=extra_keys,
    )
