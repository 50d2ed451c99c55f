"""A NixOS-profile build with the real nix, from the fixture flake (nixpkgs cannot be fetched
here): the package list is the runtime closure of the system's toplevel as `nix path-info -r`
reports it, the SBOM validates, and a second format is converted from make-disk-image's one."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline.build import BuildOptions, build_image
from pipeline.output import artifacts
from tests.integration.test_nix_build import Recorder, project_config
from tests.support import NEEDS_NIX_STORE, NIX_CONFIG, require_tool
from tests.unit.test_packages import validate

pytestmark = [pytest.mark.slow, NEEDS_NIX_STORE]


@pytest.fixture(autouse=True)
def nix_ready(monkeypatch):
    require_tool("nix", "nix-bin")
    require_tool("qemu-img", "qemu-utils")
    monkeypatch.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)


def test_closure_packages_sbom_and_a_converted_format(tmp_path):
    from pipeline.config import load

    root = tmp_path / "proj"
    project_config(root)  # copies the fixture flake (with a fresh nonce) into the project
    image = {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "flake": "fixture",
             "users": [{"name": "admin", "sudo": True}], "ssh_user": "admin", "formats": ["qcow2", "vdi"]}
    cfg = load({"images": {"nixos-x86_64": image}}, root=root)
    progress = Recorder()
    result = build_image(cfg, cfg.image("nixos-x86_64"), BuildOptions(), progress=progress, say=lambda _m: None)
    manifest = result.manifest
    assert manifest is not None
    names = {(p["name"], p["version"]) for p in manifest["packages"]}
    assert {("hello", "2.12.1"), ("openssh", "9.9p1"), ("nixos-system-nixos-x86_64", "26.05")} <= names
    for p in manifest["packages"]:
        assert p["type"] == "nix" and p["path"].startswith("/nix/store/") and p["purl"].startswith("pkg:nix/")
    closure = subprocess.run(["nix", "--extra-experimental-features", "nix-command flakes", "path-info", "-r",
                              f"{root / 'fixture'}#nixosConfigurations.nixos-x86_64.config.system.build.toplevel"],
                             capture_output=True, text=True, check=True, timeout=300).stdout.split()
    assert sorted(p["path"] for p in manifest["packages"]) == sorted(closure)
    image_dir = cfg.output_dir / "nixos-x86_64"
    validate(json.loads((image_dir / "sbom.cdx.json").read_text()))
    assert [a["file"] for a in manifest["artifacts"]] == ["nixos.qcow2", "nixos.vdi"]
    assert "convert to vdi (qemu-img convert, verify)" in [e.message for e in progress.events if e.kind == "step"]
    assert artifacts.verify(image_dir / "nixos.vdi", "vdi").sha256 == manifest["artifacts"][1]["sha256"]
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=image_dir, capture_output=True,
                          timeout=60, check=False).returncode == 0


def test_a_flake_without_the_system_falls_back_to_the_image_closure(tmp_path):
    """A user's own flake with no nixosConfigurations.<image>: the build still records a
    (here: empty-handed but honest) package list and says where it came from."""
    from pipeline.config import load

    root = tmp_path / "proj"
    project_config(root)
    flake = root / "fixture" / "flake.nix"
    text = flake.read_text()
    flake.write_text(text.replace("nixosConfigurations.nixos-x86_64.config.system.build.toplevel = toplevel;", ""))
    image = {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "flake": "fixture",
             "users": [{"name": "admin", "sudo": True}], "ssh_user": "admin"}
    cfg = load({"images": {"nixos-x86_64": image}}, root=root)
    progress = Recorder()
    result = build_image(cfg, cfg.image("nixos-x86_64"), BuildOptions(), progress=progress, say=lambda _m: None)
    assert any("has no nixosConfigurations.nixos-x86_64" in e.message for e in progress.events)
    names = [p["name"] for p in result.manifest["packages"]]
    assert names == ["fixture-nixos-image"], "the image output's own closure"
