"""The NixOS params JSON: round trip from config, committed files in sync, and every attribute
the flake's modules read exists in it (checked by scanning the .nix sources)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.config import load, load_file
from pipeline.render import nix as render_nix
from tests.support import ROOT

NIXOS = ROOT / "nixos"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixtureKeyFixtureKeyFixtureKeyFixtureKey0 test@host"
HASH = "$6$salt$" + "a" * 86

# How the modules name things (documented in nixos/modules/base.nix): params.<key> is a top-level
# key of the JSON, user.<key> a key of one entry of params.users. A key read with a default
# (`params.<key> or <default>`) is optional and not required in the JSON.
ACCESS_RE = {
    "params": re.compile(r"\bparams\.([A-Za-z_][A-Za-z0-9_-]*)(?![A-Za-z0-9_-])(?!\s+or\b)"),
    "user": re.compile(r"\buser\.([A-Za-z_][A-Za-z0-9_-]*)(?![A-Za-z0-9_-])(?!\s+or\b)"),
}


def project_config():
    return load_file(ROOT / "invoke.yaml")


def accessed(kind: str) -> set[str]:
    """Every name read as <kind>.<name> in a .nix file of nixos/ (comments excluded)."""
    names: set[str] = set()
    for path in NIXOS.rglob("*.nix"):
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        names |= set(ACCESS_RE[kind].findall(code))
    return names


# someone can log in (config load refuses an image nobody can log in to: pipeline.contract)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def sample_config(tmp_path: Path):
    raw = {
        "images": {
            "nixos_web.example": {
                "distro": "nixos", "arch": "aarch64", "firmware": "uefi", "disk_size": 4096,
                "version": "24.11", "ssh_port": 2300, "ssh_user": "ops", "timezone": "Europe/Berlin",
                "users": [
                    {"name": "root", "public_keys": [KEY]},
                    {"name": "ops", "password_hash": HASH, "sudo": True, "public_keys": [KEY]},
                ],
            },
            "own-flake": {"distro": "nixos", "arch": "x86_64", "flake": "github:me/infra",
                          "attribute": "packages.x86_64-linux.vm"},
            "alma": {"distro": "almalinux", "arch": "x86_64", "version": "10", "users": LOGIN},
        }
    }
    return load(raw, root=tmp_path)


def params_files(cfg):
    """Every nixos/params/<image>.json the configuration renders (through the distro profiles)."""
    from pipeline.committed import rendered_files

    return {path: text for path, text in rendered_files(cfg).items() if path.suffix == ".json"}


def test_committed_params_match_the_configuration():
    cfg = project_config()
    files = params_files(cfg)
    assert files, "the catalogue has NixOS images, so there must be params files"
    for path, text in files.items():
        assert path.parent == NIXOS / "params"
        assert path.is_file(), f"{path} missing: run invoke render"
        assert path.read_text() == text, f"{path} drifted from invoke.yaml: run invoke render"
    committed = {p.name for p in (NIXOS / "params").glob("*.json")}
    assert committed == {p.name for p in files}, "stale params files (the flake reads every one)"


def test_params_round_trip_from_config(tmp_path):
    cfg = sample_config(tmp_path)
    image = cfg.image("nixos_web.example")
    data = json.loads(render_nix.dumps(render_nix.params(image)))
    assert data == render_nix.params(image)
    assert data["name"] == "nixos_web.example"
    assert data["hostname"] == "nixos-web-example"
    assert (data["arch"], data["system"], data["console"]) == ("aarch64", "aarch64-linux", "ttyAMA0")
    assert (data["firmware"], data["partition_table"]) == ("uefi", "efi")
    assert data["disk_size"] == 4096 and data["ssh_port"] == 2300 and data["ssh_user"] == "ops"
    assert data["state_version"] == "24.11" and data["timezone"] == "Europe/Berlin"
    assert data["cloud_init"] is True  # an instance's NoCloud seed is read (nixos/modules/cloud-init.nix)
    assert data["users"] == [
        {"name": "root", "password_hash": None, "public_keys": [KEY], "sudo": False},
        {"name": "ops", "password_hash": HASH, "public_keys": [KEY], "sudo": True},
    ]


def test_render_files_covers_only_images_of_the_project_flake(tmp_path):
    cfg = sample_config(tmp_path)
    files = params_files(cfg)
    assert list(files) == [tmp_path / "nixos" / "params" / "nixos_web.example.json"]


def test_bios_images_get_the_legacy_layout():
    image = project_config().image("nixos-x86_64")
    data = render_nix.params(image)
    assert (data["firmware"], data["partition_table"], data["console"]) == ("bios", "legacy", "ttyS0")


def test_every_attribute_the_modules_read_exists_in_every_params_file():
    top, per_user = accessed("params"), accessed("user")
    # The scan itself must find what we know is there, or this test would pass vacuously.
    assert {"users", "disk_size", "partition_table", "hostname", "console", "cloud_init"} <= top
    assert {"name", "password_hash", "public_keys", "sudo"} <= per_user
    for path in sorted((NIXOS / "params").glob("*.json")):
        data = json.loads(path.read_text())
        assert top <= set(data), f"{path.name} lacks {sorted(top - set(data))}"
        assert data["users"], f"{path.name} has no users"
        for user in data["users"]:
            assert per_user <= set(user), f"{path.name} user {user.get('name')} lacks {sorted(per_user - set(user))}"


def test_params_carry_no_plaintext_passwords():
    for image in project_config().images.values():
        if image.distro != "nixos":
            continue
        text = render_nix.dumps(render_nix.params(image))
        for user in json.loads(text)["users"]:
            assert set(user) == {"name", "password_hash", "public_keys", "sudo"}
            assert user["password_hash"] is None or user["password_hash"].startswith("$6$")


def test_hostname_and_state_version_rules():
    assert render_nix.hostname("nixos_x.y") == "nixos-x-y"
    assert render_nix.hostname("___") == "nixos"
    assert len(render_nix.hostname("a" * 80)) == 63
    cfg = project_config()
    latest = cfg.image("nixos-x86_64").__class__(**{**cfg.image("nixos-x86_64").__dict__, "version": "latest"})
    assert render_nix.state_version(latest) == render_nix.NIXOS_RELEASE
    assert render_nix.state_version(cfg.image("nixos-x86_64")) == "26.05"


def test_flake_pins_the_stable_release_the_renderer_assumes():
    flake = (NIXOS / "flake.nix").read_text()
    assert f'"github:NixOS/nixpkgs/nixos-{render_nix.NIXOS_RELEASE}"' in flake


def test_the_distro_module_exposes_files_for_the_generic_renderer(tmp_path):
    from pipeline import distros

    cfg = sample_config(tmp_path)
    nixos = distros.get("nixos")
    assert nixos.rendered_files(cfg.image("own-flake"), tmp_path, cfg.source) == {}
    (path, text), = nixos.rendered_files(cfg.image("nixos_web.example"), tmp_path, cfg.source).items()
    assert path == tmp_path / "nixos" / "params" / "nixos_web.example.json"
    assert json.loads(text)["disk_size"] == 4096
