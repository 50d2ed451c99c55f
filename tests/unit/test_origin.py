"""Where the packer in use came from (`invoke doctor`): the probe snippet run for real against
this host's dpkg database, and the parser."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.host import local_runner
from pipeline.origin import ORIGIN_SNIPPET, parse_origin, plugins_note, probe_packer


def _probe(path: str, via: str = "path"):
    return parse_origin(local_runner(("sh", "-c", ORIGIN_SNIPPET, "origin", path, via)).stdout)


def test_the_distribution_package_is_named_with_its_version():
    qemu_img = shutil.which("qemu-img")  # any packaged binary: Debian 13 has no packer package
    assert qemu_img, "qemu-img must be installed (setup.sh installs qemu-utils)"
    origin = _probe(qemu_img)
    assert origin.kind == "distribution", origin
    assert origin.package and origin.package.startswith("qemu-utils ") and origin.maker
    assert "the distribution's package (package qemu-utils" in origin.describe()


def test_a_binary_no_package_owns_is_a_release_or_hand_install(tmp_path: Path):
    binary = tmp_path / "packer"
    shutil.copy2(os.path.realpath(shutil.which("packer") or "/usr/bin/packer"), binary)
    origin = _probe(str(binary))
    assert origin.kind == "unpackaged" and origin.package is None
    assert "owned by no package" in origin.describe()


def test_packer_named_by_the_variable(tmp_path: Path):
    origin = _probe(shutil.which("packer") or "/usr/bin/packer", "variable")
    assert origin.kind == "variable" and origin.describe().startswith("PACKER=")


def test_a_link_setup_sh_made_in_the_venv(tmp_path: Path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    target = tmp_path / "opt" / "packer"
    target.parent.mkdir()
    shutil.copy2(os.path.realpath(shutil.which("packer") or "/usr/bin/packer"), target)
    (venv / "bin" / "packer").symlink_to(target)
    origin = _probe(str(venv / "bin" / "packer"))
    assert origin.kind == "setup-link" and origin.real == str(target)
    assert "a link that setup.sh made" in origin.describe()


def test_a_path_that_is_not_executable_is_missing(tmp_path: Path):
    assert _probe(str(tmp_path / "nothing")).kind == "missing"


def test_hashicorp_packages_are_told_apart_by_their_maintainer():
    # the fields dpkg-query prints for the package of HashiCorp's apt repository (its Maintainer
    # field is "HashiCorp <support@hashicorp.com>"); that repository cannot be reached here
    out = ("via=path\npath=/usr/bin/packer\nreal=/usr/bin/packer\npackage=packer\n"
           "package_version=1.14.2-1\nmaker=HashiCorp <support@hashicorp.com>\n")
    origin = parse_origin(out)
    assert origin.kind == "hashicorp" and origin.package == "packer 1.14.2-1"
    assert origin.describe().startswith("HashiCorp's package repository")
    assert parse_origin("via=none\n").kind == "missing"
    assert parse_origin("via=path\npath=/nix/store/abc-packer-1.11/bin/packer\n"
                        "real=/nix/store/abc-packer-1.11/bin/packer\n").kind == "nix"


def test_the_local_probe_follows_the_packer_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PACKER", shutil.which("packer") or "/usr/bin/packer")
    assert probe_packer(local_runner).kind == "variable"
    monkeypatch.setenv("PACKER", str(tmp_path / "absent"))
    origin = probe_packer(local_runner)
    assert origin.kind == "missing" and origin.path == str(tmp_path / "absent")


@pytest.mark.parametrize(("version", "new_enough"), [((1, 6, 6), False), ((1, 7, 0), True), ((1, 14, 2), True)])
def test_required_plugins_needs_packer_1_7(version, new_enough):
    note = plugins_note(version)
    assert ("is new enough" in note) is new_enough
    assert ("predates required_plugins" in note) is not new_enough
