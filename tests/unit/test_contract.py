"""The guest contract (pipeline/contract.py): config load's refusals, the build key, and every
requirement checked on each profile's *rendered* output (kickstart text, demo initramfs
entries; NixOS is evaluated by the real nix in tests/integration/test_nix_contract.py)."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline import contract, distros
from pipeline.base.errors import ConfigError
from pipeline.config import load, load_file
from pipeline.demo import APPEND, rootfs_entries
from pipeline.distros import almalinux, demo
from pipeline.model import Image, User
from pipeline.render import kickstart
from pipeline.vm.argv import has_agent_channel, qemu_argv
from pipeline.vm.state import StatePaths
from tests.support import ROOT

CFG = load_file(ROOT / "invoke.yaml")
BUILD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuildKeyBuildKeyBuildKeyBuildKey0000 imagepipe"
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUserKeyUserKeyUserKeyUserKeyUser00 me@laptop"
HASH = "$6$saltsalt$" + "d" * 86


def problems(image: dict) -> list[str]:
    try:
        load({"images": {"img": image}}, ROOT)
    except ConfigError as exc:
        return exc.problems
    return []


# --------------------------------------------------------------------------------- config load

def test_an_image_nobody_can_log_in_to_is_refused_with_the_reason():
    (only,) = problems({"distro": "almalinux", "arch": "x86_64"})
    assert only.startswith("images.img.users: nobody could log in to this image but imagepipe's build key")
    assert "password_hash" in only and "public_keys" in only
    # a user who cannot become root does not count
    (only,) = problems({"distro": "almalinux", "arch": "x86_64", "ssh_user": "root",
                        "users": [{"name": "root"}, {"name": "guest", "password_hash": HASH}]})
    assert only.startswith("images.img.users: nobody could log in")


@pytest.mark.parametrize("admin", [{"name": "root", "password_hash": HASH}, {"name": "root", "public_keys": [USER_KEY]},
                                   {"name": "ops", "sudo": True, "public_keys": [USER_KEY]},
                                   {"name": "ops", "sudo": True, "password_hash": HASH}])
def test_root_or_a_sudo_user_with_a_hash_or_a_key_is_enough(admin):
    users = [admin] if admin["name"] == "root" else [admin, {"name": "root"}]
    assert problems({"distro": "almalinux", "arch": "x86_64", "ssh_user": admin["name"], "users": users}) == []


def test_ssh_user_must_be_able_to_become_root():
    got = problems({"distro": "nixos", "arch": "x86_64", "ssh_user": "dev",
                    "users": [{"name": "dev", "password_hash": HASH}, {"name": "root", "password_hash": HASH}]})
    assert got == [("images.img.ssh_user: 'dev' is neither root nor a `sudo: true` user: imagepipe's boot test "
                    "and rebuilds need root through it (sudo -n)")]


def test_an_own_flake_makes_its_own_accounts():
    assert problems({"distro": "nixos", "arch": "x86_64", "flake": "github:me/infra"}) == []


def test_variant_is_offered_per_distro_and_arch():
    login = [{"name": "root", "password_hash": HASH}]
    ok = {"distro": "almalinux", "arch": "x86_64", "variant": "x86_64_v2", "users": login}
    assert problems(ok) == []
    assert problems({**ok, "variant": "x86_64v2"}) == [
        "images.img.variant: AlmaLinux x86_64 offers one of x86_64_v2, got 'x86_64v2' (did you mean 'x86_64_v2'?)"]
    assert problems({**ok, "arch": "aarch64"}) == ["images.img.variant: AlmaLinux aarch64 offers none, got 'x86_64_v2'"]
    assert problems({**ok, "distro": "nixos"}) == ["images.img.variant: NixOS x86_64 offers none, got 'x86_64_v2'"]


def test_root_ssh_defaults_to_off_and_the_shipped_almalinux_entries_keep_it_on():
    login = [{"name": "root", "password_hash": HASH}]
    cfg = load({"images": {"img": {"distro": "almalinux", "arch": "x86_64", "users": login}}}, ROOT)
    assert cfg.image("img").root_ssh is False
    assert [n for n, i in sorted(CFG.images.items()) if i.root_ssh] == ["almalinux10-aarch64", "almalinux10-x86_64",
                                                                         "debian13-aarch64", "debian13-x86_64"]
    assert problems({"distro": "almalinux", "arch": "x86_64", "users": login, "root_ssh": "yes"}) == [
        "images.img.root_ssh: expected true or false, got 'yes'"]


# --------------------------------------------------------------------------------- the build key

def test_the_build_key_goes_to_ssh_user_only_and_once():
    image = CFG.image("almalinux10-x86_64")
    staged = contract.with_build_key(image, BUILD_KEY + "\n")
    assert staged.user("admin").public_keys == (BUILD_KEY,)
    assert staged.user("root").public_keys == ()
    assert contract.with_build_key(staged, BUILD_KEY) == staged
    assert image.user("admin").public_keys == (), "the configured image is left alone"
    bare = Image(name="x", distro="demo", arch=image.arch, ssh_user="root")
    assert contract.with_build_key(bare, BUILD_KEY).users == (User("root", public_keys=(BUILD_KEY,)),)


# --------------------------------------------------------------------------------- AlmaLinux

def alma_variants():
    x86, arm = CFG.image("almalinux10-x86_64"), CFG.image("almalinux10-aarch64")
    extra = (*x86.users, User("ops", password_hash=HASH, sudo=True), User("guest", public_keys=(USER_KEY,)))
    return {
        "x86_64": x86, "aarch64": arm,
        "root_ssh off": dataclasses.replace(x86, root_ssh=False),
        "second sudo user": dataclasses.replace(x86, users=extra),
        "root ssh_user": dataclasses.replace(arm, ssh_user="root"),
        "x86_64_v2": dataclasses.replace(x86, variant="x86_64_v2"),
    }


@pytest.mark.parametrize("name", list(alma_variants()))
def test_the_staged_kickstart_keeps_the_contract(name):
    image = alma_variants()[name]
    text = kickstart.render(contract.with_build_key(image, BUILD_KEY))
    assert contract.check_rendered(image, BUILD_KEY, almalinux.guest_view(text)) == []


def test_kickstart_checks_can_fail():
    image = CFG.image("almalinux10-x86_64")
    text = kickstart.render(contract.with_build_key(image, BUILD_KEY))
    assert contract.check_rendered(image, BUILD_KEY, almalinux.guest_view(kickstart.render(image))) == [
        "key-login: the build key is not among admin's authorized keys"]
    no_dropin = text.replace("printf '%s\\n' 'admin ALL=(ALL) NOPASSWD: ALL'", "true")
    assert contract.check_rendered(image, BUILD_KEY, almalinux.guest_view(no_dropin)) == [
        "sudo: sudo asks admin for a password"]
    off = contract.check_rendered(dataclasses.replace(image, root_ssh=False), BUILD_KEY, almalinux.guest_view(text))
    assert off == ["root-ssh: root's password works over SSH (root_ssh: false)"]
    serial = text.replace("console=ttyS0,115200n8", "console=tty1")
    assert contract.check_rendered(image, BUILD_KEY, almalinux.guest_view(serial)) == [
        "serial-console: the kernel console is tty1, not ttyS0"]
    assert contract.check_rendered(image, BUILD_KEY, almalinux.guest_view(text), agent_channel=False) == [
        "guest-agent: qemu-guest-agent is enabled but the QEMU command line has no org.qemu.guest_agent.0 port"]


# --------------------------------------------------------------------------------- demo

def demo_entries(image: Image, key: str, root_password_ssh: bool) -> list[tuple[str, int, bytes]]:
    staged = contract.with_build_key(image, key)
    root = staged.user("root")
    return rootfs_entries(b"BB", {}, root.public_keys, root.password_hash, {"button": b"", "virtio_console": b""},
                          ["button", "virtio_console"], root_password_ssh)


@pytest.mark.parametrize("root_ssh", [False, True])
def test_the_demo_initramfs_keeps_the_contract(root_ssh):
    image = dataclasses.replace(CFG.image("demo-x86_64"), root_ssh=root_ssh)
    view = demo.guest_view(demo_entries(image, BUILD_KEY, contract.root_password_ssh(image)), APPEND)
    assert view.keys == {"root": frozenset({BUILD_KEY})} and not view.guest_agent
    assert contract.check_rendered(image, BUILD_KEY, view) == []
    flipped = demo.guest_view(demo_entries(image, BUILD_KEY, not root_ssh), APPEND)
    assert [p.split(":")[0] for p in contract.check_rendered(image, BUILD_KEY, flipped)] == ["root-ssh"]
    no_button = [e for e in demo_entries(image, BUILD_KEY, root_ssh) if e[0] != "etc/acpi/PWRF/00000080"]
    assert contract.check_rendered(image, BUILD_KEY, demo.guest_view(no_button, APPEND)) == [
        "power-off: the ACPI power button does not power the guest off"]


# --------------------------------------------------------------------------------- run's argv

def test_run_and_boot_test_give_the_agent_its_channel(tmp_path):
    from pipeline.model import Accel
    from pipeline.plan import AccelChoice

    for name in ("demo-x86_64", "almalinux10-aarch64"):
        image = CFG.image(name)
        argv = qemu_argv(image, AccelChoice(Accel.TCG, "test"), None if name == "demo-x86_64" else _fw(image),
                         tmp_path / "d.qcow2", StatePaths(tmp_path / "run"), 2222)
        assert has_agent_channel(argv)
        sock = next(a for a in argv if a.startswith("socket,id=qga,"))
        assert f"path={tmp_path / 'run' / 'qga.sock'}" in sock
    assert not has_agent_channel(["-device", "virtserialport,name=org.qemu.guest_agent.1"])


def _fw(image: Image):  # type: ignore[no-untyped-def]
    from pipeline.firmware import FirmwareInfo

    return FirmwareInfo(image.arch, "/code.fd", "/vars.fd", "test")


def test_every_requirement_is_described_and_power_off_comes_last():
    names = [r.name for r in contract.REQUIREMENTS]
    assert names == ["key-login", "systemd-running", "sudo", "root-ssh", "serial-console", "guest-agent", "power-off"]
    assert all(r.description for r in contract.REQUIREMENTS)
    assert [r.name for r in contract.REQUIREMENTS if r.ends_boot] == ["power-off"]


# --------------------------------------------------------------------------------- live checks' logic
# (the real guest is tests/integration/test_guest_contract.py; this records what check_live asks)

class Recorded:
    """A LiveGuest answering from a table, recording every command it was asked to run."""

    def __init__(self, image: Image, answers: dict[str, tuple[int, str]], password_ok: bool | None = False,
                 agent: bool = True, powers_off: bool = True) -> None:
        self.image, self.answers, self.password_ok = image, answers, password_ok
        self.agent, self.powers_off, self.asked = agent, powers_off, []
        self.deadline = 30.0

    def run(self, command):  # type: ignore[no-untyped-def]
        self.asked.append(" ".join(command))
        return self.answers.get(" ".join(command), (0, ""))

    def password_login(self, user, password):  # type: ignore[no-untyped-def]
        self.asked.append(f"password {user} {password}")
        return self.password_ok

    def console_text(self) -> str:
        return "login:"

    def agent_ping(self) -> bool:
        return self.agent

    def power_off(self) -> bool:
        self.asked.append("power off")
        return self.powers_off


ALMA_LIVE = {"uname -m": (0, "x86_64\n"), "sudo -n id -u": (0, "0\n"),
             "cat /proc/consoles": (0, "ttyS0                -W- (EC p a)    4:64\n"),
             "sh -c cat /sys/class/virtio-ports/*/name": (0, "org.qemu.guest_agent.0\n")}


def test_live_checks_run_in_order_and_power_off_last():
    image = CFG.image("almalinux10-x86_64")
    guest = Recorded(image, ALMA_LIVE, password_ok=True)
    said: list[str] = []
    assert contract.check_live(guest, agent=True, say=said.append) == []
    assert guest.asked == ["uname -m", "sudo -n id -u", "password root packer", "cat /proc/consoles",
                           "sh -c cat /sys/class/virtio-ports/*/name", "power off"]
    assert said[-1] == "almalinux10-x86_64: contract power-off: passed"


def test_live_failures_are_named_and_a_failed_login_stops_the_rest():
    image = CFG.image("almalinux10-x86_64")
    broken = Recorded(image, {**ALMA_LIVE, "sudo -n id -u": (1, "sudo: a password is required")},
                      password_ok=False, agent=False, powers_off=False)
    assert contract.check_live(broken, agent=True) == [
        "sudo: admin cannot become root without a password: sudo: a password is required",
        "root-ssh: root's password does not work over SSH, root_ssh is true",
        "guest-agent: qemu-guest-agent does not answer guest-ping on its port",
        "power-off: the guest did not power off on the ACPI power button"]
    locked_out = Recorded(image, {"uname -m": (255, "Permission denied (publickey).")})
    assert contract.check_live(locked_out, agent=True) == [
        "key-login: cannot log in as admin with the build key: Permission denied (publickey)."]
    assert locked_out.asked == ["uname -m"]


def test_root_ssh_is_not_checked_when_imagepipe_cannot_try():
    image = CFG.image("almalinux10-x86_64")
    said: list[str] = []
    contract.check_live(Recorded(image, ALMA_LIVE, password_ok=None), agent=True, say=said.append)
    assert "almalinux10-x86_64: contract root-ssh: not checked (this host's ssh cannot send a password without a " \
           "terminal (needs OpenSSH 8.4))" in said
    other = dataclasses.replace(image, users=tuple(dataclasses.replace(u, password_hash=HASH) for u in image.users))
    said.clear()
    contract.check_live(Recorded(other, ALMA_LIVE), agent=True, say=said.append)
    assert any("root-ssh: not checked (root's password is not a development default" in s for s in said)
    nixos = CFG.image("nixos-x86_64")  # no root account at all
    said.clear()
    contract.check_live(Recorded(nixos, ALMA_LIVE), agent=True, say=said.append)
    assert "nixos-x86_64: contract root-ssh: passed (root has no password (locked))" in said


SYSTEMD_WAIT = "timeout 30 systemctl is-system-running --wait"
FAILED_UNITS = "systemctl list-units --failed --plain --no-legend --no-pager"


def test_systemd_must_end_running_where_it_is_the_init():
    image = CFG.image("debian13-x86_64")
    said: list[str] = []
    running = Recorded(image, {**ALMA_LIVE, SYSTEMD_WAIT: (0, "running\n")}, password_ok=True)
    assert contract.check_live(running, agent=True, say=said.append, systemd=True) == []
    assert running.asked[:2] == ["uname -m", SYSTEMD_WAIT]
    assert "debian13-x86_64: contract systemd-running: passed" in said
    degraded = Recorded(image, {**ALMA_LIVE, SYSTEMD_WAIT: (1, "degraded\n"),
                                FAILED_UNITS: (0, "networking.service loaded failed failed Raise network interfaces\n")},
                        password_ok=True)
    assert contract.check_live(degraded, agent=True, systemd=True) == [
        "systemd-running: systemd is 'degraded', not 'running': failed units: networking.service"]
    slow = Recorded(image, {**ALMA_LIVE, SYSTEMD_WAIT: (124, "starting\n")}, password_ok=True)
    assert contract.check_live(slow, agent=True, systemd=True) == [
        "systemd-running: systemd did not finish booting within 30s (state 'starting')"]


def test_a_guest_without_systemd_says_so_instead_of_waiting():
    demo = CFG.image("demo-x86_64")
    said: list[str] = []
    guest = Recorded(demo, {"uname -m": (0, "x86_64\n"), "cat /proc/consoles": ALMA_LIVE["cat /proc/consoles"]})
    contract.check_live(guest, agent=False, say=said.append, systemd=distros.get("demo").systemd)
    assert "demo-x86_64: contract systemd-running: not checked (this image does not run systemd)" in said
    assert SYSTEMD_WAIT not in guest.asked
