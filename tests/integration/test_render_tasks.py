"""`invoke render`, `invoke lint`, `invoke fmt` as a user runs them, and the drift check."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.committed import drift, rendered_files
from pipeline.config import load_file
from tests.support import NEEDS_NIX_STORE, ROOT, invoke, project_copy

GENERATED = ("packer", "kickstart")


def test_committed_files_match_the_configuration() -> None:
    files = rendered_files(load_file(ROOT / "invoke.yaml"))
    assert any(p.name == "ks.cfg" for p in files) and any(p.suffix == ".hcl" for p in files)
    assert drift(files) == [], "committed generated files drifted: run invoke render"


def test_render_writes_only_what_changed(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for d in GENERATED for p in (proj / d).rglob("*") if p.is_file()}
    res = invoke(["render"], cwd=proj)
    assert res.returncode == 0 and "up to date" in res.stderr, res.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    cfg = yaml.safe_load((proj / "invoke.yaml").read_text())
    cfg["images"]["almalinux10-aarch64"]["memory"] = 3072
    (proj / "invoke.yaml").write_text(yaml.safe_dump(cfg))
    res = invoke(["render"], cwd=proj)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("wrote ") == 1 and "wrote packer/almalinux10/aarch64/almalinux10-aarch64.pkr.hcl" in res.stderr
    assert re.search(r"\n  memory +\= 3072\n", (proj / "packer/almalinux10/aarch64/almalinux10-aarch64.pkr.hcl").read_text())


def test_render_from_scratch_creates_every_file(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    for d in GENERATED:
        shutil.rmtree(proj / d)
    res = invoke(["render", "-i", "almalinux10-x86_64"], cwd=proj)
    assert res.returncode == 0, res.stderr
    assert (proj / "kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg").is_file()
    assert not (proj / "kickstart/almalinux10/aarch64").exists()


HOSTILE = [
    ("image name with /", lambda c: c["images"].__setitem__("a/b", c["images"]["almalinux10-x86_64"])),
    ("image name with ..", lambda c: c["images"].__setitem__("..", c["images"]["almalinux10-x86_64"])),
    ("image name with space", lambda c: c["images"].__setitem__("alma linux", c["images"]["almalinux10-x86_64"])),
    ("image name with ;", lambda c: c["images"].__setitem__("alma;rm", c["images"]["almalinux10-x86_64"])),
    ("user name with newline",
     lambda c: c["images"]["almalinux10-x86_64"]["users"][1].__setitem__("name", "admin\nrootpw --plaintext x")),
    ("public key with newline", lambda c: c["images"]["almalinux10-x86_64"]["users"][1].__setitem__(
        "public_keys", ["ssh-ed25519 AAAAC3Nza x\n%post\nrm -rf /\n%end"])),
    ("hash with options", lambda c: c["images"]["almalinux10-x86_64"]["users"][1].__setitem__(
        "password_hash", "$6$salt$x --groups=wheel")),
    ("plaintext password", lambda c: c["images"]["almalinux10-x86_64"]["users"][1].__setitem__("password", "admin")),
]


@pytest.mark.parametrize("what,spoil", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_rejected_before_anything_is_written(what: str, spoil, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proj = project_copy(tmp_path)
    for d in GENERATED:
        shutil.rmtree(proj / d)
    cfg = yaml.safe_load((proj / "invoke.yaml").read_text())
    spoil(cfg)
    (proj / "invoke.yaml").write_text(yaml.safe_dump(cfg))
    res = invoke(["render"], cwd=proj)
    assert res.returncode == 2, (what, res.stderr)
    assert "images." in res.stderr and "problem" in res.stderr
    assert not any((proj / d).exists() for d in GENERATED), f"{what}: something was written"


@NEEDS_NIX_STORE  # lint parses every .nix file with nix-instantiate
def test_lint_passes_and_says_which_rendering_it_validated_and_what_it_could_not_check() -> None:
    res = invoke(["lint"], timeout=600)
    assert res.returncode == 0, res.stderr
    assert "packer 1.6.6 predates required_plugins" in res.stderr and "qemu-arguments" in res.stderr
    # nixos/ has no committed flake.lock and there is no network: that check says it did not run,
    # so the lint does not call the result clean
    assert "not checked: nix evaluation of nixos" in res.stderr and "lint: clean" not in res.stderr
    assert "lint: no problems in what ran" in res.stderr


@NEEDS_NIX_STORE  # lint parses every .nix file with nix-instantiate
def test_lint_lists_every_failure(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    ks = proj / "kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg"
    ks.write_text(ks.read_text().replace("eula --agreed", "eula --agreed\nauthconfig --enableshadow"))
    tpl = proj / "packer/almalinux10/aarch64/almalinux10-aarch64.pkr.hcl"
    text = tpl.read_text()
    tpl.write_text(re.sub(r"\n  memory +=", "\n  memory =", text).replace("  cpus ", "  cpu_count = 1\n  cpus "))
    assert tpl.read_text() != text
    res = invoke(["lint"], cwd=proj, timeout=600)
    assert res.returncode != 0
    err = res.stderr
    assert err.count("[drift]") == 2 and "[packer-fmt]" in err and "[kickstart]" in err, err
    assert "authconfig" in err and "[qemu-arguments]" in err and "cpu_count" in err
    assert "[packer-validate]" not in err, "the legacy rendering is rendered fresh, so it still validates"


def test_fmt_check_passes_on_committed_templates() -> None:
    res = invoke(["fmt", "--check"], timeout=300)
    assert res.returncode == 0 and "checked" in res.stderr, res.stderr
