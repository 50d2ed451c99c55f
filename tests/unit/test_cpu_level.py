"""x86-64 levels (host flags, QEMU's TCG model), the pre-build check, and the plan values that
follow the accelerator or the arch: ssh_timeout, machine type, CPU model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import distros, host
from pipeline import firmware as fw
from pipeline.base.errors import HostUnsuitable
from pipeline.config import load_file
from pipeline.firmware import FirmwareInfo
from pipeline.host import HostFacts, KvmFacts, ToolInfo
from pipeline.model import Accel, Arch
from pipeline.plan import (
    build_cpu_level,
    choose_accel,
    cpu_level_problem,
    machine_type,
    make_build_plan,
)
from tests.support import ROOT

CFG = load_file(ROOT / "invoke.yaml")
ALMA = CFG.image("almalinux10-x86_64")

V1 = "fpu cx8 cmov mmx fxsr sse sse2 syscall lm"
NEHALEM = V1 + " pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm"
HASWELL = NEHALEM + " avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
SKYLAKE_X = HASWELL + " avx512f avx512bw avx512cd avx512dq avx512vl"


def need(image):  # type: ignore[no-untyped-def]
    """The x86-64 level the image's distro needs (the profile's answer, as build and dry run ask it)."""
    return distros.profile(image).cpu_level(image)


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\nbugs\t\t: none\n"


def facts(flags: str | None = HASWELL, qemu: str = "7.2.22", kvm: bool = True) -> HostFacts:
    return HostFacts(os="linux", machine="x86_64", kvm=KvmFacts(True, kvm, kvm), hvf=False,
                     tools={"qemu-system-x86_64": ToolInfo("qemu-system-x86_64", True, qemu)},
                     firmware={Arch.X86_64: FirmwareInfo(Arch.X86_64, "/code.fd", "/vars.fd", "test")},
                     cpu_flags=frozenset(flags.split()) if flags is not None else None)


@pytest.mark.parametrize(("flags", "level"), [("", 0), (V1, 1), (NEHALEM, 2), (HASWELL, 3), (SKYLAKE_X, 4),
                                              (HASWELL.replace(" abm", ""), 2), (SKYLAKE_X.replace(" pni", ""), 1)])
def test_levels_need_every_flag_of_every_lower_level(flags, level):
    parsed = host.parse_cpu_flags(cpuinfo(flags), "x86_64")
    assert host.x86_level(parsed or ()) == level


def test_missing_flags_name_what_a_level_lacks():
    assert host.missing_for(NEHALEM.split(), 3) == ["abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"]
    assert host.missing_for(HASWELL.split(), 3) == []


def test_flags_are_read_on_x86_only_and_from_macos_sysctl():
    assert host.parse_cpu_flags(cpuinfo(HASWELL), "aarch64") is None
    assert host.parse_cpu_flags("processor : 0\n", "x86_64") is None
    intel_mac = ("FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH DS ACPI MMX FXSR SSE "
                 "SSE2 SS HTT TM PBE SSE3 PCLMULQDQ DTES64 MON DSCPL VMX EST TM2 SSSE3 FMA CX16 TPR PDCM SSE4.1 "
                 "SSE4.2 x2APIC MOVBE POPCNT AES PCID XSAVE OSXSAVE SEGLIM64 TSCTMR AVX1.0 RDRAND F16C\n"
                 "RDWRFSGS TSC_THREAD_OFFSET BMI1 AVX2 SMEP BMI2 ERMS INVPCID FPU_CSDS MPX RDSEED ADX SMAP\n"
                 "SYSCALL XD 1GBPAGE EM64T LAHF LZCNT PREFETCHW RDTSCP TSCI\n")
    assert host.x86_level(host.parse_darwin_cpu_flags(intel_mac) or ()) == 3
    assert host.parse_darwin_cpu_flags("\n\n") is None  # Apple Silicon: no x86 features
    assert facts(HASWELL).cpu_level == 3 and facts(None).cpu_level is None


def test_the_build_vm_level_comes_from_the_host_qemu_or_a_named_model():
    assert build_cpu_level("host", Accel.KVM, facts(NEHALEM)) == (2, "this host's CPU")
    assert build_cpu_level("max", Accel.TCG, facts(NEHALEM, qemu="7.2.22")) == (3, "QEMU 7.2.22's TCG `-cpu max`")
    assert build_cpu_level("max", Accel.TCG, facts(qemu="7.1.0"))[0] == 2
    assert build_cpu_level("Nehalem", Accel.KVM, facts()) == (2, "QEMU CPU model Nehalem")


def test_almalinux_10_on_a_v2_host_under_kvm_is_refused_before_anything_runs():
    f = facts(NEHALEM)
    problem = cpu_level_problem(ALMA, need(ALMA), "host", choose_accel(Accel.KVM, f, Arch.X86_64), f)
    assert isinstance(problem, HostUnsuitable)
    assert problem.message == ("almalinux10-x86_64 needs an x86-64-v3 CPU, but this host's CPU is x86-64-v2 "
                               "(lacks abm avx avx2 bmi1 bmi2 f16c fma movbe xsave)")
    assert "variant: x86_64_v2" in problem.hint and "remote-sync-build" in problem.hint
    with pytest.raises(HostUnsuitable, match="needs an x86-64-v3 CPU"):
        make_build_plan(CFG, ALMA, distros.profile(ALMA), f, Accel.KVM, Path("/k"))


def test_tcg_needs_qemu_7_2_for_v3_and_the_v2_variant_builds_anywhere():
    old = facts(HASWELL, qemu="7.1.0", kvm=False)
    tcg = choose_accel(Accel.TCG, old, Arch.X86_64)
    problem = cpu_level_problem(ALMA, need(ALMA), "max", tcg, old)
    assert problem is not None and "QEMU 7.1.0's TCG `-cpu max` is x86-64-v2" in problem.message
    assert "install QEMU >= 7.2" in problem.hint
    assert cpu_level_problem(ALMA, need(ALMA), "max", tcg, facts(qemu="7.2.0", kvm=False)) is None
    v2 = dataclasses.replace(ALMA, variant="x86_64_v2")
    plan = make_build_plan(CFG, v2, distros.profile(v2), facts(NEHALEM), Accel.KVM, Path("/k"), build_id="b")
    assert plan.cpu_model == "Nehalem", "the v2 build runs on a v2 CPU model, as AlmaLinux's own v2 builds"
    assert cpu_level_problem(v2, need(v2), "Nehalem", tcg, old) is None


def test_images_without_a_level_are_never_refused():
    f = facts(V1)
    for name in ("almalinux10-aarch64", "nixos-x86_64", "demo-x86_64"):
        image = CFG.image(name)
        assert cpu_level_problem(image, need(image), "host", choose_accel(Accel.TCG, f, image.arch), f) is None


def test_plan_values_follow_the_accelerator():
    kvm = make_build_plan(CFG, ALMA, distros.profile(ALMA), facts(), Accel.KVM, Path("/k"), build_id="b")
    tcg = make_build_plan(CFG, ALMA, distros.profile(ALMA), facts(), Accel.TCG, Path("/k"), build_id="b")
    assert (kvm.ssh_timeout, kvm.cpu_model) == ("1h", "host")
    assert (tcg.ssh_timeout, tcg.cpu_model) == ("4h", "max")
    assert distros.profile(kvm.image).plan_variables(kvm) == {"ssh_timeout": "1h"}
    from pipeline.drivers.packer import host_variables

    assert host_variables(tcg, distros.profile(tcg.image), Path("/s"))["ssh_timeout"] == "4h"


def test_one_machine_type_for_build_and_run():
    assert machine_type(Arch.X86_64) == "q35"
    assert machine_type(Arch.AARCH64) == "virt,gic-version=max"


# --------------------------------------------------------------------------------- firmware

def test_descriptors_beside_the_qemu_binary_in_use_are_found(tmp_path):
    """A Nix- or Homebrew-style prefix: bin/qemu-system-x86_64 reached through a symlink,
    share/qemu/firmware/*.json beside it pointing into the same prefix."""
    prefix = tmp_path / "store" / "qemu-9.2"
    (prefix / "bin").mkdir(parents=True)
    binary = prefix / "bin" / "qemu-system-x86_64"
    binary.write_text("not executed\n")
    profile = tmp_path / "profile" / "bin"
    profile.mkdir(parents=True)
    (profile / "qemu-system-x86_64").symlink_to(binary)
    firmware = prefix / "share" / "qemu" / "firmware"
    firmware.mkdir(parents=True)
    code, nvram = prefix / "share/qemu/edk2-x86_64-code.fd", prefix / "share/qemu/edk2-i386-vars.fd"
    for f in (code, nvram):
        f.write_bytes(b"\0" * 16)
    (firmware / "60-edk2-x86_64.json").write_text(json.dumps({
        "interface-types": ["uefi"],
        "mapping": {"device": "flash", "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(nvram), "format": "raw"}},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}], "features": []}))

    def which(name: str) -> str | None:
        return str(profile / name) if name == "qemu-system-x86_64" else None

    dirs = fw.qemu_firmware_dirs(which)
    assert dirs == [str(firmware)]
    found = fw.find_firmware(Arch.X86_64, {}, exists=lambda p: Path(p).exists(), descriptors=fw.local_descriptors(dirs))
    assert found is not None and (found.code, found.vars) == (str(code), str(nvram))
    assert found.source == f"descriptor {firmware / '60-edk2-x86_64.json'}"
