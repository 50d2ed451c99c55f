"""Hints that fit the host: install commands per package manager, build routes per arch, and
doctor's exit codes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline import doctor
from pipeline.base.run import INSTALL_HINTS, install_hint, package_manager
from pipeline.config import load
from pipeline.hints import build_hint, host_facts
from pipeline.host import HostFacts, KvmFacts, ToolInfo, parse_package_manager
from tests.support import ROOT

RAW = yaml.safe_load((ROOT / "invoke.yaml").read_text())
CFG = load(RAW, ROOT)


@pytest.mark.parametrize("manager,want", [
    ("apt", "install with: sudo apt-get install packer"), ("dnf", "install with: sudo dnf install packer"),
    ("brew", "install with: brew install hashicorp/tap/packer"), ("nix", "install with: nix profile install nixpkgs#packer")])
def test_install_hint_names_the_hosts_manager(manager, want):
    assert install_hint("packer", manager).startswith(want)


def test_no_brew_on_linux_and_firmware_per_manager():
    assert "brew" not in install_hint("limactl", "apt") and "lima-vm.io/docs/installation" in install_hint("limactl", "dnf")
    assert install_hint("limactl", "brew") == "install with: brew install lima"
    assert install_hint("uefi-x86_64", "dnf") == "install with: sudo dnf install edk2-ovmf"
    assert install_hint("qemu-img", "apt") == "install with: sudo apt-get install qemu-utils"
    assert install_hint("no-such-tool", "dnf") == "install no-such-tool with your package manager (dnf)"
    for tool, ways in INSTALL_HINTS.items():
        assert ways.get("apt") or ways.get("*"), tool  # every tool has a Debian answer


def test_package_manager_detection():
    def on(*progs):
        return lambda p: p in progs

    assert package_manager("linux", on("apt-get", "nix-env")) == "apt"
    assert package_manager("linux", on("dnf")) == "dnf" and package_manager("linux", on("yum")) == "dnf"
    assert package_manager("darwin", on("brew", "nix-env")) == "brew"
    assert package_manager("darwin", on("nix-env")) == "nix" and package_manager("linux", on()) is None
    assert parse_package_manager("linux", "/usr/bin/dnf\n/usr/bin/yum\n") == "dnf"
    assert parse_package_manager("darwin", "/opt/homebrew/bin/brew\n") == "brew"


def facts(os_name: str, machine: str, manager: str | None = None, **tools: bool) -> HostFacts:
    return HostFacts(os_name, machine, KvmFacts(True, True, True), os_name == "darwin",
                     tools={t: ToolInfo(t, found, "1.0" if found else None) for t, found in tools.items()},
                     package_manager=manager)


def test_build_hint_fits_the_host():
    x86, arm_mac = host_facts("linux", "x86_64"), host_facts("darwin", "arm64")
    assert build_hint(CFG, CFG.image("nixos-x86_64"), x86) == "build it first: invoke build nixos-x86_64"
    remote = build_hint(CFG, CFG.image("nixos-aarch64"), x86)
    assert "invoke build nixos-aarch64" not in remote  # this host refuses that build
    assert "invoke remote-sync-build HOST --image nixos-aarch64 && invoke remote-fetch HOST nixos-aarch64" in remote
    assert "--accel tcg" not in remote  # nix cannot emulate a foreign-arch disk build
    alma_arm = build_hint(CFG, CFG.image("almalinux10-aarch64"), x86)
    assert "remote-sync-build" in alma_arm and "invoke build almalinux10-aarch64 --accel tcg" in alma_arm
    assert "remote-sync-build" in build_hint(CFG, CFG.image("nixos-aarch64"), arm_mac)  # NixOS needs Linux
    assert build_hint(CFG, CFG.image("almalinux10-aarch64"), arm_mac) == "build it first: invoke build almalinux10-aarch64"


def test_build_hint_names_the_one_fitting_builder():
    raw = {**RAW, "builders": {"pi": {"host": "pi", "arch": "aarch64"}, "box": {"host": "box"}}}
    hint = build_hint(load(raw, ROOT), CFG.image("nixos-aarch64"), host_facts("linux", "x86_64"))
    assert "invoke remote-sync-build pi --image nixos-aarch64 && invoke remote-fetch pi nixos-aarch64" in hint
    assert "configured aarch64 builders: pi" in hint


ALL_TOOLS = ("packer", "qemu-img", "qemu-system-x86_64", "qemu-system-aarch64", "ssh", "rsync", "nix", "xorriso")


def test_doctor_hints_use_the_builders_manager_and_exit_codes():
    present = {t: True for t in ALL_TOOLS}
    fedora = facts("linux", "x86_64", "dnf", **{**present, "packer": False})
    rep = doctor.report(CFG, fedora)
    assert rep.exit_code == 127 and "sudo dnf install packer" in rep.problems[0] and "apt-get" not in rep.problems[0]
    assert rep.package_manager == "dnf" and "installs with dnf" in doctor.format_text(rep)
    everything = facts("linux", "x86_64", "apt", **present)
    assert doctor.report(CFG, everything).exit_code == 3  # no UEFI firmware in these facts
    from pipeline.host import probe

    firmware = probe(tools=[]).firmware  # this machine's real OVMF/AAVMF (setup.sh installs them)
    assert doctor.report(CFG, dataclasses.replace(everything, firmware=firmware)).exit_code == 0
