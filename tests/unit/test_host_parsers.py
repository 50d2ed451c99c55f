import json

from pipeline.firmware import choose_descriptor, find_firmware, parse_descriptor
from pipeline.host import (
    parse_cpu_features,
    parse_cpu_flags,
    parse_cpu_virt,
    parse_df,
    parse_hvf,
    parse_kvm_open,
    parse_uname,
    parse_version,
)
from pipeline.model import Arch


def test_uname():
    assert parse_uname("Linux x86_64\n") == ("linux", "x86_64")
    assert parse_uname("Darwin arm64") == ("darwin", "arm64")
    assert parse_uname("") == ("unknown", "unknown")


def test_cpu_virt_flags():
    assert parse_cpu_virt("processor: 0\nflags\t\t: fpu vme sse avx2\n", "x86_64") is False
    assert parse_cpu_virt("flags\t\t: fpu vmx sse\n", "x86_64") is True
    assert parse_cpu_virt("flags : svm\n", "x86_64") is True
    assert parse_cpu_virt("Features: fp asimd\n", "aarch64") is None


def test_cpu_features_x86_and_arm64():
    assert parse_cpu_features("processor: 0\nflags\t\t: fpu aes avx2\nflags : other\n") == {"fpu", "aes", "avx2"}
    assert parse_cpu_features("processor: 0\nFeatures\t: fp asimd aes pmull\n") == {"fp", "asimd", "aes", "pmull"}
    assert parse_cpu_features("") == frozenset()
    assert parse_cpu_flags("flags : fpu sse\n", "x86_64") == {"fpu", "sse"}
    assert parse_cpu_flags("Features: fp asimd\n", "aarch64") is None


def test_kvm_open():
    assert parse_kvm_open("ok\n") == (True, True, "")
    assert parse_kvm_open("denied:Permission denied\n") == (True, False, "Permission denied")
    assert parse_kvm_open("missing\n")[:2] == (False, False)


def test_hvf():
    assert parse_hvf("1\n", 0) and not parse_hvf("0\n", 0) and not parse_hvf("", 1)


def test_versions():
    assert parse_version("packer", "Packer v1.6.6\n") == "1.6.6"
    assert parse_version("qemu-img", "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright") == "7.2.22"
    assert parse_version("nix", "nix (Nix) 2.8.0\n") == "2.8.0"
    assert parse_version("ssh", "OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15") == "9.2p1"
    assert parse_version("rsync", "rsync  version 3.2.7  protocol version 31\n") == "3.2.7"


def test_df():
    out = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 100 50 2048 50% /\n"
    assert parse_df(out) == 2048 * 1024
    assert parse_df("garbage") is None


DESC = {
    "description": "OVMF", "interface-types": ["uefi"],
    "mapping": {"device": "flash", "executable": {"filename": "/fw/CODE.fd", "format": "raw"},
                "nvram-template": {"filename": "/fw/VARS.fd", "format": "raw"}},
    "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
    "features": ["acpi-s3"],
}


def test_descriptor_choice_skips_secure_boot():
    secure = json.loads(json.dumps(DESC))
    secure["mapping"]["executable"]["filename"] = "/fw/SECURE.fd"
    secure["features"] = ["secure-boot", "enrolled-keys"]
    descs = [("40-secure.json", parse_descriptor(json.dumps(secure))), ("60-plain.json", parse_descriptor(json.dumps(DESC)))]
    fw = choose_descriptor(descs, Arch.X86_64)
    assert fw and fw.code == "/fw/CODE.fd" and fw.vars == "/fw/VARS.fd" and "60-plain" in fw.source
    assert choose_descriptor(descs, Arch.AARCH64) is None
    assert parse_descriptor("{not json") is None


def test_firmware_order_descriptor_then_known_then_env():
    descs = [("60.json", parse_descriptor(json.dumps(DESC)))]
    exists = {"/fw/CODE.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd"}.__contains__
    assert find_firmware(Arch.X86_64, {}, exists, descs).code == "/fw/CODE.fd"
    assert find_firmware(Arch.X86_64, {}, {"/usr/share/OVMF/OVMF_CODE_4M.fd"}.__contains__, descs).source == "known path"
    env = {"QEMU_EFI_AARCH64": "/Users/me/edk2-aarch64-code.fd"}
    fw = find_firmware(Arch.AARCH64, env, {"/Users/me/edk2-aarch64-code.fd"}.__contains__, [])
    assert fw and fw.source == "QEMU_EFI_AARCH64"
    assert find_firmware(Arch.AARCH64, {}, lambda p: False, []) is None
