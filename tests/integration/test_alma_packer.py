"""AlmaLinux templates against the real Packer, xorriso and QEMU installed here.

Packer 1.6.6 (Debian's) validates the Packer < 1.7 rendering; the current-Packer rendering is
checked structurally in tests/unit (current Packer cannot be installed on this machine). No
AlmaLinux ISO can be downloaded here, so the build test boots Packer's VM from a placeholder
ISO just far enough to see UEFI start and the SSH forward bound to loopback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.committed import render_text
from pipeline.config import load_file
from pipeline.distros.almalinux import PROFILE as ALMA
from pipeline.firmware import find_firmware, local_descriptors
from pipeline.model import Firmware
from tests.support import ROOT, keygen

CFG = load_file(ROOT / "invoke.yaml")
NAMES = ["almalinux10-x86_64", "almalinux10-aarch64"]
# x86_64 with `firmware: bios`: SeaBIOS, no pflash, no UEFI variables
BIOS_X86 = dataclasses.replace(CFG.image(NAMES[0]), firmware=Firmware.BIOS)


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: {hint}"
    return path


def values(name: str, tmp: Path, *, bios: bool = False) -> dict[str, str]:
    """Real files for every variable without a default (a BIOS rendering declares no UEFI ones)."""
    image = CFG.image(name)
    iso = tmp / "placeholder.iso"
    if not iso.exists():
        (tmp / "isoroot").mkdir(exist_ok=True)
        (tmp / "isoroot" / "README").write_text("not bootable\n")
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "PLACEHOLDER", "-o", str(iso), str(tmp / "isoroot")],
                       check=True, capture_output=True, timeout=60)
    key = tmp / "key"
    if not key.exists():
        keygen(key)
    fw = find_firmware(image.arch, os.environ, descriptors=local_descriptors())
    assert fw and fw.vars, "UEFI firmware missing: sudo apt-get install ovmf qemu-efi-aarch64"
    store = tmp / f"{name}-vars.fd"
    shutil.copyfile(fw.vars, store)
    uefi = {} if bios else {"efi_firmware_code": fw.code, "efi_firmware_vars": str(store)}
    return {**uefi,
        "accelerator": "tcg", "cpu_model": "max", "output_dir": str(tmp / f"{name}-out"),
        "console_log": str(tmp / f"{name}-console.log"), "ssh_private_key_file": str(key),
        "iso_url": str(iso), "iso_checksum": "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest(),
        "kickstart_dir": str(ALMA.kickstart_path(ROOT, image).parent),
        "packages_file": str(tmp / f"{name}-packages.tsv"),
    }


def packer_env(tmp: Path) -> dict[str, str]:
    """No phone-home, and Packer's cache (ISO copies, port locks) inside the test's folder."""
    return {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CACHE_DIR": str(tmp / "packer_cache")}


def packer_argv(cmd: str, template: Path, vals: dict[str, str]) -> list[str]:
    argv = [need("packer", "sudo apt-get install packer"), cmd]
    for k, v in vals.items():
        argv += ["-var", f"{k}={v}"]
    return argv + [str(template)]


@pytest.mark.parametrize("name", NAMES)
def test_packer_166_validates_the_legacy_rendering(name: str, tmp_path: Path) -> None:
    template = tmp_path / "t.pkr.hcl"
    template.write_text(render_text(CFG.image(name), legacy=True))
    res = subprocess.run(packer_argv("validate", template, values(name, tmp_path)), capture_output=True, text=True,
                         timeout=120, env=packer_env(tmp_path), cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_packer_166_validates_the_bios_rendering(tmp_path: Path) -> None:
    """`firmware: bios` on x86_64: the same template without the UEFI variables and pflash."""
    text = render_text(BIOS_X86, legacy=True)
    assert "efi_firmware" not in text and "pflash" not in text
    template = tmp_path / "t.pkr.hcl"
    template.write_text(text)
    res = subprocess.run(packer_argv("validate", template, values(NAMES[0], tmp_path, bios=True)),
                         capture_output=True, text=True, timeout=120, env=packer_env(tmp_path), cwd=tmp_path,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_packer_166_rejects_the_current_rendering(tmp_path: Path) -> None:
    """Why the legacy rendering exists: 1.6.6 does not know required_plugins."""
    template = tmp_path / "t.pkr.hcl"
    template.write_text(render_text(CFG.image(NAMES[0]), legacy=False))
    res = subprocess.run(packer_argv("validate", template, values(NAMES[0], tmp_path)), capture_output=True, text=True,
                         timeout=120, env=packer_env(tmp_path), cwd=tmp_path, check=False)
    assert res.returncode != 0 and "required_plugins" in res.stdout + res.stderr


@pytest.mark.parametrize("name", NAMES)
def test_committed_templates_are_packer_fmt_clean(name: str) -> None:
    path = ROOT / "packer" / "almalinux10" / CFG.image(name).arch.value / f"{name}.pkr.hcl"
    res = subprocess.run([need("packer", "sudo apt-get install packer"), "fmt", "-check", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout


def test_oemdrv_cd_built_like_packer_holds_the_kickstart(tmp_path: Path) -> None:
    """Packer's cd_files with xorriso: genisoimage mode, Rock Ridge + Joliet, volume id = cd_label."""
    xorriso = need("xorriso", "sudo apt-get install xorriso")
    ks = ALMA.kickstart_path(ROOT, CFG.image("almalinux10-aarch64"))
    staged = tmp_path / "cd"
    staged.mkdir()
    shutil.copy(ks, staged / ks.name)  # cd_files copies each file to the CD's root
    iso = tmp_path / "oemdrv.iso"
    subprocess.run([xorriso, "-as", "genisoimage", "-rock", "-joliet", "-volid", "OEMDRV", "-output", str(iso), str(staged)],
                   check=True, capture_output=True, timeout=60)
    info = subprocess.run([xorriso, "-indev", str(iso), "-pvd_info"], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    assert any(line.split(":", 1)[0].strip() == "Volume Id" and line.split(":", 1)[1].strip() == "OEMDRV"
               for line in info.splitlines()), info
    out = tmp_path / "ks.cfg"
    subprocess.run([xorriso, "-osirrox", "on", "-indev", str(iso), "-extract", "/ks.cfg", str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == ks.read_bytes()


class PartialBuild:
    """A real `packer build` (TCG) of a legacy rendering, stopped once the firmware has run."""

    def __init__(self, name: str, tmp: Path, *, bios: bool = False) -> None:
        template = tmp / "t.pkr.hcl"
        template.write_text(render_text(BIOS_X86 if bios else CFG.image(name), legacy=True))
        self.vals = values(name, tmp, bios=bios)
        self.log = tmp / "packer.log"
        self.console = Path(self.vals["console_log"])
        env = {**packer_env(tmp), "PACKER_LOG": "1", "PACKER_LOG_PATH": str(self.log),
               "PKR_VAR_ssh_password": "not-used-here"}
        self.proc = subprocess.Popen(packer_argv("build", template, self.vals), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env, cwd=tmp, start_new_session=True)

    def wait_console(self, marker: bytes, budget: float = 180) -> None:
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            if self.console.exists() and marker in self.console.read_bytes():
                return
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-2000:]
            time.sleep(2)
        raise AssertionError(f"{marker!r} never reached the serial console; log tail:\n"
                             + self.log.read_text(errors="replace")[-2000:])

    def log_line(self, needle: str) -> str:
        return next(line for line in self.log.read_text(errors="replace").splitlines() if needle in line)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # Packer's cleanup stops its QEMU
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.mark.slow
def test_legacy_x86_build_starts_uefi_with_loopback_forwards(tmp_path: Path) -> None:
    """Up to the firmware: pflash via -blockdev works, the serial console reaches
    var.console_log, QEMU's SSH forward listens on 127.0.0.1 and Packer's disk is attached."""
    build = PartialBuild(NAMES[0], tmp_path)
    try:
        build.wait_console(b"BdsDxe")
        qemu = build.log_line("Executing /usr/bin/qemu")
        assert "pflash0=fw-code,pflash1=fw-vars" in qemu and "read-only=on" in qemu
        assert "hostfwd=tcp:127.0.0.1:" in qemu
        assert "file=" + build.vals["output_dir"] in qemu, "Packer's own disk is still attached"
        text = build.log.read_text(errors="replace")
        assert "Starting HTTP server" in text
        build.wait_console(b"QEMU DVD-ROM")  # the firmware looked for the installer CD
    finally:
        build.stop()


@pytest.mark.slow
def test_legacy_x86_bios_build_starts_seabios_with_the_installer_cd(tmp_path: Path) -> None:
    """The BIOS rendering under the real Packer: QEMU runs without pflash (SeaBIOS, QEMU's own),
    with Packer's disk, the installer CD and the loopback forward; the HTTP server for ks.cfg is up."""
    build = PartialBuild(NAMES[0], tmp_path, bios=True)
    try:
        deadline = time.monotonic() + 120
        while not (build.log.exists() and "Executing /usr/bin/qemu" in build.log.read_text(errors="replace")):
            assert build.proc.poll() is None, build.log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "packer never started QEMU"
            time.sleep(1)
        qemu = build.log_line("Executing /usr/bin/qemu")
        assert "pflash" not in qemu and "-bios" not in qemu and "efi" not in qemu.lower()
        assert "hostfwd=tcp:127.0.0.1:" in qemu and "file=" + build.vals["output_dir"] in qemu
        assert "placeholder.iso" in qemu or "media=cdrom" in qemu
        assert "Starting HTTP server" in build.log.read_text(errors="replace")
    finally:
        build.stop()


@pytest.mark.slow
def test_legacy_aarch64_build_attaches_packers_oemdrv_cd(tmp_path: Path) -> None:
    """Packer itself builds the cd_files ISO (xorriso, label OEMDRV, ks.cfg inside); AAVMF starts
    and sees the installer CD on virtio-scsi first; no HTTP server, nothing typed."""
    xorriso = need("xorriso", "sudo apt-get install xorriso")
    build = PartialBuild(NAMES[1], tmp_path)
    try:
        build.wait_console(b"CD-ROM")
        cd_path = build.log_line("CD path:").split("CD path:", 1)[1].strip()
        info = subprocess.run([xorriso, "-indev", cd_path, "-pvd_info"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
        assert "OEMDRV" in info
        listing = subprocess.run([xorriso, "-indev", cd_path, "-ls", "/"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        assert "ks.cfg" in listing
        qemu = build.log_line("Executing /usr/bin/qemu-system-aarch64")
        assert "scsi-cd,drive=cdrom1" in qemu and cd_path in qemu and "virtio-blk-pci.werror=report" in qemu
        assert "strict=on" in qemu and "once=" not in qemu  # Packer's -boot (refused on aarch64) replaced
        text = build.log.read_text(errors="replace")
        assert "Starting HTTP server" not in text
        assert "Sending char" not in text and "Special code" not in text, "no key is typed over VNC"
    finally:
        build.stop()
