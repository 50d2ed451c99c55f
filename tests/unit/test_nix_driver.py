"""Pure parts of the Nix driver: argv, flake references, log parsing, host guard, lock file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import distros
from pipeline.base.errors import HostUnsuitable
from pipeline.config import load
from pipeline.distros import nixos
from pipeline.drivers import nix, nixlog
from pipeline.firmware import FirmwareInfo
from pipeline.host import HostFacts, KvmFacts, parse_nix_config
from pipeline.model import Accel

ROOT = Path("/srv/project")

# Lines recorded from nix 2.8 (`nix build -L --log-format internal-json`), one build and one failure.
RECORDED = [
    '@nix {"action":"start","id":1,"level":4,"text":"copying \'/tmp/flake\'","type":0}',
    '@nix {"action":"stop","id":1}',
    '@nix {"action":"start","id":2,"level":0,"text":"","type":102}',
    '@nix {"action":"result","fields":[0,1,0,0],"id":3,"type":105}',
    '@nix {"action":"start","id":4,"level":6,"text":"querying info about missing paths","type":0}',
    '@nix {"action":"start","fields":["/nix/store/394vm7mld6dfsclspczif54gm2xvbzkg-fixture-image.drv","",1,1],'
    '"id":5,"level":3,"text":"building \'/nix/store/394vm7mld6dfsclspczif54gm2xvbzkg-fixture-image.drv\'","type":105}',
    '@nix {"action":"result","fields":["building now6"],"id":5,"type":101}',
    '@nix {"action":"result","fields":["installPhase"],"id":5,"type":104}',
    '@nix {"action":"stop","id":5}',
    '@nix {"action":"msg","column":null,"file":null,"level":0,"line":null,"msg":"\\u001b[31;1merror:\\u001b[0m '
    'builder for \'\\u001b[35;1m/nix/store/xah1c23mx5k078qycxzmkh0s12cpmjhh-fixture-broken.drv\\u001b[0m\' '
    'failed with exit code 3\\u001b[0m","raw_msg":"x"}',
    '@nix {"action":"msg","level":1,"msg":"warning: Git tree \'/x\' is dirty"}',
    '@nix {"action":"msg","level":5,"msg":"chatty detail"}',
    "plain text from nix",
    "@nix {not json",
]


# someone can log in (config load refuses an image nobody can log in to: pipeline.contract)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def config(builders: dict | None = None):
    raw = {
        "images": {
            "nixos-x86_64": {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "users": LOGIN},
            "nixos-aarch64": {"distro": "nixos", "arch": "aarch64", "users": LOGIN},
            "edge": {"distro": "nixos", "arch": "aarch64", "flake": "./infra", "attribute": "packages.aarch64-linux.edge"},
            "remote": {"distro": "nixos", "arch": "x86_64", "flake": "github:acme/infra?dir=vm"},
        },
        "builders": builders or {},
    }
    return load(raw, root=ROOT)


def facts(os_: str = "linux", machine: str = "x86_64", usable: bool = True) -> HostFacts:
    return HostFacts(os=os_, machine=machine, kvm=KvmFacts(True, usable, usable), hvf=False)


def test_build_argv_is_pure_flakes_enabled_and_never_impure():
    argv = nix.nix_build_argv("/p/nixos#packages.x86_64-linux.nixos-x86_64-image", Path("/s/result"))
    assert argv[:3] == ["nix", "--extra-experimental-features", "nix-command flakes"]
    assert argv[3:5] == ["build", "/p/nixos#packages.x86_64-linux.nixos-x86_64-image"]
    assert argv[argv.index("--out-link") + 1] == "/s/result"
    assert "--impure" not in argv and "--keep-failed" not in argv
    # nix 2.8: -L is itself a log format, so it must precede --log-format internal-json.
    assert argv.index("-L") < argv.index("--log-format")
    assert argv[argv.index("--log-format") + 1] == "internal-json"


def test_build_argv_of_a_plan(tmp_path):
    from pipeline.plan import make_build_plan

    cfg = config()
    for name in ("nixos-x86_64", "edge", "remote"):
        image = cfg.image(name)
        fw = {image.arch: FirmwareInfo(image.arch, "/fw/code.fd", "/fw/vars.fd", "test")}
        here = replace(facts(machine=image.arch.value), firmware=fw)
        plan = make_build_plan(cfg, image, distros.profile(image), here, Accel.AUTO, tmp_path / "key")
        for on_error in ("cleanup", "abort"):
            argv = nix.build_argv(plan, tmp_path / "stage", on_error)
            assert "--impure" not in argv
            assert argv[4] == nix.installable(image, ROOT)
            assert argv[argv.index("--out-link") + 1] == str(tmp_path / "stage" / "result")
            assert ("--keep-failed" in argv) is (on_error == "abort")


def test_installable_defaults_to_the_project_flake():
    cfg = config()
    assert nix.installable(cfg.image("nixos-x86_64"), ROOT) == "/srv/project/nixos#packages.x86_64-linux.nixos-x86_64-image"
    assert nix.installable(cfg.image("nixos-aarch64"), ROOT) == "/srv/project/nixos#packages.aarch64-linux.nixos-aarch64-image"


def test_installable_honours_own_flake_path_url_and_attribute():
    cfg = config()
    assert nix.installable(cfg.image("edge"), ROOT) == "/srv/project/infra#packages.aarch64-linux.edge"
    assert nix.installable(cfg.image("remote"), ROOT) == "github:acme/infra?dir=vm#packages.x86_64-linux.remote-image"
    assert nix.flake_dir(cfg.image("remote"), ROOT) is None
    assert nix.is_local_flake("/abs/flake") and nix.is_local_flake("../up") and nix.is_local_flake("sub/dir")
    assert not nix.is_local_flake("git+https://example.org/x.git")


def test_log_parser_turns_internal_json_into_events():
    parser = nixlog.LogParser()
    events = [e for e in (parser.feed(line) for line in RECORDED) if e is not None]
    kinds = [(e.kind, e.message) for e in events]
    assert kinds == [
        ("say", "building fixture-image"),
        ("message", "building now6"),
        ("message", "fixture-image: phase installPhase"),
        ("error", "error: builder for '/nix/store/xah1c23mx5k078qycxzmkh0s12cpmjhh-fixture-broken.drv' failed with exit code 3"),
        ("message", "warning: Git tree '/x' is dirty"),
        ("message", "plain text from nix"),
        ("message", "@nix {not json"),
    ]
    assert events[0].data == ("/nix/store/394vm7mld6dfsclspczif54gm2xvbzkg-fixture-image.drv",)
    assert events[1].source == "nix:fixture-image"
    assert all("\x1b" not in e.message for e in events)


def test_guard_refuses_foreign_arch_and_names_remote_task_and_fitting_builders():
    cfg = config({"pi": {"host": "pi.lan", "arch": "aarch64"}, "box": {"arch": "x86_64"}, "old": {}})
    with pytest.raises(HostUnsuitable) as err:
        check_can_build(cfg.image("nixos-aarch64"), facts(), cfg)
    text = err.value.render()
    assert "aarch64" in err.value.message and "cross-built" in err.value.message
    assert "invoke remote-build-nixos-arm HOST" in text
    assert "configured aarch64 builders: pi" in text and "box" not in text.split("builders without")[0]
    assert "builders without an arch (add `arch:` to use them): old" in text
    assert err.value.exit_code == 3


def test_guard_without_builders_says_how_to_add_one():
    cfg = config()
    with pytest.raises(HostUnsuitable) as err:
        check_can_build(cfg.image("nixos-x86_64"), facts(machine="aarch64"), cfg)
    assert "invoke remote-build-nixos-x86 HOST" in err.value.render()
    assert "no builder with `arch: x86_64`" in err.value.render()


def test_guard_refuses_macos_even_on_the_same_arch():
    cfg = config()
    with pytest.raises(HostUnsuitable) as err:
        check_can_build(cfg.image("nixos-aarch64"), facts("darwin", "arm64"), cfg)
    assert "macOS" in err.value.message and "remote-build-nixos-arm" in err.value.render()


def test_guard_accepts_a_linux_host_of_the_same_arch():
    cfg = config()
    assert check_can_build(cfg.image("nixos-x86_64"), facts(), cfg) is None
    assert check_can_build(cfg.image("nixos-aarch64"), facts(machine="aarch64"), cfg) is None


def test_custom_image_names_the_generic_remote_task():
    assert nixos.remote_task(config().image("edge")) == "invoke remote-sync-build HOST --image edge"


def check_can_build(image, host, cfg) -> None:
    """The NixOS profile's verdict on this host, raised as the build raises it."""
    problem = nixos.PROFILE.host_problem(image, host, cfg)
    if problem is not None:
        raise problem


SHOW_CONFIG = """\
experimental-features = flakes nix-command
sandbox = false
system = x86_64-linux
system-features = benchmark big-parallel kvm nixos-test
"""


def test_parse_nix_config():
    settings = parse_nix_config(SHOW_CONFIG + "sandbox-paths = \n")
    assert settings["system-features"] == "benchmark big-parallel kvm nixos-test"
    assert settings["sandbox"] == "false" and settings["sandbox-paths"] == ""


def test_kvm_warnings():
    settings = parse_nix_config(SHOW_CONFIG)
    assert nix.kvm_warnings(settings) == []
    assert nix.kvm_warnings(settings, facts()) == []
    without = parse_nix_config(SHOW_CONFIG.replace(" kvm", ""))
    (warning,) = nix.kvm_warnings(without)
    assert "`kvm` system feature" in warning and "extra-system-features = kvm" in warning
    (missing,) = nix.kvm_warnings(None)
    assert "none" in missing
    (unusable,) = nix.kvm_warnings(settings, facts(usable=False))
    assert "KVM is not usable" in unusable


def lock(rev: object, nixpkgs_input: object = "nixpkgs") -> str:
    return json.dumps({
        "nodes": {
            "nixpkgs": {"locked": {"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": rev}},
            "root": {"inputs": {"nixpkgs": nixpkgs_input}},
        },
        "root": "root",
        "version": 7,
    })


def test_nixpkgs_revision_from_lock(tmp_path):
    assert nix.parse_nixpkgs_revision(lock("a" * 40)) == "a" * 40
    assert nix.parse_nixpkgs_revision(lock("a" * 40, ["other", "nixpkgs"])) is None
    assert nix.parse_nixpkgs_revision("{}") is None
    assert nix.parse_nixpkgs_revision("not json") is None
    assert nix.nixpkgs_revision(tmp_path) is None
    (tmp_path / "flake.lock").write_text(lock("b" * 40))
    assert nix.nixpkgs_revision(tmp_path) == "b" * 40
    assert nix.nixpkgs_revision(None) is None


def test_failure_hints():
    img = config().image("nixos-x86_64")
    log = Path("/o/build.log")
    assert "disk_size" in nix.failure_hint("cptofs failed. diskSize might be too small", img, log)
    assert "system-features" in nix.failure_hint("required system or feature not available", img, log)
    assert "attribute" in nix.failure_hint("does not provide attribute 'x'", img, log)
    assert "network" in nix.failure_hint("unable to download 'https://x'", img, log)
    assert nix.failure_hint("anything", img, log).endswith("full log: /o/build.log")
