"""Input hash: which files and settings go in, and that changing any of them changes the hash."""

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from pipeline import inputs
from pipeline.config import load
from tests.support import ROOT, require_tool

VERSIONS = {"packer": "1.6.6", "qemu-system-x86_64": "7.2.22", "qemu-system-aarch64": "7.2.22", "nix": "2.8.0"}


def project(tmp_path: Path) -> Path:
    """A copy of the project's committed inputs (packer/, invoke.yaml) to modify freely."""
    root = tmp_path / "proj"
    shutil.copytree(ROOT / "packer", root / "packer")
    shutil.copy(ROOT / "invoke.yaml", root / "invoke.yaml")
    return root


def config(root: Path, **demo_changes):
    raw = yaml.safe_load((root / "invoke.yaml").read_text())
    raw["images"]["demo-x86_64"].update(demo_changes)
    raw["defaults"]["output_dir"] = str(root / "output")
    return load(raw, root)


def demo_hash(root: Path, **changes) -> inputs.InputHash:
    cfg = config(root, **changes)
    return inputs.compute(cfg, cfg.image("demo-x86_64"), VERSIONS)


def test_same_inputs_same_hash_and_the_parts_are_named(tmp_path):
    root = project(tmp_path)
    a, b = demo_hash(root), demo_hash(root)
    assert a == b and len(a.value) == 64
    assert set(a.parts) == {"file:packer/demo/x86_64/demo-x86_64.pkr.hcl", "config", "tool:packer",
                            "tool:qemu-system-x86_64", "imagepipe"}
    assert a.parts["tool:packer"] == "1.6" and a.parts["tool:qemu-system-x86_64"] == "7"


def test_touching_the_template_changes_the_hash(tmp_path):
    root = project(tmp_path)
    before = demo_hash(root)
    template = root / "packer/demo/x86_64/demo-x86_64.pkr.hcl"
    template.write_text(template.read_text() + "# edited\n")
    after = demo_hash(root)
    assert after.value != before.value
    assert after.changed_parts(before.parts) == ["file:packer/demo/x86_64/demo-x86_64.pkr.hcl"]


def test_config_changes_count_but_retention_and_schedule_do_not(tmp_path):
    root = project(tmp_path)
    base = demo_hash(root)
    assert demo_hash(root, memory=512).changed_parts(base.parts) == ["config"]
    assert demo_hash(root, retention=9, schedule="daily").value == base.value


def test_tool_feature_versions():
    assert inputs.feature_version("packer", "1.6.6") == "1.6"
    assert inputs.feature_version("nix", "2.18.1") == "2.18"
    assert inputs.feature_version("qemu-system-x86_64", "7.2.22") == "7"
    assert inputs.feature_version("packer", None) == "missing"


def test_a_packer_minor_upgrade_changes_the_hash_a_patch_does_not(tmp_path):
    root = project(tmp_path)
    cfg = config(root)
    img = cfg.image("demo-x86_64")
    base = inputs.compute(cfg, img, VERSIONS).value
    assert inputs.compute(cfg, img, {**VERSIONS, "packer": "1.6.9"}).value == base
    assert inputs.compute(cfg, img, {**VERSIONS, "packer": "1.7.0"}).value != base


def test_alma_kickstart_and_only_its_own_iso_pin_count(tmp_path):
    root = project(tmp_path)
    cfg = config(root)
    alma = cfg.image("almalinux10-x86_64")
    ks = root / "kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg"
    ks.parent.mkdir(parents=True)
    ks.write_text("text\n")
    lock = {"images": {"almalinux10-x86_64": {"version": "10.0", "sha256": "a" * 64},
                       "almalinux10-aarch64": {"version": "10.0", "sha256": "b" * 64}}}
    (root / "iso.lock.json").write_text(json.dumps(lock))
    first = inputs.compute(cfg, alma, VERSIONS)
    assert "file:kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg" in first.parts and "iso.lock" in first.parts
    lock["images"]["almalinux10-aarch64"]["version"] = "10.1"  # another image's pin: no change
    (root / "iso.lock.json").write_text(json.dumps(lock))
    assert inputs.compute(cfg, alma, VERSIONS).value == first.value
    lock["images"]["almalinux10-x86_64"]["version"] = "10.1"  # its own pin: a new point release
    (root / "iso.lock.json").write_text(json.dumps(lock))
    assert inputs.compute(cfg, alma, VERSIONS).changed_parts(first.parts) == ["iso.lock"]
    ks.write_text("text\nreboot\n")
    assert inputs.compute(cfg, alma, VERSIONS).value != first.value


def test_nixos_flake_files_count(tmp_path):
    root = project(tmp_path)
    cfg = config(root)
    nixos = cfg.image("nixos-x86_64")
    (root / "nixos/modules").mkdir(parents=True)
    for name, text in (("flake.nix", "{ }\n"), ("flake.lock", "{}\n"), ("modules/base.nix", "{ }\n"),
                       ("params/nixos-x86_64.json", "{}\n"), ("params/nixos-aarch64.json", "{}\n")):
        (root / "nixos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "nixos" / name).write_text(text)
    h = inputs.compute(cfg, nixos, VERSIONS)
    assert {p for p in h.parts if p.startswith("file:")} == {
        "file:nixos/flake.nix", "file:nixos/flake.lock", "file:nixos/modules/base.nix", "file:nixos/params/nixos-x86_64.json"}
    assert h.parts["tool:nix"] == "2.8" and "tool:packer" not in h.parts
    (root / "nixos/flake.lock").write_text('{"changed": 1}\n')
    assert inputs.compute(cfg, nixos, VERSIONS).changed_parts(h.parts) == ["file:nixos/flake.lock"]


def test_canonical_config_is_stable_json():
    cfg = load(yaml.safe_load((ROOT / "invoke.yaml").read_text()), ROOT)
    img = cfg.image("almalinux10-x86_64")
    text = inputs.image_config(img)
    data = json.loads(text)
    assert data["distro"] == "almalinux" and data["users"][0]["name"] == "root"
    assert "retention" not in data and "schedule" not in data
    assert inputs.image_config(dataclasses.replace(img)) == text


def test_tool_versions_come_from_the_stat_keyed_cache(tmp_path):
    require_tool("packer", "packer")
    first = inputs.tool_versions(["packer"], tmp_path)  # runs `packer version` once
    assert first["packer"] and first["packer"].startswith("1.")
    cache_file = tmp_path / inputs.VERSION_CACHE
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    cache[key] = "9.9.9"  # a cached answer is used as is: no version command on a hit
    cache_file.write_text(json.dumps(cache))
    assert inputs.tool_versions(["packer"], tmp_path) == {"packer": "9.9.9"}
    assert inputs.tool_versions(["no-such-tool-here"], tmp_path) == {"no-such-tool-here": None}
