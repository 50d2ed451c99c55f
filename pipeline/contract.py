"""The guest contract: what every image must give imagepipe, defined once.

Each requirement has a description, a check on a *rendered* image (a `GuestView` that the
image's distro profile reads back from what it renders: a kickstart, the NixOS configuration
evaluated from the params, the demo initramfs) and a check on a *live* guest (the boot test,
pipeline.vm.boottest, through a `LiveGuest`). Tests run the rendered checks for every profile;
the boot test runs the live checks on a booted image. docs/running.md, "The guest contract".

    key-login       the build's SSH key logs in as ssh_user (added at build time to the staged
                    kickstart / NixOS params / demo initramfs only, never to committed files)
    sudo            every `sudo: true` user runs sudo without a password; ssh_user gets root
    root-ssh        root logs in over SSH with its password exactly when `root_ssh` says so
    serial-console  the kernel's console is the serial port QEMU logs (ttyS0 / ttyAMA0)
    power-off       the ACPI power button (QMP system_powerdown, what `invoke stop` sends) powers
                    the guest off
    guest-agent     a guest that runs qemu-guest-agent gets its virtio-serial port from `run` and
                    the boot test (org.qemu.guest_agent.0), and answers guest-ping on it
    systemd-running a guest that runs systemd finishes booting "running", not "degraded" (a unit
                    failed) within the deadline; a guest without systemd (the demo) says so

Config load refuses (`login_problems`) an SSH user that cannot become root and an image that no
person could log in to: the build key gets imagepipe in, but it lives in output/.keys/ of the
machine that built the image, so root or a sudo user also needs a password hash or a key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.model import Image, User

AGENT_PORT = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class GuestView:
    """What an image gives imagepipe, as read back from one rendering of it."""

    keys: Mapping[str, frozenset[str]]  # user -> authorized public keys
    passwordless_sudo: frozenset[str]   # users that may run any command through sudo without a password
    root_password_ssh: bool             # sshd accepts root's password
    console: str | None                 # the kernel's last console= device
    power_button: bool                  # the ACPI power button powers the guest off
    guest_agent: bool                   # qemu-guest-agent is installed and enabled


@dataclass(frozen=True)
class Expected:
    """What the image's distro profile promises a live guest has (pipeline.distros)."""

    agent: bool = False     # qemu-guest-agent runs and answers on its port
    systemd: bool = False   # systemd is the init: the boot must end "running"


@dataclass(frozen=True)
class Verdict:
    """The verdict of one live check of the contract: passed, failed or not checked (with why)."""

    result: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.result == "failed"


PASSED = Verdict("passed")


def failed(detail: str) -> Verdict:
    return Verdict("failed", detail)


def unchecked(why: str) -> Verdict:
    return Verdict("not checked", why)


class LiveGuest(Protocol):
    """A booted guest, reached the way imagepipe reaches it (implemented in vm/boottest.py)."""

    image: Image

    deadline: float  # seconds the checks may wait for the guest (boot, agent, power-off)

    def run(self, command: Sequence[str]) -> tuple[int, str]:
        """Run `command` over SSH as ssh_user with the build key (batch mode): (exit code, output)."""

    def password_login(self, user: str, password: str) -> bool | None:
        """True when sshd lets `user` in with `password` (keys not offered); None: cannot try here."""

    def console_text(self) -> str:
        """What the serial console logged so far."""

    def agent_ping(self) -> bool:
        """True when the guest agent answers guest-ping on its virtio-serial channel."""

    def power_off(self) -> bool:
        """Press the ACPI power button (QMP system_powerdown); True when QEMU exits in time."""


@dataclass(frozen=True)
class Requirement:
    """One promise every image makes, checked on a rendering and on a live guest."""

    name: str
    description: str
    rendered: Callable[[Image, str, GuestView, bool], str | None]  # (image, build key, view, agent channel)
    live: Callable[[LiveGuest, Expected], Verdict]                 # (guest, what its profile promises)
    ends_boot: bool = field(default=False)                          # the guest is gone afterwards


# --------------------------------------------------------------------------------- config


def sudo_users(image: Image) -> list[str]:
    """Names of the users with `sudo: true` (root needs no sudo)."""
    return [u.name for u in image.users if u.sudo and u.name != "root"]


def login_problems(image: Image) -> list[tuple[str, str]]:
    """(key, message) for what config load refuses; see the module docstring."""
    problems = []
    ssh_user = image.user(image.ssh_user)
    if image.ssh_user != "root" and not (ssh_user and ssh_user.sudo):
        problems.append(("ssh_user", (f"{image.ssh_user!r} is neither root nor a `sudo: true` user: imagepipe's "
                                      "boot test and rebuilds need root through it (sudo -n)")))
    admins = [u for u in image.users if u.name == "root" or u.sudo]
    if not any(u.password_hash or u.public_keys for u in admins):
        problems.append(("users", ("nobody could log in to this image but imagepipe's build key, which stays in "
                                   "output/.keys/ on the machine that built it: give root or a `sudo: true` user a "
                                   "password_hash (console and SSH; invoke hash-password) or public_keys (your key)")))
    return problems


def with_build_key(image: Image, public_key: str, *also: str) -> Image:
    """`image` with the build's public key (and `also`: the key of the machine that asked a
    builder for this build) added to ssh_user's keys (the staged files only)."""
    added = [k.strip() for k in (public_key, *also)]
    users = list(image.users)
    for i, user in enumerate(users):
        if user.name == image.ssh_user:
            new = tuple(k for k in dict.fromkeys(added) if k not in user.public_keys)
            users[i] = dataclasses.replace(user, public_keys=(*user.public_keys, *new))
            break
    else:
        users.append(User(image.ssh_user, public_keys=tuple(dict.fromkeys(added))))
    return dataclasses.replace(image, users=tuple(users))


def root_password_ssh(image: Image) -> bool:
    """What root-ssh expects: root's password works over SSH (only with a password to work)."""
    root = image.user("root")
    return image.root_ssh and bool(root and root.password_hash)


def known_password(image: Image, user: str) -> str | None:
    """The password of `user` when its hash is one of the shipped development defaults."""
    from pipeline.render.kickstart import DEVELOPMENT_HASHES  # noqa: PLC0415 (kept off the no-op build and the input hash)

    account = image.user(user)
    return DEVELOPMENT_HASHES.get(account.password_hash or "") if account else None


# --------------------------------------------------------------------------------- rendered checks


def _key_login(image: Image, key: str, view: GuestView, _agent: bool) -> str | None:
    if key.strip() not in view.keys.get(image.ssh_user, frozenset()):
        return f"the build key is not among {image.ssh_user}'s authorized keys"
    return None


def _sudo(image: Image, _key: str, view: GuestView, _agent: bool) -> str | None:
    missing = [u for u in sudo_users(image) if u not in view.passwordless_sudo]
    return f"sudo asks {', '.join(missing)} for a password" if missing else None


def _root_ssh(image: Image, _key: str, view: GuestView, _agent: bool) -> str | None:
    want = root_password_ssh(image)
    if view.root_password_ssh != want:
        return f"root's password {'does not work' if want else 'works'} over SSH (root_ssh: {str(image.root_ssh).lower()})"
    return None


def _console(image: Image, _key: str, view: GuestView, _agent: bool) -> str | None:
    want = image.arch.console
    return None if view.console == want else f"the kernel console is {view.console or 'not set'}, not {want}"


def _power(image: Image, _key: str, view: GuestView, _agent: bool) -> str | None:
    return None if view.power_button else "the ACPI power button does not power the guest off"


def _agent(image: Image, _key: str, view: GuestView, channel: bool) -> str | None:
    if view.guest_agent and not channel:
        return f"qemu-guest-agent is enabled but the QEMU command line has no {AGENT_PORT} port"
    return None


# --------------------------------------------------------------------------------- live checks


def _live_key_login(guest: LiveGuest, _expect: Expected) -> Verdict:
    rc, out = guest.run(["uname", "-m"])
    if rc != 0:
        return failed(f"cannot log in as {guest.image.ssh_user} with the build key: {out.strip()[-200:]}")
    if out.strip() != guest.image.arch.value:
        return failed(f"the guest reports uname -m = {out.strip()!r}, expected {guest.image.arch.value}")
    return PASSED


def _as_root(guest: LiveGuest, command: list[str]) -> list[str]:
    return command if guest.image.ssh_user == "root" else ["sudo", "-n", *command]


def _live_sudo(guest: LiveGuest, _expect: Expected) -> Verdict:
    rc, out = guest.run(_as_root(guest, ["id", "-u"]))
    if rc != 0 or out.strip() != "0":
        return failed(f"{guest.image.ssh_user} cannot become root without a password: {out.strip()[-200:]}")
    for user in sudo_users(guest.image):
        if user == guest.image.ssh_user:
            continue
        rc, out = guest.run(_as_root(guest, ["sudo", "-n", "-u", user, "sudo", "-n", "true"]))
        if rc != 0:
            return failed(f"sudo asks {user} for a password: {out.strip()[-200:]}")
    return PASSED


def _live_root_ssh(guest: LiveGuest, _expect: Expected) -> Verdict:
    root = guest.image.user("root")
    if root is None or not root.password_hash:
        return Verdict("passed", "root has no password (locked)")
    password = known_password(guest.image, "root")
    if password is None:
        return unchecked("root's password is not a development default, so imagepipe cannot try it")
    want = root_password_ssh(guest.image)
    got = guest.password_login("root", password)
    if got is None:
        return unchecked("this host's ssh cannot send a password without a terminal (needs OpenSSH 8.4)")
    if got != want:
        return failed(f"root's password {'works' if got else 'does not work'} over SSH, "
                      f"root_ssh is {str(guest.image.root_ssh).lower()}")
    return PASSED


def _live_console(guest: LiveGuest, _expect: Expected) -> Verdict:
    want = guest.image.arch.console
    rc, out = guest.run(["cat", "/proc/consoles"])
    if rc != 0 or not any(line.split()[:1] == [want] for line in out.splitlines()):
        return failed(f"/proc/consoles does not list {want}: {out.strip()[:200]!r}")
    if not guest.console_text().strip():
        return failed(f"nothing reached the serial console log on {want}")
    return PASSED


def _live_agent(guest: LiveGuest, expect: Expected) -> Verdict:
    agent = expect.agent
    rc, out = guest.run(["sh", "-c", "cat /sys/class/virtio-ports/*/name"])
    if rc != 0 or AGENT_PORT not in out.split():
        return failed(f"the guest does not see the {AGENT_PORT} virtio-serial port: {out.strip()[:200]!r}")
    if agent and not guest.agent_ping():
        return failed("qemu-guest-agent does not answer guest-ping on its port")
    return PASSED if agent else Verdict("passed", "port present; this image runs no agent")


def _live_systemd(guest: LiveGuest, expect: Expected) -> Verdict:
    if not expect.systemd:
        return unchecked("this image does not run systemd")
    # --wait returns once the boot is over (not "initializing" or "starting"); `timeout` bounds it
    rc, out = guest.run(["timeout", str(max(1, int(guest.deadline))), "systemctl", "is-system-running", "--wait"])
    state = out.strip().splitlines()[-1] if out.strip() else ""
    if rc == 0 and state == "running":
        return PASSED
    if rc == 124 or state in ("initializing", "starting", ""):
        return failed(f"systemd did not finish booting within {guest.deadline:.0f}s (state {state or 'unknown'!r})")
    _rc, units = guest.run(["systemctl", "list-units", "--failed", "--plain", "--no-legend", "--no-pager"])
    names = [line.split()[0] for line in units.splitlines() if line.strip()]
    return failed(f"systemd is {state!r}, not 'running'" + (f": failed units: {', '.join(names)}" if names else ""))


def _no_rendered_view(_image: Image, _key: str, _view: GuestView, _channel: bool) -> str | None:
    """A requirement a rendering cannot show (the boot's end state): checked live only."""
    return None


def _live_power(guest: LiveGuest, _expect: Expected) -> Verdict:
    return PASSED if guest.power_off() else failed("the guest did not power off on the ACPI power button")


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("key-login", "the build's SSH key logs in as ssh_user", _key_login, _live_key_login),
    Requirement("systemd-running", "systemd finishes booting \"running\" (no failed unit), where it is the init",
                _no_rendered_view, _live_systemd),
    Requirement("sudo", "every sudo user has passwordless sudo; ssh_user becomes root", _sudo, _live_sudo),
    Requirement("root-ssh", "root logs in over SSH with its password exactly when root_ssh is true",
                _root_ssh, _live_root_ssh),
    Requirement("serial-console", "the kernel console is the serial port (ttyS0 / ttyAMA0)", _console, _live_console),
    Requirement("guest-agent", "a guest agent has its virtio-serial port and answers", _agent, _live_agent),
    Requirement("power-off", "the ACPI power button (invoke stop) powers the guest off", _power, _live_power,
                ends_boot=True),
)


def check_rendered(image: Image, build_key: str, view: GuestView, agent_channel: bool = True) -> list[str]:
    """Every requirement a rendering breaks, as "name: why" (empty: the rendering keeps the contract)."""
    problems = []
    for req in REQUIREMENTS:
        why = req.rendered(image, build_key, view, agent_channel)
        if why:
            problems.append(f"{req.name}: {why}")
    return problems


def check_live(guest: LiveGuest, agent: bool, say: Callable[[str], None] = lambda _m: None, *,
               systemd: bool = False) -> list[str]:
    """Run every live check in order (power-off last); returns the failures as "name: why".
    `agent` and `systemd`: what the image's profile promises (a guest agent, systemd as init)."""
    expect = Expected(agent=agent, systemd=systemd)
    problems = []
    for req in REQUIREMENTS:
        verdict = req.live(guest, expect)
        say(f"{guest.image.name}: contract {req.name}: {verdict.result}" + (f" ({verdict.detail})" if verdict.detail else ""))
        if verdict.failed:
            problems.append(f"{req.name}: {verdict.detail}")
            if req.name == "key-login":
                break  # nothing else can be checked without a login
    return problems
