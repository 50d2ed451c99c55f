"""The Nix boundary with the real nix (Debian's nix-bin works; see MACHINE.md for NIX_CONFIG).

nixpkgs cannot be fetched here, so real `nix build`s run on tests/fixtures/nixflake (a flake
without inputs whose derivations write qcow2 files), reached exactly as a user's own flake is:
through the image's `flake:` and `attribute:` keys. The project's own flake is checked by
parsing every .nix file and by the lint check (which notes that evaluation needs the network).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline import distros, host
from pipeline.base.errors import BuildFailed, CommandFailed, HostUnsuitable
from pipeline.build import BuildOptions, build_image
from pipeline.config import load
from pipeline.drivers import nix
from pipeline.lint import nix as lint_nix
from pipeline.model import Accel, Config
from pipeline.plan import BuildPlan, make_build_plan
from pipeline.progress import Event, Progress
from tests.support import NEEDS_NIX_STORE, NIX_CONFIG, ROOT, invoke, require_tool, write_config

pytestmark = NEEDS_NIX_STORE

FIXTURE = ROOT / "tests" / "fixtures" / "nixflake"
FACTS = host.probe(tools=["nix"])


@pytest.fixture(autouse=True)
def nix_ready(monkeypatch):
    """Real nix and qemu-img (missing: the test fails with the install hint); a host's own
    NIX_CONFIG wins over the container settings of MACHINE.md."""
    require_tool("nix", "nix-bin")
    require_tool("nix-instantiate", "nix-bin")
    require_tool("qemu-img", "qemu-utils")
    monkeypatch.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)


class Recorder(Progress):
    """A real Progress (plain lines into a buffer) that also keeps the events it showed."""

    def __init__(self) -> None:
        super().__init__("nixos-x86_64", stream=io.StringIO(), live=False)
        self.events: list[Event] = []

    def emit(self, ev: Event) -> None:
        self.events.append(ev)
        super().emit(ev)


def fixture_copy(where: Path) -> Path:
    """A fresh copy of the fixture flake outside any git tree (nix would see tracked files only)."""
    shutil.copytree(FIXTURE, where)
    (where / "nonce").write_text(uuid.uuid4().hex)  # a new derivation: nix really builds
    return where


# someone can log in (config load refuses an image nobody can log in to: pipeline.contract)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def project_config(root: Path, attribute: str | None = None) -> Config:
    """A project whose nixos-x86_64 image comes from the fixture flake (relative `flake:` path)."""
    if not (root / "fixture").exists():
        fixture_copy(root / "fixture")
    image: dict[str, object] = {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "flake": "fixture",
                                "users": [{"name": "admin", "sudo": True}], "ssh_user": "admin"}
    if attribute:
        image["attribute"] = attribute
    return load({"images": {"nixos-x86_64": image}}, root=root)


def project(tmp_path: Path, attribute: str | None = None) -> tuple[BuildPlan, Path]:
    """The build plan of nixos-x86_64 in a fresh project (see project_config)."""
    root = tmp_path / "proj"
    cfg = project_config(root, attribute)
    facts = host.probe(tools=())
    image = cfg.image("nixos-x86_64")
    plan = make_build_plan(cfg, image, distros.profile(image), facts, Accel.AUTO, ssh_key=tmp_path / "key")
    return plan, root


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


@pytest.mark.slow
def test_drive_builds_the_image_and_copies_it_out_of_the_store(tmp_path, caplog):
    plan, _ = project(tmp_path)
    progress = Recorder()
    with caplog.at_level(logging.DEBUG, logger="imagepipe.run"):
        result = nix.NixDriver(distros.profile(plan.image)).drive(plan, FACTS, plan.staging, progress, timeout=300)
    assert result == plan.staging / "nixos.qcow2"
    info = qemu_img_info(result)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * 1024 * 1024
    assert not str(result.resolve()).startswith("/nix/store")
    assert result.stat().st_mode & 0o200, "the copy must be writable by its owner"
    assert not (plan.staging / "result").exists(), "the out-link (a GC root) is removed"
    assert sorted(p.name for p in plan.staging.iterdir()) == ["nixos.qcow2"]
    steps = [e.message for e in progress.events if e.kind == "step"]
    assert len(steps) == 1 and steps[0].startswith("nix build ")  # imagepipe's step; nix's own are "say"
    assert "building fixture-nixos-image" in [e.message for e in progress.events if e.kind == "say"]
    assert any(e.message == "fixture: writing the disk image" for e in progress.events)
    assert progress.events[-1].kind == "artifact"
    assert "@nix {" in plan.raw_log.read_text(), "the raw internal-json log is kept"
    nix_runs = [r.getMessage() for r in caplog.records if "nix --extra-experimental-features" in r.getMessage()]
    assert any(" build " in m for m in nix_runs)
    assert not any("--impure" in m for m in nix_runs)


@pytest.mark.slow
def test_drive_accepts_a_result_that_is_the_image_file(tmp_path):
    plan, root = project(tmp_path, attribute="packages.x86_64-linux.bare-image")
    lock = '{"nodes": {"root": {}}, "root": "root", "version": 7}\n'
    (root / "fixture" / "flake.lock").write_text(lock)
    result = nix.NixDriver(distros.profile(plan.image)).drive(plan, FACTS, plan.staging, Recorder(), timeout=300)
    assert qemu_img_info(result)["virtual-size"] == 32 * 1024 * 1024
    # The lock the image was built from travels with it (the manifest hashes it as an input).
    assert (plan.staging / "flake.lock").read_text() == lock
    assert distros.profile(plan.image).manifest_extra(plan) == {"nixpkgs": None}  # this lock pins no nixpkgs


@pytest.mark.slow
def test_failing_build_reports_nix_error_tail_and_leaves_published_image_alone(tmp_path):
    plan, _ = project(tmp_path, attribute="packages.x86_64-linux.broken")
    published = plan.image_dir / "nixos.qcow2"
    published.parent.mkdir(parents=True)
    published.write_bytes(b"last good image")
    progress = Recorder()
    with pytest.raises(CommandFailed) as err:
        nix.NixDriver(distros.profile(plan.image)).drive(plan, FACTS, plan.staging, progress, timeout=300)
    assert "--impure" not in err.value.argv and "build" in err.value.argv
    assert "cptofs failed" in err.value.tail
    assert "failed with exit code 1" in err.value.tail
    assert "disk_size" in (err.value.hint or "") and str(plan.build_log) in (err.value.hint or "")
    assert not (plan.staging / "nixos.qcow2").exists() and not (plan.staging / "result").exists()
    assert published.read_bytes() == b"last good image"
    assert any(e.kind == "error" for e in progress.events)


@pytest.mark.slow
def test_missing_attribute_is_a_clear_failure(tmp_path):
    plan, _ = project(tmp_path, attribute="packages.x86_64-linux.nope")
    with pytest.raises(CommandFailed) as err:
        nix.NixDriver(distros.profile(plan.image)).drive(plan, FACTS, plan.staging, Recorder(), timeout=300)
    assert "does not provide attribute" in err.value.tail
    assert "attribute" in (err.value.hint or "")


@pytest.mark.slow
def test_result_without_an_image_fails_and_stages_nothing(tmp_path):
    plan, _ = project(tmp_path, attribute="packages.x86_64-linux.no-image")
    with pytest.raises(BuildFailed) as err:
        nix.NixDriver(distros.profile(plan.image)).drive(plan, FACTS, plan.staging, Recorder(), timeout=300)
    assert "readme.txt" in err.value.message
    assert list(plan.staging.iterdir()) == []


def test_arch_guard_on_this_host_refuses_the_foreign_image():
    facts = host.probe(tools=())
    assert facts.arch is not None
    cfg = load({
        "images": {
            "nixos-x86_64": {"distro": "nixos", "arch": "x86_64", "users": LOGIN},
            "nixos-aarch64": {"distro": "nixos", "arch": "aarch64", "users": LOGIN},
        },
        "builders": {"hal9000": {"arch": "x86_64"}, "rpi": {"host": "rpi", "arch": "aarch64"}},
    }, root=ROOT)
    native = cfg.image(f"nixos-{facts.arch.value}")
    foreign = cfg.image("nixos-aarch64" if native.name == "nixos-x86_64" else "nixos-x86_64")
    profile = distros.get("nixos")
    assert profile.host_problem(native, facts, cfg) is None
    err = profile.host_problem(foreign, facts, cfg)
    assert isinstance(err, HostUnsuitable)
    assert f"invoke remote-build-nixos-{foreign.arch.short} HOST" in err.render()
    assert ("rpi" if foreign.arch.value == "aarch64" else "hal9000") in err.render()


def test_every_nix_file_parses():
    files = lint_nix.nix_files(ROOT)
    assert ROOT / "nixos" / "flake.nix" in files and FIXTURE / "flake.nix" in files
    assert len([f for f in files if f.parent.name == "modules"]) >= 5
    for path in files:
        r = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{path}: {r.stderr}"


def test_lint_passes_the_project_and_says_evaluation_needs_the_network():
    unchecked: list[str] = []
    assert lint_nix.lint_problems(ROOT, on_unchecked=unchecked.append) == []
    if not (ROOT / "nixos" / "flake.lock").exists():
        assert len(unchecked) == 1 and "invoke update-flake" in unchecked[0], unchecked


def test_lint_evaluates_a_flake_that_needs_no_network(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "nixos")
    notes: list[str] = []
    unchecked: list[str] = []
    assert lint_nix.lint_problems(tmp_path, on_note=notes.append, on_unchecked=unchecked.append) == []
    assert notes == [] and unchecked == [], "no inputs: nothing to pin, nothing left unchecked"


def test_lint_reports_a_file_that_does_not_parse(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "nixos")
    (tmp_path / "nixos" / "modules").mkdir()
    (tmp_path / "nixos" / "modules" / "bad.nix").write_text("{ a = ; }\n")
    (problem,) = lint_nix.lint_problems(tmp_path)
    assert problem.startswith("nixos/modules/bad.nix:") and "syntax error" in problem


def test_lint_reports_a_flake_that_does_not_evaluate(tmp_path):
    (tmp_path / "nixos").mkdir()
    (tmp_path / "nixos" / "flake.nix").write_text(
        '{ outputs = { self }: { packages = builtins.throw "fixture: broken outputs"; }; }\n')
    (problem,) = lint_nix.lint_problems(tmp_path)
    # the cause, and on nix that prints a trace (2.34) where it is, never the trace itself
    assert problem in ("nixos: nixosConfigurations and packages do not evaluate: error: fixture: broken outputs",
                       "nixos: nixosConfigurations and packages do not evaluate: error: fixture: broken outputs"
                       " (at flake.nix:1:36)"), problem


@pytest.mark.slow
def test_build_image_publishes_and_a_failed_build_keeps_the_last_good_one(tmp_path):
    from pipeline.output import artifacts

    root = tmp_path / "proj"
    cfg = project_config(root)
    image_dir = cfg.output_dir / "nixos-x86_64"
    result = build_image(cfg, cfg.image("nixos-x86_64"), BuildOptions(), progress=Recorder(), say=lambda _m: None)
    assert result.manifest is not None and result.manifest["artifact"]["format"] == "qcow2"
    assert result.manifest["artifact"]["virtual_size"] == 64 * 1024 * 1024
    published = image_dir / "nixos.qcow2"
    assert published.resolve().is_file()
    good = artifacts.verify_published(image_dir)
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=image_dir / "current", check=True,
                   capture_output=True, timeout=60)

    broken = project_config(root, attribute="packages.x86_64-linux.broken")
    with pytest.raises(CommandFailed) as err:
        build_image(broken, broken.image("nixos-x86_64"), BuildOptions(), progress=Recorder(), say=lambda _m: None)
    assert "cptofs failed" in err.value.tail
    assert artifacts.verify_published(image_dir) == good
    assert artifacts.read_manifest(image_dir)["build_id"] == result.build_id
    assert not (image_dir / ".staging").exists()
    assert len(list((image_dir / "logs").iterdir())) == 2, "the failed build's log is kept"


@pytest.mark.slow
def test_cli_build_nixos_x86_with_the_fixture_flake(tmp_path):
    flake = fixture_copy(tmp_path / "flake")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out, {"images": {"nixos-x86_64": {"flake": str(flake)}}})
    res = invoke(["build-nixos-x86"], cfg, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "building fixture-nixos-image" in res.stderr
    manifest = json.loads((out / "nixos-x86_64" / "manifest.json").read_text())
    assert manifest["image"] == "nixos-x86_64" and manifest["artifact"]["file"] == "nixos.qcow2"
    assert (out / "nixos-x86_64" / "nixos.qcow2").resolve().is_file()


def test_cli_build_nixos_arm_is_refused_on_this_host(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out)
    res = invoke(["build-nixos-arm"], cfg, timeout=300)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "cannot be cross-built" in res.stderr
    assert "invoke remote-build-nixos-arm HOST" in res.stderr
    assert not (out / "nixos-aarch64").exists()


def test_cli_dry_run_shows_the_pure_nix_command(tmp_path):
    out = tmp_path / "out"
    res = invoke(["build-nixos-x86", "--dry-run"], write_config(tmp_path / "c.yaml", out), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    command = lines[lines.index("  command") + 1]
    # the build runs on a staged copy of nixos/ (the build key in its params): named, not made
    assert command.strip().startswith("nix ")
    assert "'<prepared at build time: flake>#packages.x86_64-linux.nixos-x86_64-image'" in command
    assert "--impure" not in command and "template" in res.stdout and f"{ROOT}/nixos/flake.nix" in res.stdout
    assert "staged copy of nixos/" in res.stdout
    assert not (out / "nixos-x86_64" / "builds").exists()
