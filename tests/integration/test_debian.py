"""Debian 13 built for real: mmdebstrap from the Debian mirror the host's apt sources name, the
disk and both boot loaders made on the host, booted under UEFI and BIOS with the boot test, and
built once on the loopback builder. The build is the session's (conftest.debian_build); every
test here only reads it, boots it with -snapshot, or works on a copy."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_file
from pipeline.model import Firmware
from pipeline.output import artifacts
from pipeline.render import debian as render
from pipeline.vm.boottest import SshGuest, boot_test
from pipeline.vm.lifecycle import staged_target
from tests.support import (
    NEEDS_PTY,
    ROOT,
    invoke,
    project_copy,
    published_copy,
    require_tool,
    write_config,
)
from tests.support.sshd import SshHost

pytestmark = [pytest.mark.slow,
              pytest.mark.needs_root("mmdebstrap --mode=root installs the packages as root; GRUB's tools run in a chroot")]
IMAGE = "debian13-x86_64"


def _out(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def _raw(qcow2: Path, dest: Path) -> Path:
    raw = dest / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(raw)], check=True, timeout=300)
    return raw


def _debugfs(raw: Path, request: str) -> str:
    """debugfs on the root file system inside the disk file (at the root partition's offset)."""
    res = subprocess.run(["debugfs", "-R", request, f"{raw}?offset={render.ROOT_START}"], capture_output=True,
                         text=True, timeout=60)
    return res.stdout


def _config(output: Path, firmware: Firmware | None = None):  # type: ignore[no-untyped-def]
    """The project's configuration with its output in `output` (and the image's firmware)."""
    cfg = load_file(ROOT / "invoke.yaml")
    images = dict(cfg.images)
    if firmware is not None:
        images[IMAGE] = dataclasses.replace(images[IMAGE], firmware=firmware)
    return dataclasses.replace(cfg, defaults=dataclasses.replace(cfg.defaults, output_dir=str(output)), images=images)


def test_the_image_holds_a_whole_debian_and_no_identity(debian_build, tmp_path):
    _, out = debian_build
    image_dir = out / IMAGE
    manifest = artifacts.read_manifest(image_dir)
    assert manifest is not None
    packages = {p["name"]: p for p in manifest["packages"]}
    assert len(packages) > 150
    for name in ("systemd", "openssh-server", "sudo", "cloud-init", "qemu-guest-agent", "linux-image-cloud-amd64",
                 "grub-pc-bin", "grub-efi-amd64-bin"):
        assert name in packages, name
    systemd = packages["systemd"]["purl"]
    assert systemd.startswith("pkg:deb/debian/systemd@") and systemd.endswith("?arch=amd64&distro=debian-13")
    sbom = json.loads((image_dir / "sbom.cdx.json").read_text())
    assert systemd in {c.get("purl") for c in sbom["components"]}
    debian = manifest["debian"]
    assert debian["suite"] == "trixie" and debian["release"]["trixie"]["date"]
    assert set(manifest["input_parts"]) >= {"debian:release:trixie", "debian:release:trixie-updates", "debian:mirror"}

    raw = _raw(image_dir / f"{IMAGE}.qcow2", tmp_path)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    lay = render.layout(load_file(ROOT / "invoke.yaml").image(IMAGE))
    assert table["label"] == "gpt" and table["id"] == lay.disk_guid.upper()
    kinds = {p["node"][-2:].lstrip("w"): p["type"] for p in table["partitions"]}
    assert kinds == {"1": render.ROOT_TYPE[lay.arch], "14": render.BIOS_BOOT_TYPE, "15": render.ESP_TYPE}
    with open(raw, "rb") as disk:
        assert b"GRUB" in disk.read(512)  # boot.img in the MBR (BIOS)
    esp = subprocess.run(["mdir", "-b", "-i", f"{raw}@@{render.ESP[0]}", "::/EFI/BOOT"], capture_output=True,
                         text=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert "BOOTX64.EFI" in esp.stdout, esp.stdout + esp.stderr  # GRUB for UEFI (removable path)

    assert "Size: 0" in _debugfs(raw, "stat /etc/machine-id")
    assert "ssh_host_" not in _debugfs(raw, "ls /etc/ssh")
    assert "datasource_list: [ NoCloud, None ]" in _debugfs(raw, "cat /etc/cloud/cloud.cfg.d/90-imagepipe.cfg")
    assert f"URIs: {debian['mirror']}" in _debugfs(raw, "cat /etc/apt/sources.list.d/debian.sources")
    assert "core.img" in _debugfs(raw, "ls /boot/grub/i386-pc")
    timers = _debugfs(raw, "ls /etc/systemd/system/timers.target.wants")
    assert "apt-daily" not in timers and "fstrim.timer" in timers
    assert "ntp" not in " ".join(packages) and "systemd-timesyncd" not in packages and "chrony" not in packages


def test_uefi_boot_keeps_the_contract_with_systemd_running_and_the_agent(debian_build):
    config, _ = debian_build
    res = invoke(["test-image", IMAGE], config, timeout=1200)
    out = _out(res)
    assert res.returncode == 0, out
    for requirement in ("key-login", "systemd-running", "sudo", "root-ssh", "serial-console", "guest-agent", "power-off"):
        assert f"contract {requirement}: passed" in out, requirement
    assert "this image runs no agent" not in out  # guest-ping answered for real


def test_bios_boot_of_a_bigger_disk_grows_the_root(debian_build, tmp_path):
    """The same image under SeaBIOS (GRUB's core.img from the BIOS boot partition), on a disk
    enlarged to 4 GiB: cloud-init grows the root partition and its file system on first boot."""
    _, out = debian_build
    cfg = _config(out, Firmware.BIOS)
    image = cfg.image(IMAGE)
    bigger = tmp_path / "bigger.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str((out / IMAGE / f"{IMAGE}.qcow2").resolve()), str(bigger), "4G"], check=True, timeout=60)
    sizes: list[str] = []

    def grown(guest: SshGuest) -> list[str]:
        rc, text = guest.run(["timeout", "300", "cloud-init", "status", "--wait"])
        rc, text = guest.run(["findmnt", "--bytes", "--noheadings", "--output", "SIZE", "/"])
        sizes.append(text.strip())
        return [] if rc == 0 and int(text.strip() or 0) > (3 << 30) else [f"root did not grow: {text.strip()!r}"]

    said: list[str] = []
    boot_test(cfg, staged_target(image, bigger, None, "bigger"), out, also=grown, say=said.append)
    assert "debian13-x86_64: contract systemd-running: passed" in said
    assert sizes and int(sizes[0]) > (3 << 30)


def test_a_second_build_from_the_same_inputs_is_bit_for_bit_the_same(debian_build, tmp_path):
    """Reproducibility: the same inputs (the mirror's Release files, the packages, the key, the
    config) built again, in another folder, give the session's image byte for byte."""
    config, out = published_copy(debian_build, tmp_path)
    first = artifacts.read_manifest(out / IMAGE)
    res = invoke(["build", IMAGE, "--force"], config, timeout=2400)
    assert res.returncode == 0, _out(res)[-4000:]
    second = artifacts.read_manifest(out / IMAGE)
    assert first is not None and second is not None and second["build_id"] != first["build_id"]
    assert second["debian"]["release"] == first["debian"]["release"], "the mirror published between the builds"
    assert second["packages"] == first["packages"]
    assert second["artifact"]["sha256"] == first["artifact"]["sha256"], \
        f"not reproducible: `invoke check-reproducible {IMAGE}` says where the two builds differ"


def test_if_changed_asks_the_mirror_and_says_so_when_it_cannot(debian_build, tmp_path):
    config, out = debian_build
    res = invoke(["build", IMAGE, "--if-changed"], config, timeout=300)
    assert res.returncode == 0 and "up to date" in _out(res), _out(res)
    away = write_config(tmp_path / "away.yaml", out, {"images": {IMAGE: {"mirror": "http://127.0.0.1:9/debian"}}})
    before = artifacts.current_build(out / IMAGE)
    res = invoke(["build", IMAGE, "--if-changed"], away, timeout=300)
    assert res.returncode == 1, _out(res)
    assert "the mirror http://127.0.0.1:9/debian does not answer" in res.stderr and "Traceback" not in _out(res)
    assert artifacts.current_build(out / IMAGE) == before


@NEEDS_PTY
def test_remote_sync_build_on_the_loopback_builder_then_diff(debian_build, tmp_path):
    """remote-sync-build hal9000 of debian13-x86_64 with one more package, fetched into a copy of
    the session's output: `invoke diff` shows the package added between the two builds."""
    for tool, pkg in (("rsync", "rsync"), ("ssh", "openssh-client")):
        require_tool(tool, pkg)
    host = SshHost(tmp_path / "sshd").start()
    try:
        known = tmp_path / "known_hosts"
        known.write_text(host.known_hosts_line())
        ssh_config = host.client_config(tmp_path / "ssh_config", known)
        config, out = published_copy(debian_build, tmp_path / "here", extra={
            "ssh_config_path": str(ssh_config),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(tmp_path / "builder"), "arch": "x86_64"}}})
        project = project_copy(tmp_path / "project")  # what the builder gets: invoke.yaml asks for `less` too
        text = (project / "invoke.yaml").read_text()
        (project / "invoke.yaml").write_text(text.replace("    packages: []", "    packages: [less]", 1))
        first = artifacts.read_manifest(out / IMAGE)
        res = invoke(["remote-sync-build", "hal9000", "--image", IMAGE], config, timeout=2400, cwd=project)
        assert res.returncode == 0, _out(res)[-4000:]
        assert "[hal9000]" in _out(res) and "assemble root (mmdebstrap" in _out(res)
        res = invoke(["remote-fetch", "hal9000", IMAGE], config, timeout=600, cwd=project)
        assert res.returncode == 0 and "blake3 verified while receiving" in _out(res), _out(res)
        manifest = artifacts.read_manifest(out / IMAGE)
        assert manifest is not None and first is not None and manifest["build_id"] != first["build_id"]
        assert manifest["fetched"]["verified"]["hash"] == "blake3"  # the hash the builder recorded at publish
        sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out / IMAGE / "current", capture_output=True,
                              text=True)
        assert sums.returncode == 0, sums.stdout + sums.stderr  # and what users check still holds
        assert manifest["fetched"]["from"] == "hal9000" and "less" in {p["name"] for p in manifest["packages"]}
        diff = invoke(["diff", IMAGE], config, timeout=120, cwd=project)
        assert diff.returncode == 0 and "less" in _out(diff) and "added" in _out(diff).lower(), _out(diff)
    finally:
        host.stop()
        shutil.rmtree(tmp_path / "builder", ignore_errors=True)


def _nothing_published(out: Path) -> None:
    image_dir = out / IMAGE
    assert not (image_dir / "current").exists() and not list(image_dir.glob(".staging/*"))


def test_a_package_the_mirror_lacks_is_named_and_nothing_is_published(tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path / "out",
                          {"images": {IMAGE: {"packages": ["imagepipe-no-such-package"]}}})
    res = invoke(["build", IMAGE], config, timeout=1800)
    assert res.returncode == 1, _out(res)[-3000:]
    assert "no package imagepipe-no-such-package in Debian 13 (trixie) on " in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in _out(res)
    _nothing_published(tmp_path / "out")


class _EmptyMirror:
    """A loopback HTTP server with nothing in it: every suite is missing (404)."""

    def __enter__(self) -> str:
        import functools
        import http.server
        import threading

        (root := Path(self.folder)).mkdir(exist_ok=True)
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/debian"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_mirror_that_lacks_the_suite_or_does_not_answer_stops_the_build(tmp_path):
    with _EmptyMirror(tmp_path / "www") as empty:
        config = write_config(tmp_path / "c.yaml", tmp_path / "out", {"images": {IMAGE: {"mirror": empty}}})
        res = invoke(["build", IMAGE], config, timeout=300)
    assert res.returncode == 1, _out(res)
    assert f"the mirror {empty} has no suite trixie" in res.stderr and "Traceback" not in _out(res)
    _nothing_published(tmp_path / "out")
    config = write_config(tmp_path / "d.yaml", tmp_path / "out", {"images": {IMAGE: {"mirror": "http://127.0.0.1:9/debian"}}})
    res = invoke(["build", IMAGE], config, timeout=300)
    assert res.returncode == 1 and "the mirror http://127.0.0.1:9/debian does not answer" in res.stderr, _out(res)
    _nothing_published(tmp_path / "out")
    bad = write_config(tmp_path / "e.yaml", tmp_path / "out", {"images": {IMAGE: {"version": "14"}}})
    res = invoke(["build", IMAGE], bad, timeout=60)
    assert res.returncode == 2 and "Debian '14' is not a release imagepipe builds" in res.stderr, _out(res)
