"""The pure parts of pipeline.vm.*: the QEMU command line, ports, host keys, ssh argv, tables."""

from pathlib import Path

import pytest

from pipeline.base.errors import UsageError
from pipeline.firmware import FirmwareInfo
from pipeline.model import Accel, Arch, Firmware, Image
from pipeline.plan import AccelChoice
from pipeline.tasks.vm import remainder
from pipeline.vm.argv import BootSpec, RunOptions, qemu_argv
from pipeline.vm.boottest import BootTestResult, results_table
from pipeline.vm.lifecycle import BootTarget, boot_spec, reset_known_hosts, staged_target
from pipeline.vm.ssh import host_key_alias, parse_keyscan, ssh_argv
from pipeline.vm.state import UNIX_PATH_MAX, StatePaths, is_our_qemu, pick_port

STATE = StatePaths(Path("/out/img/run"))
DISK = Path("/out/img/builds/1/img.qcow2")
FW = {
    Arch.X86_64: FirmwareInfo(Arch.X86_64, "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd", "t"),
    Arch.AARCH64: FirmwareInfo(Arch.AARCH64, "/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd", "t"),
}


def image(arch=Arch.X86_64, firmware=Firmware.UEFI, distro="almalinux", **kw):
    return Image(name=f"img-{arch.value}", distro=distro, arch=arch, firmware=firmware, memory=256, cpus=1, **kw)


def after(argv, flag):
    """Every value that follows `flag` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("accel", [Accel.KVM, Accel.HVF, Accel.TCG])
@pytest.mark.parametrize("arch", [Arch.X86_64, Arch.AARCH64])
@pytest.mark.parametrize("firmware", [Firmware.UEFI, Firmware.BIOS])
def test_argv_table(accel, arch, firmware):
    img = image(arch, firmware)
    choice = AccelChoice(accel, "test")
    if arch is Arch.AARCH64 and firmware is Firmware.BIOS:
        with pytest.raises(UsageError, match="no BIOS"):
            qemu_argv(img, choice, None, DISK, STATE, 2222)
        return
    fw = FW[arch] if firmware is Firmware.UEFI else None
    argv = qemu_argv(img, choice, fw, DISK, STATE, 2222)
    assert argv[0] == f"qemu-system-{arch.value}"
    assert after(argv, "-machine") == [("q35" if arch is Arch.X86_64 else "virt,gic-version=max")]
    assert after(argv, "-accel") == [accel.value]
    assert after(argv, "-cpu") == ["max" if accel is Accel.TCG else "host"]
    assert after(argv, "-smp") == ["1"] and after(argv, "-m") == ["256"]
    assert (after(argv, "-boot") == ["strict=on"]) == (arch is Arch.AARCH64)
    pflash = [d for d in after(argv, "-drive") if d.startswith("if=pflash")]
    if firmware is Firmware.UEFI:
        assert pflash == [f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
                          "if=pflash,format=raw,unit=1,file=/out/img/run/efivars.fd"]
    else:
        assert pflash == [] and "-bios" not in argv
    assert "if=none,id=disk0,format=qcow2,file=/out/img/builds/1/img.qcow2" in after(argv, "-drive")
    # first in the boot order (what -boot strict=on acts on); a full host disk pauses the guest
    assert "virtio-blk-pci,drive=disk0,id=boot-disk,bootindex=0,werror=enospc,rerror=report" in after(argv, "-device")
    assert after(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert ("socket,id=console,path=/out/img/run/serial.sock,server=on,wait=off,logfile=/out/img/run/console.log"
            in after(argv, "-chardev"))
    assert after(argv, "-serial") == ["chardev:console"]
    assert "socket,id=qmp,path=/out/img/run/qmp.sock,server=on,wait=off" in after(argv, "-chardev")
    assert "chardev=qmp,mode=control" in after(argv, "-mon")
    assert after(argv, "-display") == ["none"] and after(argv, "-pidfile") == ["/out/img/run/pid"]
    assert argv[-1] == "-daemonize" and "-snapshot" not in argv and "-kernel" not in argv
    assert argv == qemu_argv(img, choice, fw, DISK, STATE, 2222)  # pure


def test_every_forward_is_loopback_only():
    argv = qemu_argv(image(), AccelChoice(Accel.TCG, "t"), FW[Arch.X86_64], DISK, STATE, 40001)
    forwards = [n for n in after(argv, "-netdev")]
    assert forwards and all("hostfwd=tcp:127.0.0.1:" in n for n in forwards)
    assert "0.0.0.0" not in " ".join(argv) and "hostfwd=tcp::" not in " ".join(argv)


def test_direct_kernel_boot_needs_no_firmware():
    boot = BootSpec(Path("/b/vmlinuz"), Path("/b/initrd.img"), "console=ttyS0 quiet")
    img = image(distro="demo", firmware=Firmware.BIOS)
    argv = qemu_argv(img, AccelChoice(Accel.TCG, "t"), None, DISK, STATE, 2224, boot=boot)
    assert after(argv, "-kernel") == ["/b/vmlinuz"] and after(argv, "-initrd") == ["/b/initrd.img"]
    assert after(argv, "-append") == ["console=ttyS0 quiet"]
    assert not [d for d in after(argv, "-drive") if "pflash" in d]
    # -kernel holds the firmware's first boot place: the disk takes no bootindex (QEMU refuses two)
    assert not [d for d in after(argv, "-device") if "bootindex" in d]


def test_options_snapshot_gui_foreground():
    img = image(Arch.AARCH64)
    choice = AccelChoice(Accel.TCG, "t")
    argv = qemu_argv(img, choice, FW[Arch.AARCH64], DISK, STATE, 2222,
                     opts=RunOptions(snapshot=True, gui=True, foreground=True))
    assert "-snapshot" in argv and "-daemonize" not in argv and "-display" not in argv
    # a full host disk pauses the guest here too: the boot test sees the pause on QMP and says so
    assert any(d.startswith("virtio-blk-pci,drive=disk0,") and "werror=enospc" in d for d in after(argv, "-device"))
    assert "virtio-gpu-pci" in after(argv, "-device") and "usb-kbd" in after(argv, "-device")
    assert "stdio,id=console,mux=on,signal=off,logfile=/out/img/run/console.log" in after(argv, "-chardev")
    assert after(argv, "-pidfile") == ["/out/img/run/pid"]  # status/stop work for an attached VM too


def test_code_only_firmware_uses_bios_flag():
    fw = FirmwareInfo(Arch.AARCH64, "/opt/QEMU_EFI.fd", None, "QEMU_EFI_AARCH64")
    argv = qemu_argv(image(Arch.AARCH64), AccelChoice(Accel.HVF, "t"), fw, DISK, STATE, 2222)
    assert after(argv, "-bios") == ["/opt/QEMU_EFI.fd"]


def test_commas_in_paths_are_escaped():
    state = StatePaths(Path("/o,ut/run"))
    argv = qemu_argv(image(), AccelChoice(Accel.TCG, "t"), FW[Arch.X86_64], Path("/a,b.qcow2"), state, 2222)
    assert "if=none,id=disk0,format=qcow2,file=/a,,b.qcow2" in after(argv, "-drive")
    assert "socket,id=console,path=/o,,ut/run/serial.sock,server=on,wait=off,logfile=/o,,ut/run/console.log" in after(
        argv, "-chardev")


def test_long_state_path_gets_a_short_qmp_socket():
    deep = StatePaths(Path("/tmp/" + "x" * 120 + "/run"))
    assert len(str(deep.qmp)) <= UNIX_PATH_MAX and deep.qmp.name.endswith(".qmp")
    assert deep.qmp == StatePaths(Path("/tmp/" + "x" * 120 + "/run")).qmp  # every task finds the same one
    assert STATE.qmp == Path("/out/img/run/qmp.sock")


def test_pick_port():
    assert pick_port(2222, is_free=lambda p: True, fallback=lambda: 40000) == 2222
    assert pick_port(2222, is_free=lambda p: False, fallback=lambda: 40000) == 40000


@pytest.mark.parametrize("prev,new,snapshot,ephemeral,want", [
    ("b1", "b1", False, False, False),   # same build, persistent disk: keep the pin
    ("b1", "b2", False, False, True),    # rebuilt image: new host keys
    (None, "b1", False, False, True),    # first run
    ("b1", "b1", True, False, True),     # -snapshot: a first boot regenerates keys each time
    ("b1", "b1", False, True, True),     # initramfs guest: new keys on every boot
])
def test_reset_known_hosts(prev, new, snapshot, ephemeral, want):
    assert reset_known_hosts(prev, new, snapshot, ephemeral) is want


def test_parse_keyscan_rewrites_host_to_alias():
    out = ("# 127.0.0.1:2224 SSH-2.0-dropbear\n"
           "[127.0.0.1]:2224 ssh-ed25519 AAAAC3Nza\n"
           "[127.0.0.1]:2224 ecdsa-sha2-nistp256 AAAAE2Vj\n")
    assert parse_keyscan(out, "imagepipe-demo") == [
        "imagepipe-demo ssh-ed25519 AAAAC3Nza", "imagepipe-demo ecdsa-sha2-nistp256 AAAAE2Vj"]
    assert parse_keyscan("", "x") == []


def test_ssh_argv_is_strict_and_private():
    argv = ssh_argv("demo", STATE, Path("/k/id"), "root", 2224, ["uname", "-m"])
    text = " ".join(argv)
    assert "StrictHostKeyChecking=yes" in text and "StrictHostKeyChecking=no" not in text
    assert "UserKnownHostsFile=/out/img/run/known_hosts" in text and "/dev/null" not in text.replace(
        "GlobalKnownHostsFile=/dev/null", "")
    assert "~/.ssh/known_hosts" not in text and f"HostKeyAlias={host_key_alias('demo')}" in text
    assert argv[-3:] == ["root@127.0.0.1", "uname", "-m"] and after(argv, "-p") == ["2224"]
    assert after(argv, "-i") == ["/k/id"] and argv[1:3] == ["-F", "none"]


def test_is_our_qemu():
    cmd = "/usr/bin/qemu-system-x86_64 -name demo -chardev file,id=console,path=/out/img/run/console.log"
    assert is_our_qemu(cmd, STATE)
    assert not is_our_qemu(cmd, StatePaths(Path("/other/run")))
    assert not is_our_qemu("/usr/bin/python3 /out/img/run/console.log", STATE)  # pid reused
    assert not is_our_qemu(None, STATE)


def test_boot_spec_resolves_relative_to_build():
    spec = boot_spec({"kernel": "vmlinuz", "initrd": "initrd.img", "append": "quiet"}, Path("/b/1"))
    assert spec == BootSpec(Path("/b/1/vmlinuz"), Path("/b/1/initrd.img"), "quiet")
    absolute = boot_spec({"kernel": "/s/vmlinuz", "initrd": "/s/initrd.img", "append": ""}, Path("/b/1"))
    assert absolute is not None and absolute.kernel == Path("/s/vmlinuz")
    assert boot_spec(None, Path("/b")) is None


def test_staged_target_keeps_the_boot_spec():
    img = image(distro="demo", firmware=Firmware.BIOS)
    boot = {"kernel": "vmlinuz", "initrd": "initrd.img", "append": "quiet"}
    beside = staged_target(img, Path("/stage/img.qcow2"), boot, "b7")
    assert beside == BootTarget(img, Path("/stage/img.qcow2"), "qcow2", "b7",
                                BootSpec(Path("/stage/vmlinuz"), Path("/stage/initrd.img"), "quiet"))
    elsewhere = staged_target(img, Path("/stage/out/img.qcow2"), boot, base=Path("/stage"))
    assert elsewhere.boot is not None and elsewhere.boot.initrd == Path("/stage/initrd.img")
    assert staged_target(image(), DISK, None).boot is None


def test_results_table():
    table = results_table([BootTestResult("demo-x86_64", "passed", 12.34, "build 1"),
                           BootTestResult("nixos-x86_64", "not built"),
                           BootTestResult("alma", "failed", 3.0, "no SSH answer\nconsole...")])
    lines = table.splitlines()
    assert lines[0].split() == ["IMAGE", "RESULT", "TIME", "DETAIL"]
    assert lines[1].split() == ["demo-x86_64", "passed", "12.3s", "build", "1"]
    assert lines[2].split() == ["nixos-x86_64", "not", "built", "-"]
    assert lines[3].endswith("no SSH answer") and len(lines) == 4


def test_remainder_keeps_words():
    assert remainder(["ssh", "demo", "--", "echo", "a b", "--", "x"]) == ["echo", "a b", "--", "x"]
    assert remainder(["ssh", "demo"]) == []
