"""The real offline demo build end to end: packer + QEMU (the accelerator auto gives here) + SSH + provisioner + publish."""

import json
import subprocess

import blake3
import pytest

from pipeline.base.errors import AccelUnavailable
from pipeline.model import Accel
from pipeline.output.artifacts import verify_published
from tests.support import accel_here, require_tool

pytestmark = pytest.mark.slow


def test_published_image_verifies_and_holds_the_marker(demo_build, tmp_path):
    _, out = demo_build
    image_dir = out / "demo-x86_64"
    published = image_dir / "demo-x86_64.qcow2"
    assert published.is_symlink() and published.resolve().is_file()
    subprocess.run(["qemu-img", "check", str(published)], check=True, capture_output=True)
    manifest = json.loads((image_dir / "manifest.json").read_text())
    choice = accel_here(Accel.AUTO, purpose="build")  # what auto gives for this host's facts
    assert not isinstance(choice, AccelUnavailable), choice
    assert manifest["image"] == "demo-x86_64" and manifest["accelerator"]["name"] == choice.accel.value
    assert manifest["accelerator"]["reason"] == choice.reason
    assert manifest["tools"]["packer"] and manifest["artifact"]["format"] == "qcow2"
    assert verify_published(image_dir) == manifest["artifact"]["sha256"]
    # SHA256SUMS works with the standard tool, in the build folder and in output/<image>/ (#13)
    for where in (image_dir / "current", image_dir):
        subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=where, check=True, capture_output=True)
    # and the BLAKE3 of every file it names, taken in the same read, for fetches to verify with
    sums = dict(reversed(line.split("  ")) for line in (image_dir / "SHA256SUMS").read_text().splitlines())
    assert set(manifest["blake3"]) == set(sums)
    for name, b3 in manifest["blake3"].items():
        assert blake3.blake3((image_dir / "current" / name).read_bytes()).hexdigest() == b3
    # read the provisioner's marker back from the ext filesystem on the disk
    require_tool("debugfs", "e2fsprogs")
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(published), str(raw)], check=True)
    marker = subprocess.run(["debugfs", "-R", "cat /imagepipe-marker", str(raw)], capture_output=True, text=True)
    # the marker names the image, never the build or a date: the image is reproducible
    assert marker.stdout.strip() == "imagepipe demo image demo-x86_64"


def test_manifest_and_logs_hold_no_secrets(demo_build):
    _, out = demo_build
    image_dir = out / "demo-x86_64"
    manifest_text = (image_dir / "manifest.json").read_text()
    log_dir = image_dir / "logs" / json.loads(manifest_text)["build_id"]
    build_log = (log_dir / "build.log").read_text()
    assert "Connected to SSH" in build_log and (log_dir / "console.log").exists()
    private_key = (out / ".keys" / "imagepipe_ed25519").read_text()
    for text in (manifest_text, build_log, (image_dir / "current" / "template.pkr.hcl").read_text()):
        assert "$6$" not in text and "PRIVATE KEY" not in text and private_key not in text


def test_build_folder_layout(demo_build):
    _, out = demo_build
    image_dir = out / "demo-x86_64"
    current = (image_dir / "current").resolve()
    assert current.parent == (image_dir / "builds").resolve()
    assert {"vmlinuz", "initrd.img", "manifest.json", "SHA256SUMS", "template.pkr.hcl", "sbom.cdx.json"} <= {
        p.name for p in current.iterdir()}
    assert not (current / "collected").exists()
    assert not (image_dir / ".staging").exists()
    assert not (current / "packer_cache").exists() and not (current / "inputs").exists()
