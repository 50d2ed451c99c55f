"""nixos/flake.nix evaluated by the real nix, with a STAND-IN for nixpkgs.

nixpkgs cannot be fetched here (no network; current nixpkgs also needs a newer nix), so
`--override-input nixpkgs` points the flake at tests/fixtures/fakenixpkgs: a tiny `lib`, a
`nixosSystem` that calls every module with the real params and forces the result, and a
make-disk-image.nix that returns its arguments. What this proves: the flake's own wiring
(params discovery, output names, the arguments make-disk-image gets) and that every module
evaluates against every committed params file. What it cannot prove: the NixOS options exist
in nixpkgs 25.05 (that needs `nix flake check` with network; see README).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.drivers import nix
from pipeline.run import run
from tests.conftest import NIX_CONFIG, ROOT, require_tool

IMAGE_MODULES = 5  # base, qemu-guest, disk, cloud-init and the one setting nixpkgs.hostPlatform


@pytest.fixture(autouse=True)
def nix_ready(monkeypatch):
    require_tool("nix", "nix-bin")
    monkeypatch.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    """Copies of nixos/ and the stand-in, outside git (nix would only see tracked files)."""
    shutil.copytree(ROOT / "nixos", tmp_path / "nixos")
    shutil.copytree(ROOT / "tests" / "fixtures" / "fakenixpkgs", tmp_path / "fake")
    return tmp_path / "nixos"


def evaluate(flake: Path, attr: str, apply: str | None = None, check: bool = True):
    argv = nix.nix_argv("eval", "--json", "--no-write-lock-file", "--override-input", "nixpkgs",
                        f"path:{flake.parent / 'fake'}", f"{flake}#{attr}")
    if apply:
        argv += ["--apply", apply]
    result = run(argv, check=check, timeout=120)
    return json.loads(result.stdout) if result.ok else result


def committed_params() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "nixos" / "params").glob("*.json"))}


def test_every_params_file_becomes_a_configuration_and_an_image(flake):
    params = committed_params()
    assert evaluate(flake, "nixosConfigurations", "builtins.attrNames") == sorted(params)
    for name in params:
        assert evaluate(flake, f"nixosConfigurations.{name}.config.modulesEvaluated") == IMAGE_MODULES
    packages = evaluate(flake, "packages")
    expected: dict[str, dict] = {"x86_64-linux": {}, "aarch64-linux": {}}
    for name, p in params.items():
        expected[p["system"]][f"{name}-image"] = {
            "name": f"{name}-image",
            "format": p["format"],
            "diskSize": p["disk_size"],
            "partitionTableType": p["partition_table"],
            "copyChannel": False,
        }
    assert packages == expected
    assert packages["x86_64-linux"]["nixos-x86_64-image"]["partitionTableType"] == "legacy"
    assert packages["aarch64-linux"]["nixos-aarch64-image"]["partitionTableType"] == "efi"


def test_the_flake_exports_its_modules(flake):
    names = evaluate(flake, "nixosModules", "builtins.attrNames")
    assert names == ["base", "cloud-init", "disk", "qemu-guest", "vm-host"]


def test_a_module_reading_a_missing_param_fails_the_evaluation(flake):
    base = flake / "modules" / "base.nix"
    base.write_text(base.read_text().replace("params.hostname", "params.host_name"))
    failed = evaluate(flake, "packages.x86_64-linux.nixos-x86_64-image", check=False)
    assert not failed.ok and "attribute 'host_name' missing" in failed.stderr
