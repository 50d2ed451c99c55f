"""The Debian profile's pure parts: apt sources, Release files, the disk layout, the rendered
customize hook, the mmdebstrap command, failures in the user's terms, the .deb cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline import distros
from pipeline.base.errors import BuildFailed, ConfigError, HostUnsuitable
from pipeline.config import load, load_file
from pipeline.contents.packages import Package, parse_dpkg_query
from pipeline.distros import debian
from pipeline.drivers import debcache, mmdebstrap
from pipeline.model import Accel, Arch
from pipeline.plan import make_build_plan
from pipeline.render import debian as render
from tests.support import ROOT
from tests.unit.test_accel import facts

CFG = load_file(ROOT / "invoke.yaml")
X86 = CFG.image("debian13-x86_64")
ARM = CFG.image("debian13-aarch64")


# ------------------------------------------------------------------------------------------ mirrors

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_hosts_deb822_sources_name_its_mirror_and_security_archive():
    entries = debian.parse_sources([DEB822])
    assert entries == [("http://deb.debian.org/debian", "bookworm"), ("http://deb.debian.org/debian", "bookworm-updates"),
                       ("http://deb.debian.org/debian-security", "bookworm-security")]
    assert debian.host_mirrors(entries) == ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")


def test_one_line_sources_and_an_ubuntu_host_are_told_apart():
    listed = "# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian/ trixie main\n" \
             "deb-src http://ftp.de.debian.org/debian trixie main\n"
    assert debian.host_mirrors(debian.parse_sources([listed])) == ("http://ftp.de.debian.org/debian", None)
    ubuntu = "deb http://archive.ubuntu.com/ubuntu noble main\ndeb http://security.ubuntu.com/ubuntu noble-security main\n"
    assert debian.host_mirrors(debian.parse_sources([ubuntu])) == (None, None)
    disabled = "Types: deb\nURIs: http://m/debian\nSuites: trixie\nEnabled: no\n"
    assert debian.parse_sources([disabled]) == []


def test_mirror_in_invoke_yaml_wins_over_the_host(monkeypatch):
    monkeypatch.setattr(debian, "_host_sources", lambda: (("http://host/debian", "/etc/apt/x.sources"), "http://host/sec"))
    own = dataclasses.replace(X86, mirror="http://mirror.example/debian/")
    assert debian.mirrors_for(own) == debian.Mirrors("http://mirror.example/debian", "http://host/sec", "mirror: in invoke.yaml")
    assert debian.mirrors_for(X86) == debian.Mirrors("http://host/debian", "http://host/sec", "from /etc/apt/x.sources")
    monkeypatch.setattr(debian, "_host_sources", lambda: (None, None))
    assert debian.mirrors_for(X86).main == debian.DEFAULT_MIRROR
    assert [debian.pocket_name(u) for u in debian.release_urls(X86, debian.mirrors_for(X86))] == [
        "trixie", "trixie-updates"]


def test_the_release_date_is_the_builds_source_date_epoch():
    text = "Origin: Debian\nSuite: stable\nCodename: trixie\nDate: Sat, 21 Nov 2026 09:15:44 UTC\nValid-Until: x\n"
    assert debian.parse_release_date(text) == ("Sat, 21 Nov 2026 09:15:44 UTC", 1795252544)
    assert debian.parse_release_date("Origin: Debian\n") is None
    assert debian.parse_release_date("Date: not a date\n") is None


# ------------------------------------------------------------------------------------------ config


def test_versions_are_releases_and_debian_keys_belong_to_debian():
    def problems(body: dict[str, object]) -> list[str]:
        users = [{"name": "admin", "sudo": True, "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey me"]}]
        with pytest.raises(ConfigError) as err:
            load({"images": {"img": {"arch": "x86_64", "ssh_user": "admin", "users": users, **body}}}, ROOT)
        return err.value.problems

    assert problems({"distro": "debian", "version": "14"}) == [
        "images.img.version: Debian '14' is not a release imagepipe builds: use one of 12 (bookworm), 13 (trixie)"]
    assert problems({"distro": "almalinux", "version": "10", "packages": ["vim"], "mirror": "http://m/debian"}) == [
        "images.img.mirror: only Debian images read it", "images.img.packages: only Debian images read it"]
    assert problems({"distro": "debian", "version": "13", "packages": ["vim", "Bad Name"]}) == [
        "images.img.packages: not a package name: 'Bad Name' (lowercase letters, digits, '+', '-', '.')"]
    assert problems({"distro": "debian", "version": "13", "mirror": "ftp://m/debian"})[0].startswith("images.img.mirror:")


def test_version_12_is_a_one_line_change():
    bookworm = dataclasses.replace(X86, version="12")
    assert render.suite(bookworm) == "bookworm"
    assert "systemd-resolved" in render.packages(X86) and "systemd-resolved" not in render.packages(bookworm)
    script = render.customize_script(bookworm)
    assert "Suites: bookworm bookworm-updates" in script and "trixie" not in script
    assert render.template_path(ROOT, bookworm) == ROOT / "debian/debian12/x86_64/debian13-x86_64/customize.sh"


def test_own_packages_come_last_and_once():
    own = dataclasses.replace(X86, packages=("vim", "sudo"))
    wanted = render.packages(own)
    assert wanted[-1] == "vim" and wanted.count("sudo") == 1
    assert {"linux-image-cloud-amd64", "grub-pc-bin", "grub-efi-amd64-bin"} <= set(wanted)
    assert {"linux-image-cloud-arm64", "grub-efi-arm64-bin"} <= set(render.packages(ARM))
    assert "grub-pc-bin" not in render.packages(ARM)


# ------------------------------------------------------------------------------------------ the disk


def test_the_layout_is_debians_and_its_ids_are_fixed_per_image():
    lay = render.layout(X86)
    script = lay.sfdisk_script()
    assert "label: gpt" in script and f"label-id: {lay.disk_guid.upper()}" in script
    assert "1: start=262144," in script and "14: start=2048, size=6144" in script and "15: start=8192, size=253952" in script
    assert f"type={render.ROOT_TYPE[Arch.X86_64]}" in script
    assert lay.root_bytes % 4096 == 0 and render.ROOT_START + lay.root_bytes + render.GPT_BACKUP <= lay.disk_bytes
    assert render.layout(X86) == lay  # the same image: the same ids (reproducible builds)
    other = render.layout(dataclasses.replace(X86, name="other"))
    assert other.root_uuid != lay.root_uuid and other.disk_guid != lay.disk_guid
    arm = render.layout(ARM).sfdisk_script()
    assert "14:" not in arm and f"type={render.ROOT_TYPE[Arch.AARCH64]}" in arm  # UEFI only
    assert len(lay.esp_volume_id) == 8 and lay.esp_fstab_id == f"{lay.esp_volume_id[:4]}-{lay.esp_volume_id[4:]}".upper()


def test_grub_finds_the_root_by_uuid_with_the_serial_console():
    lay = render.layout(X86)
    cfg = render.grub_cfg(X86, "6.12.1-cloud-amd64")
    assert f"search --no-floppy --fs-uuid --set=root {lay.root_uuid}" in cfg
    assert f"linux /boot/vmlinuz-6.12.1-cloud-amd64 root=UUID={lay.root_uuid} ro console=tty0 console=ttyS0,115200n8" in cfg
    assert "serial --unit=0" in cfg and "serial" not in render.grub_cfg(ARM, "6.12.1-cloud-arm64")
    assert "console=ttyAMA0,115200n8" in render.grub_cfg(ARM, "6.12.1-cloud-arm64")
    assert render.grub_early_cfg(X86) == f"search --no-floppy --fs-uuid --set=root {lay.root_uuid}\n" \
                                         "set prefix=($root)/boot/grub\n"


def test_a_disk_too_small_for_the_root_is_measured_not_guessed():
    need = mmdebstrap.needed_disk_mib(430 << 20, 17000)
    assert 600 <= need <= 768 and need % 64 == 0
    assert mmdebstrap.needed_disk_mib(4 << 30, 100000) > 4096
    assert mmdebstrap.journal_bytes(700 << 20) == 16 << 20 and mmdebstrap.journal_bytes(3 << 30) == 64 << 20


# ------------------------------------------------------------------------------------------ the customize hook


def test_the_customize_hook_holds_the_image_and_nothing_of_this_host():
    script = render.customize_script(X86)
    lay = render.layout(X86)
    assert script.startswith("#!/bin/sh\n") and "set -eu" in script
    assert f"UUID={lay.root_uuid} / ext4" in script and f"UUID={lay.esp_fstab_id} /boot/efi vfat" in script
    assert "datasource_list: [ NoCloud, None ]" in script
    assert ': > "$root/etc/machine-id"' in script and "ssh_host_*_key" in script
    assert "systemctl disable apt-daily.timer apt-daily-upgrade.timer" in script
    assert "admin ALL=(ALL:ALL) NOPASSWD: ALL" in script and "PermitRootLogin yes" in script
    assert "IMAGEPIPE_SSH_KEYS" in script and "ssh-ed25519" not in script  # the build key: staged only
    assert "deb.debian.org" not in script.split("set -eu", 1)[1]  # the mirror comes at build time
    locked = dataclasses.replace(X86, root_ssh=False)
    assert "PermitRootLogin prohibit-password" in render.customize_script(locked)


def test_every_configured_value_is_quoted():
    odd = dataclasses.replace(X86, users=(*X86.users[:1], dataclasses.replace(
        X86.users[1], public_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey it's mine",))))
    assert "'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey it'\"'\"'s mine'" in render.customize_script(odd)


# ------------------------------------------------------------------------------------------ the build


VARIABLES = {"mirror": "http://m/debian", "security_mirror": "http://m/debian-security", "source_date_epoch": "1",
             "customize": "/s/inputs/customize.sh", "ssh_keys": "/s/inputs/ssh_keys"}


def test_the_mmdebstrap_command_is_an_argv_with_the_cache_hooks():
    argv = mmdebstrap.mmdebstrap_argv(X86, Path("/s"), VARIABLES)
    assert argv[:4] == ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory"]
    assert "--setup-hook=sync-in /s/debs-in /var/cache/apt/archives/" in argv
    assert "--customize-hook=sync-out /var/cache/apt/archives /s/debs-out" in argv
    assert argv.index("--customize-hook=sync-out /var/cache/apt/archives /s/debs-out") < \
        argv.index("--customize-hook=/s/inputs/customize.sh")  # the cache is taken before the hook runs
    assert argv[-5:] == ["trixie", "/s/root", "deb http://m/debian trixie main", "deb http://m/debian trixie-updates main",
                         "deb http://m/debian-security trixie-security main"]
    wrapped = mmdebstrap.in_namespace(argv, "qemu-aarch64")
    assert wrapped[:4] == ["unshare", "--mount", "--propagation", "private"] and wrapped[-len(argv):] == argv
    assert mmdebstrap.binfmt_name(ARM, Arch.X86_64) == "qemu-aarch64" and mmdebstrap.binfmt_name(X86, Arch.X86_64) == ""


def test_a_missing_package_is_named():
    tail = "I: running apt-get install...\nE: Unable to locate package vimm\nE: Package 'nosuch' has no installation candidate\n"
    err = mmdebstrap.mmdebstrap_failure(X86, ["mmdebstrap"], 1, tail, VARIABLES, Path("/log"))
    assert isinstance(err, BuildFailed)
    assert err.message == "no package nosuch, vimm in Debian 13 (trixie) on http://m/debian"
    assert "images.debian13-x86_64.packages" in (err.hint or "")


def test_installed_packages_and_their_purls():
    text = "adduser\t3.152\tall\tii \nlibc6\t2.41-12\tamd64\tii \ngone\t1.0\tamd64\trc \n"
    found = parse_dpkg_query(text, distro="debian-13")
    assert [p.name for p in found] == ["adduser", "libc6"]
    assert found[1].purl == "pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=debian-13"
    assert Package("deb", "sudo", "1:1.9", arch="amd64").purl == "pkg:deb/debian/sudo@1:1.9?arch=amd64"
    assert mmdebstrap.deb_file_name("sudo", "1:1.9.16p2-3", "amd64") == "sudo_1%3a1.9.16p2-3_amd64.deb"
    with pytest.raises(BuildFailed):
        parse_dpkg_query("half a line\n")


def test_a_foreign_arch_is_built_without_emulating_a_build_vm(tmp_path):
    x86_host = facts()
    plan = make_build_plan(CFG, ARM, distros.profile(ARM), x86_host, Accel.AUTO, tmp_path / "key", build_id="b")
    assert plan.accel.accel is Accel.TCG  # only its boot test is emulated
    alma = CFG.image("almalinux10-aarch64")
    with pytest.raises(HostUnsuitable):
        make_build_plan(CFG, alma, distros.profile(alma), x86_host, Accel.AUTO, tmp_path / "key", build_id="b")
    assert "qemu-aarch64-static" in distros.profile(ARM).needed_tools(ARM, x86_host)
    assert "qemu-aarch64-static" not in distros.profile(X86).needed_tools(X86, x86_host)


def test_macos_is_sent_to_a_builder():
    mac = dataclasses.replace(facts(), os="darwin", machine="arm64")
    problem = distros.profile(X86).host_problem(X86, mac, CFG)
    assert problem is not None and "macOS" in problem.message and "remote-sync-build" in (problem.hint or "")


# ------------------------------------------------------------------------------------------ the .deb cache


def test_the_deb_cache_keeps_packages_by_their_hash(tmp_path):
    cache, out, into = tmp_path / "cache", tmp_path / "out", tmp_path / "in"
    out.mkdir()
    into.mkdir()
    (out / "a_1_amd64.deb").write_bytes(b"package a")
    (out / "b_2_all.deb").write_bytes(b"package b")
    (out / "partial").mkdir()
    got = debcache.absorb(cache, out, used={"a_1_amd64.deb", "b_2_all.deb"})
    assert (got.added, got.used) == (2, 0) and debcache.count(cache) == 2
    blobs = sorted(p.name for p in (cache / "by-sha256").iterdir())
    assert len(blobs) == 2 and all(len(b) == 64 + 4 for b in blobs)
    assert debcache.fill(cache, into) == 2 and (into / "a_1_amd64.deb").read_bytes() == b"package a"
    again = debcache.absorb(cache, out, used={"a_1_amd64.deb"})
    assert (again.added, again.used) == (0, 1)
    old = cache / "names" / "b_2_all.deb"
    os.utime(old, (1, 1))
    assert debcache.prune(cache, before=1000) == 1
    assert debcache.count(cache) == 1 and len(list((cache / "by-sha256").iterdir())) == 1


def test_a_disk_too_small_says_how_much_is_needed_before_any_tool_runs(tmp_path):
    import io

    from pipeline.progress import Progress

    tree = tmp_path / "root"
    (tree / "usr").mkdir(parents=True)
    with open(tree / "usr" / "big", "wb") as f:
        f.truncate(300 << 20)  # counted by its size, as mke2fs -d would write it
    small = dataclasses.replace(X86, disk_size=256)
    with pytest.raises(BuildFailed) as err:
        mmdebstrap.make_disk(small, tree, tmp_path / "esp", tmp_path / "disk.raw", 1, Progress("t", stream=io.StringIO()))
    need = mmdebstrap.needed_disk_mib(300 << 20, 3)
    assert err.value.message == (f"disk_size 256 MiB is too small for debian13-x86_64: its root holds 300.0 MiB in 3 "
                                 f"files and needs a disk of at least {need} MiB")
    assert f"set disk_size: {need}" in (err.value.hint or "")
    assert not (tmp_path / "disk.raw").exists()


def test_the_rendered_image_keeps_the_guest_contract():
    from pipeline import contract

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuildKeyBuildKeyBuildKeyBuildKey0000 imagepipe"
    for image in (X86, ARM, dataclasses.replace(X86, root_ssh=False)):
        script = render.customize_script(image)
        assert contract.check_rendered(image, key, debian.guest_view(image, script, key + "\n")) == [], image.name
    script = render.customize_script(X86)
    broken = script.replace("admin ALL=(ALL:ALL) NOPASSWD: ALL", "").replace("PermitRootLogin yes", "PermitRootLogin no")
    assert contract.check_rendered(X86, key, debian.guest_view(X86, broken, key + "\n")) == [
        "sudo: sudo asks admin for a password",
        "root-ssh: root's password does not work over SSH (root_ssh: true)"]
    assert contract.check_rendered(X86, key, debian.guest_view(X86, script, "")) == [
        "key-login: the build key is not among admin's authorized keys"]
