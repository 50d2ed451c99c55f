"""NixOS and the guest contract, with the real nix: the staged flake copy the build uses (build
key in its params, nothing committed changes), the contract checked on the evaluated NixOS
configuration (stand-in nixpkgs, see test_nix_flake_eval.py), a real `nix build` through the
staged copy, `invoke update-flake`, and lint's real evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from pipeline import contract, distros, host, inputs, keys
from pipeline.base.run import run
from pipeline.config import load, load_file
from pipeline.distros import almalinux, nixos
from pipeline.drivers import nix
from pipeline.firmware import FirmwareInfo
from pipeline.lint import nix as lint_nix
from pipeline.model import Accel, User
from pipeline.plan import make_build_plan
from pipeline.render import kickstart
from tests.integration.test_nix_build import Recorder
from tests.support import (
    NEEDS_NIX_STORE,
    NIX_CONFIG,
    ROOT,
    invoke,
    project_copy,
    require_tool,
    write_config,
)

pytestmark = NEEDS_NIX_STORE

CFG = load_file(ROOT / "invoke.yaml")
HASH = "$6$saltsalt$" + "e" * 86
FAKE = ROOT / "tests" / "fixtures" / "fakenixpkgs"


@pytest.fixture(autouse=True)
def nix_ready(monkeypatch):
    require_tool("nix", "nix-bin")
    monkeypatch.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)


def project(tmp_path: Path, nixos_dir: Path = ROOT / "nixos") -> Path:
    """A project root holding a copy of `nixos_dir` as its nixos/ (outside git)."""
    root = tmp_path / "proj"
    shutil.copytree(nixos_dir, root / "nixos", ignore=shutil.ignore_patterns("result*"))
    return root


def staged_flake(tmp_path: Path, image, root: Path) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """NixOS.prepare for `image`: the staged flake folder and the build's public key."""
    facts = host.HostFacts(os="linux", machine=image.arch.value, kvm=host.KvmFacts(True, True, True), hvf=False,
                           firmware={image.arch: FirmwareInfo(image.arch, "/c", "/v", "test")})
    cfg = dataclasses.replace(CFG, root=root)
    plan = make_build_plan(cfg, image, distros.profile(image), facts, Accel.TCG, keys.project_key(tmp_path / "output"),
                           build_id="b")
    prepared = distros.profile(plan.image).prepare(plan, tmp_path / "stage", lambda _m: None)
    return Path(prepared.variables["flake"].removeprefix("path:")), keys.public_key(plan.ssh_key)


def view_of(flake: Path, name: str) -> contract.GuestView:
    """The contract's view of nixosConfigurations.<name>, evaluated on the stand-in nixpkgs."""
    argv = nix.nix_argv("eval", "--json", "--no-write-lock-file", "--override-input", "nixpkgs", f"path:{FAKE}",
                        f"path:{flake}#nixosConfigurations.{name}.config", "--apply", nixos.CONTRACT_APPLY)
    return nixos.guest_view(json.loads(run(argv, timeout=120).stdout))


def test_the_staged_copy_holds_this_images_params_with_the_build_key_only(tmp_path):
    root = project(tmp_path)
    committed = (root / "nixos/params/nixos-x86_64.json").read_text()
    flake, key = staged_flake(tmp_path, CFG.image("nixos-x86_64"), root)
    assert flake == tmp_path / "stage" / "collected" / "flake"  # kept until the package list is read
    assert sorted(p.name for p in (flake / "params").iterdir()) == ["nixos-x86_64.json"]
    staged = json.loads((flake / "params/nixos-x86_64.json").read_text())
    assert [u["public_keys"] for u in staged["users"]] == [[key]]
    assert (root / "nixos/params/nixos-x86_64.json").read_text() == committed and key not in committed
    assert (flake / "flake.nix").read_text() == (root / "nixos/flake.nix").read_text()
    assert sorted(p.name for p in (flake / "modules").iterdir()) == sorted(p.name for p in (root / "nixos/modules").iterdir())


@pytest.mark.parametrize("name", ["nixos-x86_64", "nixos-aarch64"])
def test_the_evaluated_configuration_keeps_the_contract(tmp_path, name):
    image = CFG.image(name)
    flake, key = staged_flake(tmp_path, image, project(tmp_path))
    assert contract.check_rendered(image, key, view_of(flake, name)) == []
    # the committed params (no build key) would not let imagepipe in
    assert contract.check_rendered(image, key, view_of(committed_copy(tmp_path), name)) == [
        "key-login: the build key is not among admin's authorized keys"]


def committed_copy(tmp_path: Path) -> Path:
    """A copy of the committed flake, outside git."""
    dest = tmp_path / "committed"
    if not dest.exists():
        shutil.copytree(ROOT / "nixos", dest, ignore=shutil.ignore_patterns("result*"))
    return dest


def test_root_ssh_and_a_second_sudo_user_match_the_kickstart(tmp_path):
    """The same accounts rendered both ways give the same sudo and root-over-SSH answers."""
    base = CFG.image("nixos-x86_64")
    users = (User("root", password_hash=HASH), *base.users, User("ops", password_hash=HASH, sudo=True))
    image = dataclasses.replace(base, users=users, root_ssh=True)
    flake, key = staged_flake(tmp_path, image, project(tmp_path))
    nix_view = view_of(flake, "nixos-x86_64")
    assert contract.check_rendered(image, key, nix_view) == []
    alma = dataclasses.replace(CFG.image("almalinux10-x86_64"), users=users, root_ssh=True)
    ks_view = almalinux.guest_view(kickstart.render(contract.with_build_key(alma, key)))
    assert nix_view.passwordless_sudo >= {"admin", "ops"} and ks_view.passwordless_sudo == {"admin", "ops"}
    assert nix_view.root_password_ssh is ks_view.root_password_ssh is True
    off = dataclasses.replace(image, root_ssh=False)
    assert contract.check_rendered(off, key, nix_view) == ["root-ssh: root's password works over SSH (root_ssh: false)"]


@pytest.mark.slow
def fixture_plan(tmp_path: Path, root: Path):  # type: ignore[no-untyped-def]
    """The build plan of nixos-x86_64 from the project at `root` (its nixos/ a fixture flake),
    on this host's probed nix."""
    cfg = load({"defaults": {"output_dir": str(tmp_path / "output")},
                "images": {"nixos-x86_64": {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "ssh_user": "admin",
                                            "users": [{"name": "admin", "sudo": True, "password_hash": HASH}]}}}, root)
    image = cfg.image("nixos-x86_64")
    facts = host.probe(tools=["nix"])
    return make_build_plan(cfg, image, distros.profile(image), facts, Accel.AUTO, keys.project_key(cfg.output_dir),
                           build_id="b"), facts


def test_a_real_nix_build_runs_on_the_staged_copy(tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(ROOT / "tests" / "fixtures" / "nixflake", fixture)
    (fixture / "nonce").write_text(uuid.uuid4().hex)
    root = project(tmp_path, fixture)
    plan, facts = fixture_plan(tmp_path, root)
    assert "lock" in (distros.profile(plan.image).announce(plan, facts) or ""), "no flake.lock: the build says to commit one"
    progress = Recorder()
    result = nix.NixDriver(distros.profile(plan.image)).drive(plan, facts, plan.staging, progress, timeout=300)
    assert result == plan.staging / "nixos.qcow2"
    said = [e.message for e in progress.events]
    assert f"fixture: authorized keys: {keys.public_key(plan.ssh_key)}" in said
    assert any(m.startswith("nix build path:") for m in said)
    assert (plan.staging / "collected" / "flake").is_dir(), "the package list reads the system from it"
    assert sorted(p.name for p in plan.staging.iterdir()) == ["collected", "nixos.qcow2"]
    assert not (root / "nixos" / "params").exists(), "nothing is written into the project's flake"


def test_without_a_committed_lock_the_one_nix_wrote_becomes_nixos_flake_lock(tmp_path):
    """A local build of a project whose nixos/ has a nixpkgs input and no flake.lock: nix writes
    the lock into the build's staged copy; the build keeps it, nixos/flake.lock becomes it (the
    build says to commit it), and the manifest names what pins nixpkgs."""
    nixpkgs = tmp_path / "nixpkgs"
    nixpkgs.mkdir()
    (nixpkgs / "flake.nix").write_text("{ outputs = _: { }; }\n")
    fixture = tmp_path / "fixture"
    shutil.copytree(ROOT / "tests" / "fixtures" / "nixflake", fixture)
    (fixture / "nonce").write_text(uuid.uuid4().hex)
    text = (fixture / "flake.nix").read_text()
    assert "outputs =\n    { self }:" in text
    (fixture / "flake.nix").write_text(text.replace("outputs =\n    { self }:", "outputs =\n    { self, ... }:").replace(
        '  description = "imagepipe test fixture: image-like derivations";',
        f'  description = "imagepipe test fixture: image-like derivations";\n  inputs.nixpkgs.url = "path:{nixpkgs}";'))
    root = project(tmp_path, fixture)
    assert not (root / "nixos" / "flake.lock").exists()
    plan, facts = fixture_plan(tmp_path, root)
    progress = Recorder()
    nix.NixDriver(distros.profile(plan.image)).drive(plan, facts, plan.staging, progress, timeout=300)
    lock = root / "nixos" / "flake.lock"
    assert lock.is_file() and lock.read_text() == (plan.staging / "flake.lock").read_text()
    said = [e.message for e in progress.events]
    assert any(m.startswith("nixos/flake.lock written from the lock nix wrote for this build") and m.endswith("commit it")
               for m in said), said
    pinned = distros.profile(plan.image).manifest_extra(plan)["nixpkgs"]
    assert pinned is not None and pinned.startswith("narHash:sha256-"), pinned  # a path input has no git rev


def locked_project(tmp_path: Path) -> Path:
    """A project whose nixos/ takes nixpkgs from the stand-in by path; `invoke update-flake`
    (nix itself) writes its flake.lock."""
    root = project(tmp_path)
    shutil.copytree(FAKE, tmp_path / "fake")
    flake = root / "nixos" / "flake.nix"
    flake.write_text(flake.read_text().replace('"github:NixOS/nixpkgs/nixos-26.05"', f'"path:{tmp_path / "fake"}"'))
    project_copy(root, ("tasks.py", "invoke.yaml", "pyproject.toml", "pipeline"))
    return root


def test_update_flake_has_nix_write_the_lock_and_the_input_hash_follows(tmp_path):
    root = locked_project(tmp_path)
    cfg = dataclasses.replace(CFG, root=root)
    before = inputs.compute(cfg, cfg.image("nixos-x86_64"), {"nix": "2.8"})
    config = write_config(tmp_path / "rt.yaml", tmp_path / "output")
    res = invoke(["update-flake"], config, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr
    lock = json.loads((root / "nixos" / "flake.lock").read_text())
    assert lock["nodes"]["nixpkgs"]["locked"]["type"] == "path" and lock["nodes"]["nixpkgs"]["locked"]["narHash"]
    # a path input has no git revision: its content hash is what pins it
    assert "nixos/flake.lock written by nix (nixpkgs narHash:sha256-" in res.stderr and "): commit it" in res.stderr
    again = invoke(["update-flake"], config, cwd=root, timeout=300)
    assert again.returncode == 0 and "nixos/flake.lock unchanged" in again.stderr, again.stderr
    after = inputs.compute(cfg, cfg.image("nixos-x86_64"), {"nix": "2.8"})
    assert after.changed_parts(before.parts) == ["file:nixos/flake.lock"]


def test_lint_evaluates_for_real_when_the_lock_can_be_had(tmp_path):
    root = locked_project(tmp_path)
    run(nix.nix_argv("flake", "lock"), cwd=root / "nixos", timeout=300)
    unchecked: list[str] = []
    assert lint_nix.lint_problems(root, on_unchecked=unchecked.append) == [] and unchecked == []
    disk = root / "nixos" / "modules" / "disk.nix"
    disk.write_text(disk.read_text().replace("boot.growPartition = true;", "boot.growPartiton = true;"))
    found = lint_nix.lint_problems(root, on_unchecked=unchecked.append)
    (problem,) = found
    assert problem.startswith("nixos: nixosConfigurations and packages do not evaluate: ") and "boot.growPartiton" in problem
    assert unchecked == []


def test_lint_without_a_lock_says_what_it_could_not_check(tmp_path):
    root = project(tmp_path)
    unchecked: list[str] = []
    assert lint_nix.lint_problems(root, on_unchecked=unchecked.append) == []
    assert unchecked == [("nix evaluation of nixos: it has no flake.lock and its inputs cannot be fetched (no "
                          "network): run invoke update-flake on a machine with network access and commit the lock")]
    config = write_config(tmp_path / "rt.yaml", tmp_path / "output")
    res = invoke(["lint", "--check", "nix"], config, timeout=300)
    assert res.returncode == 0 and "not checked: nix evaluation of nixos" in res.stderr, res.stderr
    assert "lint: clean" not in res.stderr and "1 check(s) could not run" in res.stderr
