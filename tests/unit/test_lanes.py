"""The lanes' pure parts: the mirror from apt's sources, the root's cache key, setup.sh's package
list, what is still mounted, pytest's summary line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lanes import lane, roots
from tests.support import ROOT

DEB822 = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_mirror_is_read_from_either_sources_format():
    assert roots.pick_mirror(roots.parse_sources([DEB822])) == "http://deb.debian.org/debian"
    one_line = "# a comment\ndeb [arch=amd64] http://mirror.example/debian/ trixie main\n"
    assert roots.pick_mirror(roots.parse_sources([one_line])) == "http://mirror.example/debian"
    security_only = "deb http://security.debian.org/debian-security trixie-security main\n"
    assert roots.pick_mirror(roots.parse_sources([security_only])) is None
    disabled = DEB822.replace("Types: deb\nURIs: http://deb.debian.org/debian\n",
                              "Types: deb\nEnabled: no\nURIs: http://deb.debian.org/debian\n")
    assert roots.pick_mirror(roots.parse_sources([disabled])) is None


def test_the_root_key_follows_what_the_root_is_made_of():
    key = roots.root_key("forky", ["nix-bin", "qemu-utils"], "http://m/debian", "aa")
    assert key == roots.root_key("forky", ["qemu-utils", "nix-bin", "nix-bin"], "http://m/debian", "aa")
    for other in (roots.root_key("trixie", ["nix-bin", "qemu-utils"], "http://m/debian", "aa"),
                  roots.root_key("forky", ["nix-bin"], "http://m/debian", "aa"),
                  roots.root_key("forky", ["nix-bin", "qemu-utils"], "http://other/debian", "aa"),
                  roots.root_key("forky", ["nix-bin", "qemu-utils"], "http://m/debian", "bb"),
                  roots.root_key("forky", ["nix-bin", "qemu-utils"], "http://m/debian", "aa", ["X \"1\""])):
        assert other != key


def test_the_newest_suite_is_read_though_its_release_is_past_valid_until():
    assert 'Acquire::Check-Valid-Until "false"' in roots.SUITE_APTOPTS[roots.NEWEST]


def test_the_roots_hold_setup_sh_packages():
    packages = roots.setup_packages((ROOT / "setup.sh").read_text())
    assert {"qemu-system-x86", "nix-bin", "ovmf", "rsync", "openssh-server", "python3-venv", "mmdebstrap"} <= set(packages)
    assert "packer" not in packages  # setup.sh decides where packer comes from
    assert set(packages) <= set(lane.setup_sh_packages())
    with pytest.raises(roots.LaneError):
        roots.setup_packages("#!/bin/sh\necho no list\n")


def test_mountpoints_below_a_folder():
    info = ("22 1 0:21 / /proc rw - proc proc rw\n"
            "90 1 0:40 / /var/tmp/imagepipe-lane-x/proc rw - proc proc rw\n"
            "91 1 0:5 / /var/tmp/imagepipe-lane-x/dev rw - devtmpfs udev rw\n"
            "92 1 0:5 / /var/tmp/imagepipe-lane-xy rw - tmpfs t rw\n")
    assert roots.mountpoints_under(Path("/var/tmp/imagepipe-lane-x"), info) == [
        "/var/tmp/imagepipe-lane-x/proc", "/var/tmp/imagepipe-lane-x/dev"]


def test_pytest_summary_line():
    out = "....\n=========== 12 passed, 1 failed, 2 skipped in 30.12s ===========\n"
    assert lane.pytest_summary(out) == "12 passed, 1 failed, 2 skipped in 30.12s"
    assert lane.pytest_summary("......\n6 passed in 192.23s (0:03:12)\n") == "6 passed in 192.23s (0:03:12)"
    assert lane.pytest_summary("no tests ran\n") == ""


def test_every_lane_test_path_exists():
    for one in lane.LANES.values():
        for test in [*one.tests, *one.deselect]:
            path = ROOT / test.split("::")[0]
            assert path.exists(), f"lane {one.name} names {test}, which does not exist"
            if "::" in test:
                assert f"def {test.split('::')[1]}(" in path.read_text()
