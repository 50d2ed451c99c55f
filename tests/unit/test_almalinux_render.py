"""AlmaLinux templates: structure of the current-Packer rendering and of the Packer < 1.7 one."""

from __future__ import annotations

import dataclasses

import hcl2
import pytest

from pipeline import distros
from pipeline.base.errors import ConfigError
from pipeline.committed import render_text
from pipeline.config import load as load_config
from pipeline.config import load_file
from pipeline.distros import almalinux as alma_profile
from pipeline.lint.checks import QEMU_PLUGIN_ARGS
from pipeline.model import Firmware
from pipeline.render import almalinux
from pipeline.render.packer import COMMON_VARIABLES
from tests.support import ROOT

CFG = load_file(ROOT / "invoke.yaml")
X86 = CFG.image("almalinux10-x86_64")
ARM = CFG.image("almalinux10-aarch64")

# Current Packer cannot be installed here: the modern rendering is checked against the argument
# names the qemu plugin documents (pipeline.lint.checks.QEMU_PLUGIN_ARGS) instead of by `packer validate`.
# What Packer 1.6.6 rejects (measured on this machine with packer validate).
REJECTED_BY_166 = {"cpu_model", "efi_boot", "firmware", "efi_firmware_code", "efi_firmware_vars",
                   "efi_drop_efivars", "use_pflash", "vnc_password", "sockets", "cores", "vtpm"}


def load(text: str) -> dict:  # type: ignore[type-arg]
    return hcl2.loads(text, serialization_options=hcl2.SerializationOptions(strip_string_quotes=True))


def source_of(text: str) -> dict:  # type: ignore[type-arg]
    return load(text)["source"][0]["qemu"]["almalinux"]


def variables_of(text: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {k: v for block in load(text)["variable"] for k, v in block.items()}


@pytest.mark.parametrize("image", [X86, ARM], ids=["x86_64", "aarch64"])
def test_modern_rendering_uses_only_plugin_arguments(image) -> None:  # type: ignore[no-untyped-def]
    text = render_text(image, legacy=False)
    doc = load(text)
    assert doc["packer"][0]["required_plugins"][0]["qemu"]["source"] == "github.com/hashicorp/qemu"
    src = source_of(text)
    unknown = {k for k in src if not k.startswith("__")} - QEMU_PLUGIN_ARGS
    assert unknown == set()
    assert src["efi_boot"] is True and src["efi_firmware_code"] == "${var.efi_firmware_code}"


@pytest.mark.parametrize("image", [X86, ARM], ids=["x86_64", "aarch64"])
def test_legacy_rendering_avoids_what_166_rejects(image) -> None:  # type: ignore[no-untyped-def]
    text = render_text(image, legacy=True)
    assert "packer" not in load(text)
    src = source_of(text)
    assert set(src) & REJECTED_BY_166 == set()
    flat = [" ".join(a) for a in src["qemuargs"]]
    assert any(a.startswith("-machine type=") and "pflash0=fw-code,pflash1=fw-vars" in a for a in flat)
    assert not any(a.startswith("-drive") for a in flat), "-drive would drop Packer's disk and CDs"


def test_common_and_host_variables_are_declared_without_secrets() -> None:
    for image in (X86, ARM):
        for legacy in (False, True):
            text = render_text(image, legacy=legacy)
            declared = variables_of(text)
            assert set(COMMON_VARIABLES) <= set(declared)
            assert {"iso_url", "iso_checksum", "kickstart_dir", "efi_firmware_code", "efi_firmware_vars"} <= set(declared)
            assert declared["ssh_password"]["sensitive"] is True and declared["ssh_password"]["default"] == ""
            for plain in ('"packer"', '"admin"'):
                assert f"ssh_password = {plain}" not in text


def test_artifact_lands_where_the_driver_looks() -> None:
    src = source_of(render_text(X86))
    assert src["vm_name"] == distros.artifact_name(X86)
    assert src["output_directory"] == "${var.output_dir}"
    assert src["accelerator"] == "${var.accelerator}"
    assert ["-cpu", "${var.cpu_model}"] in src["qemuargs"]
    assert ["-serial", "file:${var.console_log}"] in src["qemuargs"]


def test_x86_edits_the_grub_entry_and_serves_the_kickstart_locally() -> None:
    src = source_of(render_text(X86))
    typed = "".join(src["boot_command"])
    assert typed.startswith("<up>") and "e<wait" in typed and "<leftCtrlOn>x<leftCtrlOff>" in typed
    assert "inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg" in typed and "inst.text" in typed
    assert "console=ttyS0,115200n8" in typed
    assert src["http_bind_address"] == "127.0.0.1" and src["vnc_bind_address"] == "127.0.0.1"
    assert src["machine_type"] == "q35" and "cd_files" not in src
    assert ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"] in src["qemuargs"]


def test_aarch64_needs_no_typing() -> None:
    src = source_of(render_text(ARM))
    assert "boot_command" not in src and "http_directory" not in src
    assert src["cd_label"] == "OEMDRV" and src["cd_files"] == ["${var.kickstart_dir}/ks.cfg"]
    # the same machine as `invoke run` (plan.machine_type): GICv3 under TCG, the host's under KVM/HVF
    assert src["machine_type"] == "virt,gic-version=max" and src["qemu_binary"] == "qemu-system-aarch64"
    assert ["-boot", "strict=on"] in src["qemuargs"]  # replaces Packer's -boot, which aarch64 refuses
    assert ["-global", "virtio-blk-pci.werror=report"] in src["qemuargs"]


def test_bios_x86_has_no_uefi_parts() -> None:
    bios = dataclasses.replace(X86, firmware=Firmware.BIOS)
    for legacy in (False, True):
        text = render_text(bios, legacy=legacy)
        assert "efi_firmware" not in text and "pflash" not in text


@pytest.mark.parametrize("distro", ["almalinux", "nixos"])
def test_aarch64_bios_is_refused_when_the_config_loads(distro: str) -> None:
    raw = {"images": {"arm": {"distro": distro, "arch": "aarch64", "firmware": "bios"}}}
    with pytest.raises(ConfigError, match=r"images\.arm\.firmware: aarch64 machines boot with UEFI only"):
        load_config(raw, ROOT)


def test_build_password_is_optional_since_the_build_key_logs_in() -> None:
    assert alma_profile.ssh_password(X86, env={}) == "admin"
    assert alma_profile.ssh_password(X86, env={almalinux.PASSWORD_ENV: "s3cret"}) == "s3cret"
    other = "$6$saltsalt$" + "b" * 86
    changed = dataclasses.replace(X86, users=tuple(dataclasses.replace(u, password_hash=other) for u in X86.users))
    assert alma_profile.ssh_password(changed, env={}) == "", "no password: the staged kickstart authorizes the key"
