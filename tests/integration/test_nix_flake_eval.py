"""nixos/flake.nix evaluated by the real nix, with a strict STAND-IN for nixpkgs.

nixpkgs cannot be fetched here (no network; current nixpkgs also needs a newer nix), so
`--override-input nixpkgs` points the flake at tests/fixtures/fakenixpkgs. The stand-in is as
strict as nixpkgs 26.05 where the flake touches it: make-disk-image.nix has the release's exact
formal arguments (no `...`) and checks the values; `lib.nixosSystem` runs a small module
evaluator that rejects option paths and types the release does not declare (a hand-copied list)
and trips the same assertions. What this proves: the wiring, every module against every
committed params file, and that a misspelt argument or option fails here as it would upstream.
What it cannot prove: options outside the hand-copied list, or a real build (see docs/safety.md, "Verified where").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.base.run import run
from pipeline.drivers import nix
from tests.support import NEEDS_NIX_STORE, NIX_CONFIG, ROOT, require_tool

pytestmark = NEEDS_NIX_STORE

# base, qemu-guest (+ the qemu-guest profile it imports), disk, cloud-init, nixpkgs.hostPlatform
IMAGE_MODULES = 6
X86_IMAGE = "packages.x86_64-linux.nixos-x86_64-image"


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


def edit(path: Path, old: str, new: str) -> None:
    """Replace one exact piece of a copied file (fails loudly if the piece is not there)."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


def fails_with(flake: Path, attr: str, *needles: str) -> str:
    failed = evaluate(flake, attr, check=False)
    assert not isinstance(failed, (dict, list)) and not failed.ok, f"{attr} evaluated: {failed}"
    for needle in needles:
        assert needle in failed.stderr, failed.stderr
    return failed.stderr


def committed_params() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "nixos" / "params").glob("*.json"))}


def test_every_params_file_becomes_a_configuration_and_an_image(flake):
    params = committed_params()
    assert evaluate(flake, "nixosConfigurations", "builtins.attrNames") == sorted(params)
    for name in params:
        assert evaluate(flake, f"nixosConfigurations.{name}.standIn.modules") == IMAGE_MODULES
        toplevel = evaluate(flake, f"nixosConfigurations.{name}.config.system.build.toplevel.drvPath")
        assert toplevel.endswith("-stand-in-toplevel.drv")
    packages = evaluate(flake, "packages", "builtins.mapAttrs (s: ps: builtins.mapAttrs (n: p: p.imageArgs) ps)")
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


def test_the_flake_pins_the_current_stable_release(flake):
    assert 'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";' in (flake / "flake.nix").read_text()
    for name, p in committed_params().items():
        assert evaluate(flake, f"nixosConfigurations.{name}.config.system.stateVersion") == p["state_version"]


def test_the_flake_exports_its_modules(flake):
    names = evaluate(flake, "nixosModules", "builtins.attrNames")
    assert names == ["base", "cloud-init", "disk", "qemu-guest", "vm-host"]


def test_cloud_init_reads_an_instance_seed_and_nothing_else(flake):
    """An instance's NoCloud seed is read (imagepipe.cloudInit, on by default): NoCloud, else
    nothing; the network stays NixOS's own."""
    got = evaluate(flake, "nixosConfigurations.nixos-x86_64.config",
                   "c: [ c.services.cloud-init.enable c.services.cloud-init.network.enable "
                   "c.services.cloud-init.settings.datasource_list ]")
    assert got == [True, False, ["NoCloud", "None"]]


def test_a_module_reading_a_missing_param_fails_the_evaluation(flake):
    edit(flake / "modules" / "base.nix", "params.hostname", "params.host_name")
    fails_with(flake, X86_IMAGE, "attribute 'host_name' missing")


# --- the stand-in is as strict as nixpkgs ------------------------------------------------------

def test_a_misspelt_make_disk_image_argument_fails(flake):
    edit(flake / "flake.nix", "copyChannel = false;", "copyChanel = false;")
    fails_with(flake, X86_IMAGE, "called with unexpected argument 'copyChanel'")


def test_a_value_make_disk_image_refuses_fails(flake):
    edit(flake / "flake.nix", "partitionTableType = params.partition_table;", 'partitionTableType = "gpt";')
    fails_with(flake, X86_IMAGE, "partitionTableType must be one of", '"gpt"')


def test_a_disk_size_that_is_not_mib_fails(flake):
    edit(flake / "flake.nix", "diskSize = params.disk_size;", 'diskSize = "8G";')
    fails_with(flake, X86_IMAGE, "diskSize must be a positive number of MiB")


def test_a_misspelt_option_path_fails_naming_it(flake):
    edit(flake / "modules" / "disk.nix", "boot.growPartition = true;", "boot.growPartiton = true;")
    err = fails_with(flake, X86_IMAGE, "The option `boot.growPartiton' does not exist")
    assert "modules/disk.nix" in err


def test_a_misspelt_option_inside_a_false_mkIf_still_fails(flake):
    # aarch64 is not x86_64: the serial-GRUB block is off, its option names are still checked.
    edit(flake / "modules" / "disk.nix", "      extraConfig = ''", "      extraConfg = ''")
    fails_with(flake, "packages.aarch64-linux.nixos-aarch64-image",
               "The option `boot.loader.grub.extraConfg' does not exist")


def test_a_value_of_the_wrong_type_fails(flake):
    edit(flake / "modules" / "base.nix",
         'PermitRootLogin = lib.mkDefault (if rootSsh then "yes" else "prohibit-password");',
         'PermitRootLogin = "maybe";')
    fails_with(flake, X86_IMAGE, "A definition for option `services.openssh.settings.PermitRootLogin' is not of type")


def test_conflicting_definitions_fail(flake):
    edit(flake / "modules" / "base.nix", "time.timeZone = params.timezone;",
         'time.timeZone = params.timezone;\n  imports = [ { time.timeZone = "Europe/Berlin"; } ];')
    fails_with(flake, X86_IMAGE, "The option `time.timeZone' has conflicting definition values")


# --- what the modules give the image -----------------------------------------------------------

def config_of(flake: Path, name: str, attr: str):
    return evaluate(flake, f"nixosConfigurations.{name}.config.{attr}")


def test_every_sudo_user_gets_passwordless_sudo_even_with_a_password(flake):
    for name, p in committed_params().items():
        rules = config_of(flake, name, "security.sudo.extraRules")
        sudo_users = [u["name"] for u in p["users"] if u["sudo"]]
        assert any(u["password_hash"] for u in p["users"] if u["sudo"]), "the shipped admin has a password"
        assert rules == [{"users": [u], "commands": [{"command": "ALL", "options": ["NOPASSWD"]}]}
                         for u in sudo_users]


def test_no_sudo_rule_for_users_without_sudo(flake):
    params_file = flake / "params" / "nixos-x86_64.json"
    data = json.loads(params_file.read_text())
    data["users"].append({"name": "guest", "password_hash": None, "public_keys": ["ssh-ed25519 AAAA guest"],
                          "sudo": False})
    params_file.write_text(json.dumps(data))
    rules = config_of(flake, "nixos-x86_64", "security.sudo.extraRules")
    assert [r["users"] for r in rules] == [["admin"]]
    assert config_of(flake, "nixos-x86_64", "users.users.guest.extraGroups") == []


def test_root_ssh_param_decides_root_password_login(flake):
    assert config_of(flake, "nixos-x86_64", "services.openssh.settings.PermitRootLogin") == "prohibit-password"
    params_file = flake / "params" / "nixos-x86_64.json"
    params_file.write_text(json.dumps({**json.loads(params_file.read_text()), "root_ssh": True}))
    assert config_of(flake, "nixos-x86_64", "services.openssh.settings.PermitRootLogin") == "yes"
    assert config_of(flake, "nixos-aarch64", "services.openssh.settings.PermitRootLogin") == "prohibit-password"


def test_efi_and_legacy_layouts_match_make_disk_image(flake):
    x86 = config_of(flake, "nixos-x86_64", "fileSystems")
    assert set(x86) == {"/"} and x86["/"]["device"] == "/dev/disk/by-label/nixos"
    assert config_of(flake, "nixos-x86_64", "boot.loader.grub.device") == "/dev/vda"
    arm = config_of(flake, "nixos-aarch64", "fileSystems")
    assert arm["/boot"] == {"device": "/dev/disk/by-label/ESP", "fsType": "vfat"}
    grub = config_of(flake, "nixos-aarch64", "boot.loader.grub")
    assert (grub["device"], grub["efiSupport"], grub["efiInstallAsRemovable"]) == ("nodev", True, True)


def test_a_root_label_make_disk_image_does_not_write_fails(flake):
    edit(flake / "modules" / "disk.nix", '"/dev/disk/by-label/nixos"', '"/dev/disk/by-label/root"')
    fails_with(flake, X86_IMAGE, "make-disk-image labels the root file system nixos")


def test_devshell_exports_the_aarch64_uefi_code_of_its_qemu(flake):
    for system in ("x86_64-linux", "aarch64-darwin"):
        shell = evaluate(flake, f"devShells.{system}.default")
        assert shell["QEMU_EFI_AARCH64"].endswith("-stand-in-qemu/share/qemu/edk2-aarch64-code.fd")
        assert any(p.endswith("-stand-in-qemu") for p in shell["packages"] if isinstance(p, str))


# --- vm-host: a host's own flake importing the module ------------------------------------------

def host_flake(flake: Path, module_extra: str = "") -> Path:
    """A host flake that imports imagepipe's vm-host module, on the stand-in nixpkgs."""
    host = flake.parent / "host"
    host.mkdir(exist_ok=True)
    (host / "flake.nix").write_text(f"""{{
  inputs.nixpkgs.url = "path:{flake.parent / 'fake'}";
  inputs.imagepipe.url = "path:{flake}";
  inputs.imagepipe.inputs.nixpkgs.follows = "nixpkgs";
  outputs = {{ self, nixpkgs, imagepipe }}: {{
    host = nixpkgs.lib.nixosSystem {{
      modules = [
        imagepipe.nixosModules.vm-host
        {{ imagepipe.vmHost.users = [ "alice" ]; users.users.alice.isNormalUser = true; {module_extra} }}
      ];
    }};
  }};
}}
""")
    return host


def evaluate_host(host: Path, attr: str, check: bool = True):
    result = run(nix.nix_argv("eval", "--json", "--no-write-lock-file", f"path:{host}#host.{attr}"),
                 check=check, timeout=120)
    return json.loads(result.stdout) if result.ok else result


def test_vm_host_module_evaluates_and_keeps_nix_defaults(flake):
    host = host_flake(flake)
    assert evaluate_host(host, "config.system.build.toplevel.drvPath").endswith("-stand-in-toplevel.drv")
    config = evaluate_host(host, "config")
    assert config["users"]["users"]["alice"]["extraGroups"] == ["libvirtd", "kvm"]
    assert config["virtualisation"]["libvirtd"]["enable"] is True
    assert "ovmf" not in config["virtualisation"]["libvirtd"]["qemu"]
    assert config["security"]["polkit"]["enable"] is True
    # nix.nix's default system-features (kvm, nixos-test, big-parallel, benchmark, gccarch-*)
    # stay in force: the module sets nothing under nix.settings.
    assert "nix" not in config


def test_the_removed_ovmf_submodule_fails_like_nixpkgs_26_05(flake):
    edit(flake / "modules" / "vm-host.nix", "swtpm.enable = true;", "swtpm.enable = true;\n        ovmf.enable = true;")
    failed = evaluate_host(host_flake(flake), "config.system.build.toplevel.drvPath", check=False)
    assert not failed.ok and "The 'virtualisation.libvirtd.qemu.ovmf' submodule has been removed" in failed.stderr
