"""Kickstart rendering: valid for RHEL10 (pykickstart), crypted only, right delivery per arch."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from pykickstart.parser import KickstartParser
from pykickstart.version import RHEL10, makeVersion

from pipeline.config import load_file
from pipeline.distros.almalinux import PROFILE as ALMA
from pipeline.lint.checks import kickstart_problems
from pipeline.model import Arch, Firmware
from pipeline.render import kickstart
from tests.support import ROOT

CFG = load_file(ROOT / "invoke.yaml")
X86 = CFG.image("almalinux10-x86_64")
ARM = CFG.image("almalinux10-aarch64")
KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPq0 o\'brien "laptop"'
OTHER_HASH = "$6$saltsalt$" + "a" * 86


def parse(text: str):  # type: ignore[no-untyped-def]
    handler = makeVersion(RHEL10)
    KickstartParser(handler).readKickstartFromString(text)
    return handler


def with_users(image, **admin_changes):  # type: ignore[no-untyped-def]
    users = tuple(dataclasses.replace(u, **admin_changes) if u.name == "admin" else u for u in image.users)
    return dataclasses.replace(image, users=users)


def test_both_arches_validate_under_rhel10() -> None:
    for image in (X86, ARM):
        assert kickstart_problems(kickstart.render(image)) == []


def test_passwords_are_crypted_only() -> None:
    for image in (X86, ARM):
        text = kickstart.render(image)
        h = parse(text)
        assert h.rootpw.isCrypted and h.rootpw.password.startswith("$6$")
        admin = next(u for u in h.user.userList if u.name == "admin")
        assert admin.isCrypted and admin.password.startswith("$6$") and "wheel" in admin.groups
        assert "--plaintext" not in text
        for plain in kickstart.DEVELOPMENT_HASHES.values():
            assert f"password={plain}" not in text and f"rootpw {plain}" not in text


def test_x86_serves_http_and_boots_bios_and_uefi() -> None:
    text = kickstart.render(X86)
    assert "inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg" in text
    h = parse(text)
    mounts = {p.mountpoint for p in h.partition.partitions}
    assert {"biosboot", "/boot/efi", "/", "/boot"} <= mounts
    assert "console=ttyS0,115200n8" in h.bootloader.appendLine


def test_aarch64_uses_oemdrv_and_uefi_only() -> None:
    text = kickstart.render(ARM)
    assert "OEMDRV" in text and "inst.ks=http" not in text
    h = parse(text)
    mounts = {p.mountpoint for p in h.partition.partitions}
    assert "/boot/efi" in mounts and "biosboot" not in mounts
    assert "console=ttyAMA0" in h.bootloader.appendLine
    assert "/aarch64/os/" in h.url.url


def test_services_network_locale_and_end_of_install() -> None:
    image = dataclasses.replace(X86, lang="de_DE.UTF-8", keyboard="de", timezone="Europe/Berlin")
    h = parse(kickstart.render(image))
    assert {"sshd", "qemu-guest-agent"} <= set(h.services.enabled)
    assert h.network.network[0].bootProto == "dhcp"
    assert (h.lang.lang, h.timezone.timezone, h.keyboard.keyboard) == ("de_DE.UTF-8", "Europe/Berlin", "de")
    assert h.eula.agreed and h.reboot.eject
    assert "qemu-guest-agent" in h.packages.packageList


def test_sudo_dropin_is_passwordless_and_only_for_sudo_users() -> None:
    text = kickstart.render(X86)
    assert "'admin ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/90-imagepipe-admin" in text
    no_sudo = with_users(X86, sudo=False)
    assert "sudoers.d" not in kickstart.render(no_sudo)


def test_sshkey_lines_survive_quotes_in_comments() -> None:
    image = with_users(ARM, public_keys=(KEY,))
    h = parse(kickstart.render(image))
    assert [(k.username, k.key) for k in h.sshkey.sshUserList] == [("admin", KEY)]


def test_development_warning_only_for_shipped_hashes() -> None:
    assert "WARNING: development defaults" in kickstart.render(X86)
    users = tuple(dataclasses.replace(u, password_hash=OTHER_HASH) for u in X86.users)
    assert "WARNING" not in kickstart.render(dataclasses.replace(X86, users=users))


def test_root_without_hash_is_locked() -> None:
    users = tuple(dataclasses.replace(u, password_hash=None) if u.name == "root" else u for u in X86.users)
    h = parse(kickstart.render(dataclasses.replace(X86, users=users)))
    assert h.rootpw.lock


def test_paths_and_quoting() -> None:
    assert ALMA.kickstart_path(Path("/p"), ARM) == Path("/p/kickstart/almalinux10/aarch64/almalinux10-aarch64/ks.cfg")
    assert kickstart.ksquote("a b") == "'a b'"
    try:
        kickstart.ksquote("x\n--plaintext")
    except ValueError:
        pass
    else:
        raise AssertionError("a line break must not reach a kickstart line")
    assert kickstart.console_arg(Arch.AARCH64) == "console=ttyAMA0"
    assert X86.firmware is Firmware.UEFI


# --- image hygiene, boot loaders and root over SSH (issue 11 B, as the official images do) ---

def post_scripts(text: str) -> list[str]:
    """The bodies of the %post sections of a rendered kickstart."""
    from pykickstart.constants import KS_SCRIPT_POST

    return [s.script for s in parse(text).scripts if s.type == KS_SCRIPT_POST]


def heredoc(script: str, marker: str) -> str:
    """The text of the quoted here-document `<<'marker'` inside a %post body."""
    start = script.index(f"<<'{marker}'\n") + len(f"<<'{marker}'\n")
    return script[start:script.index(f"\n{marker}\n", start)] + "\n"


def with_root_ssh(image, value: bool):  # type: ignore[no-untyped-def]
    """`image` with a per-image root_ssh (a config field the lead adds; set directly until then)."""
    if "root_ssh" in {f.name for f in dataclasses.fields(image)}:
        return dataclasses.replace(image, root_ssh=value)
    copy = dataclasses.replace(image)
    object.__setattr__(copy, "root_ssh", value)
    return copy


def test_generic_initramfs_no_rescue_kernel_and_growpart() -> None:
    for image in (X86, ARM):
        h = parse(kickstart.render(image))
        assert {"dracut-config-generic", "cloud-utils-growpart"} <= set(h.packages.packageList)
        assert "dracut-config-rescue" in h.packages.excludedList


def test_kdump_is_disabled_through_the_anaconda_addon() -> None:
    for image in (X86, ARM):
        lines = kickstart.render(image).splitlines()
        at = lines.index("%addon com_redhat_kdump --disable")
        assert lines[at + 1] == "%end"


def test_post_grows_the_root_file_system_at_boot() -> None:
    post = post_scripts(kickstart.render(X86))[0]
    script = heredoc(post, "GROWROOT")
    assert script.startswith("#!/bin/bash\n") and 'growpart "$disk" "$part"' in script
    assert script.rstrip().endswith("xfs_growfs /")
    unit = heredoc(post, "UNIT")
    assert "ExecStart=/usr/local/sbin/imagepipe-growroot" in unit and "WantedBy=multi-user.target" in unit
    assert "systemctl enable imagepipe-growroot.service" in post


def test_post_cleans_caches_then_trims_free_space_last() -> None:
    post = post_scripts(kickstart.render(ARM))[0]
    lines = [line.strip() for line in post.strip().splitlines()]
    assert "dnf clean all" in lines
    trim = next(i for i, line in enumerate(lines) if line.startswith("for fs in /boot /; do"))
    assert lines.index("dnf clean all") < trim and 'fstrim -v "$fs" ||' in lines[trim + 1]
    assert lines[-1] == "done", "trimming is the last thing the install does"


def test_post_scripts_are_valid_bash() -> None:
    bash = require_bash()
    for image in (X86, ARM, dataclasses.replace(X86, firmware=Firmware.BIOS)):
        first, *others = post_scripts(kickstart.render(image))
        for body in (first, heredoc(first, "GROWROOT"), *others):
            res = subprocess.run([bash, "-n"], input=body, text=True, capture_output=True, timeout=30, check=False)
            assert res.returncode == 0, f"{image.name}: {res.stderr}"


def test_x86_uefi_install_adds_the_bios_boot_loader() -> None:
    text = kickstart.render(X86)
    assert X86.firmware is Firmware.UEFI and "the disk boots under BIOS and UEFI" in text
    assert "grub2-pc" in parse(text).packages.packageList
    post = post_scripts(text)[0]
    assert 'grub2-install --target=i386-pc "$boot_disk"' in post
    assert "boot_disk=$(grub2-probe --target=disk /boot/grub2)" in post


def test_only_hybrid_disks_claim_bios_and_uefi() -> None:
    bios = kickstart.render(dataclasses.replace(X86, firmware=Firmware.BIOS))
    assert "the disk boots under BIOS." in bios and "BIOS and UEFI" not in bios
    assert "grub2-pc" not in parse(bios).packages.packageList and "grub2-install" not in bios
    arm = kickstart.render(ARM)
    assert "the disk boots under UEFI." in arm and "grub2" not in arm


def test_root_password_over_ssh_follows_root_ssh() -> None:
    h = parse(kickstart.render(X86))
    assert h.rootpw.allow_ssh, "shipped images keep the original tooling's root login"
    off = parse(kickstart.render(with_root_ssh(X86, False)))
    assert not off.rootpw.allow_ssh and off.rootpw.isCrypted
    assert kickstart.context(with_root_ssh(ARM, False))["root_ssh"] is False
    users = tuple(dataclasses.replace(u, password_hash=None) if u.name == "root" else u for u in X86.users)
    locked = kickstart.render(dataclasses.replace(X86, users=users))
    assert "rootpw --lock" in locked and "--allow-ssh" not in locked


def require_bash() -> str:
    import shutil

    path = shutil.which("bash")
    assert path, "bash not found: install it with `sudo apt-get install bash`"
    return path


def test_a_separate_post_lists_every_rpm_for_the_manifest() -> None:
    """The last %post writes `rpm -qa` in the format pipeline.contents.packages parses, where the template's
    file provisioner downloads it from (both read the same constants)."""
    from pipeline.contents.packages import GUEST_RPM_LIST, RPM_QUERYFORMAT
    from pipeline.render.almalinux import package_list

    for image in (X86, ARM):
        *_, last = post_scripts(kickstart.render(image))
        lines = [line.strip() for line in last.strip().splitlines()]
        assert lines[0] == "set -e"
        assert f"rpm -qa --qf '{RPM_QUERYFORMAT}' > {GUEST_RPM_LIST}" in lines
        assert "grub2" not in last and "fstrim" not in last  # its own block, nothing else in it
        assert package_list().body["source"] == GUEST_RPM_LIST


def run_first_post(image, tmp_path: Path, failing: set[str]) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """The first %post run for real by bash as the installer runs it (its own interpreter line,
    -e/pipefail from the script), with the installed system's folders moved under `tmp_path`
    and the system tools it calls replaced by stubs that succeed, or fail when in `failing`."""
    first = post_scripts(kickstart.render(image))[0]
    root = tmp_path / "sysroot"
    shutil.rmtree(root, ignore_errors=True)  # each run its own: the last one left a 0440 sudoers file
    for sub in ("etc/sudoers.d", "usr/local/sbin", "etc/systemd/system", "etc/cloud"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    body = first
    for folder in ("/etc/sudoers.d/", "/usr/local/sbin/", "/etc/systemd/system/", "/etc/cloud/"):
        body = body.replace(folder, f"{root}{folder}")
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("grub2-probe", "grub2-install", "restorecon", "systemctl", "dnf", "fstrim"):
        out = "echo /dev/vda" if tool == "grub2-probe" else ":"
        (stubs / tool).write_text(f"#!/bin/sh\n{out}\nexit {1 if tool in failing else 0}\n")
        (stubs / tool).chmod(0o755)
    interpreter = next(s.interp for s in parse(kickstart.render(image)).scripts if s.script == first)
    assert interpreter == "/usr/bin/bash"
    return subprocess.run([require_bash()], input=body, text=True, capture_output=True, timeout=60, check=False,
                          env={"PATH": f"{stubs}:/usr/bin:/bin"})


def test_a_failing_command_in_the_first_post_fails_the_install(tmp_path: Path) -> None:
    """--erroronfail sees the script's status: with -e/pipefail a failed grub2-install (or
    restorecon, or systemctl) is that status, not hidden behind the fstrim loop at the end."""
    assert run_first_post(X86, tmp_path, set()).returncode == 0
    for tool in ("grub2-install", "restorecon", "systemctl", "dnf"):
        res = run_first_post(X86, tmp_path, {tool})
        assert res.returncode != 0, f"a failing {tool} left the install passing"
    res = run_first_post(X86, tmp_path, {"fstrim"})  # costs size only: reported, not fatal
    assert res.returncode == 0 and "fstrim / failed" in res.stderr
    assert run_first_post(ARM, tmp_path, {"restorecon"}).returncode != 0
    bios = dataclasses.replace(X86, firmware=Firmware.BIOS)  # no BIOS loader step of its own
    assert run_first_post(bios, tmp_path, set()).returncode == 0
    assert run_first_post(bios, tmp_path, {"systemctl"}).returncode != 0


def test_the_bios_kickstart_validates_under_rhel10() -> None:
    bios = dataclasses.replace(X86, firmware=Firmware.BIOS)
    assert kickstart_problems(kickstart.render(bios)) == []
    h = parse(kickstart.render(bios))
    assert {"biosboot", "/", "/boot"} <= {p.mountpoint for p in h.partition.partitions}


def test_cloud_init_reads_an_instance_seed_and_nothing_else() -> None:
    """cloud-init is installed and enabled for an instance's NoCloud seed; it never probes cloud
    metadata, and leaves the kickstart's accounts, root login, password setting and disk alone."""
    import yaml

    for image in (X86, ARM):
        text = kickstart.render(image)
        assert "cloud-init" in parse(text).packages.packageList
        post = post_scripts(text)[0]
        assert yaml.safe_load(heredoc(post, "CLOUDCFG")) == {
            "datasource_list": ["NoCloud", "None"], "users": [], "disable_root": False, "ssh_pwauth": "unchanged",
            "growpart": {"mode": "off"}, "resize_rootfs": False}
        for unit in ("cloud-init-local", "cloud-init", "cloud-init-main", "cloud-init-network", "cloud-config",
                     "cloud-final"):
            assert f" {unit} " in post.split("for unit in", 1)[1].split(";", 1)[0] + " "
        assert 'systemctl enable "$unit.service"' in post
