"""AlmaLinux templates against the real Packer, xorriso and QEMU installed here.

Packer 1.6.6 (Debian's) validates the Packer < 1.7 rendering; the current-Packer rendering is
checked structurally in tests/unit (current Packer cannot be installed on this machine). No
AlmaLinux ISO can be downloaded here, so the build test boots Packer's VM from a placeholder
ISO just far enough to see UEFI start and the SSH forward bound to loopback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import load_file
from pipeline.host import find_firmware, local_descriptors
from pipeline.render.kickstart import kickstart_path
from pipeline.render.packer import render_text
from tests.almalinux_support import ROOT

CFG = load_file(ROOT / "invoke.yaml")
NAMES = ["almalinux10-x86_64", "almalinux10-aarch64"]


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: {hint}"
    return path


def values(name: str, tmp: Path) -> dict[str, str]:
    """Real files for every variable without a default."""
    image = CFG.image(name)
    iso = tmp / "placeholder.iso"
    if not iso.exists():
        (tmp / "isoroot").mkdir(exist_ok=True)
        (tmp / "isoroot" / "README").write_text("not bootable\n")
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "PLACEHOLDER", "-o", str(iso), str(tmp / "isoroot")],
                       check=True, capture_output=True, timeout=60)
    key = tmp / "key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    fw = find_firmware(image.arch, os.environ, descriptors=local_descriptors())
    assert fw and fw.vars, "UEFI firmware missing: sudo apt-get install ovmf qemu-efi-aarch64"
    store = tmp / f"{name}-vars.fd"
    shutil.copyfile(fw.vars, store)
    return {
        "accelerator": "tcg", "cpu_model": "max", "output_dir": str(tmp / f"{name}-out"),
        "console_log": str(tmp / f"{name}-console.log"), "ssh_private_key_file": str(key),
        "iso_url": str(iso), "iso_checksum": "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest(),
        "kickstart_dir": str(kickstart_path(ROOT, image).parent),
        "efi_firmware_code": fw.code, "efi_firmware_vars": str(store),
    }


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
                         timeout=120, env={**os.environ, "CHECKPOINT_DISABLE": "1"}, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_packer_166_rejects_the_current_rendering(tmp_path: Path) -> None:
    """Why the legacy rendering exists: 1.6.6 does not know required_plugins."""
    template = tmp_path / "t.pkr.hcl"
    template.write_text(render_text(CFG.image(NAMES[0]), legacy=False))
    res = subprocess.run(packer_argv("validate", template, values(NAMES[0], tmp_path)), capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CHECKPOINT_DISABLE": "1"}, check=False)
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
    ks = kickstart_path(ROOT, CFG.image("almalinux10-aarch64"))
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


@pytest.mark.slow
def test_legacy_x86_build_starts_uefi_with_loopback_forwards(tmp_path: Path) -> None:
    """A real `packer build` (TCG) up to the firmware: pflash via -blockdev works, the serial
    console reaches var.console_log, and QEMU's SSH forward listens on 127.0.0.1 only."""
    name = NAMES[0]
    template = tmp_path / "t.pkr.hcl"
    template.write_text(render_text(CFG.image(name), legacy=True))
    vals = values(name, tmp_path)
    log = tmp_path / "packer.log"
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log),
           "PKR_VAR_ssh_password": "not-used-here"}
    proc = subprocess.Popen(packer_argv("build", template, vals), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    console = Path(vals["console_log"])
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and b"BdsDxe" not in (console.read_bytes() if console.exists() else b""):
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            time.sleep(2)
        assert b"BdsDxe" in console.read_bytes(), "UEFI never wrote to the serial console"
        qemu_line = next(line for line in log.read_text(errors="replace").splitlines() if "Executing /usr/bin/qemu" in line)
        assert "pflash0=fw-code,pflash1=fw-vars" in qemu_line and "read-only=on" in qemu_line
        assert "hostfwd=tcp:127.0.0.1:" in qemu_line
        assert "file=" + vals["output_dir"] in qemu_line, "Packer's own disk is still attached"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Packer's cleanup stops its QEMU
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
