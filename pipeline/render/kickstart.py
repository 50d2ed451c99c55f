"""Kickstart files for AlmaLinux images: Jinja2 (StrictUndefined) over the validated Image.

Only crypt hashes and public keys ever reach the file. Every value placed on a kickstart command
line is quoted the way pykickstart splits lines (shlex), so a configuration value cannot add
options; the config validation already rejects newlines, this is the second fence.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pipeline.contents.packages import GUEST_RPM_LIST, RPM_QUERYFORMAT
from pipeline.iso import iso_arch, major_of
from pipeline.model import Arch, Firmware, Image, User

TEMPLATES = Path(__file__).parent / "templates"
KICKSTART_TEMPLATE = "almalinux-ks.cfg.j2"
MIRROR = "https://repo.almalinux.org/almalinux"

# The crypt hashes shipped in invoke.yaml (root/packer and admin/admin, the original tooling's
# development defaults) -> the well-known password. Used to warn in generated files and to log
# in during development builds; never written anywhere.
DEVELOPMENT_HASHES: dict[str, str] = {
    "$6$imagepipeRoot$BcLE.ioE.zccYau2i1zp774I1CeCY4Qfsv0II9lAym8M6p3EBGL6ZUIh5vXxtpcuqhxFcNYJ52.NquobUQmRG1": "packer",
    "$6$imagepipeAdmn$BvBhbMs1fg18717GTM.l3OJrKkSqI1I6Nb/4e7NZSqesZmaTmXGgiIxuVUURMXz9SVqZSE9dEDuFPzyo8tN8q1": "admin",
}


def major(image: Image) -> str:
    """The AlmaLinux major release of an image (`10` for 10, 10.1 and latest)."""
    return major_of(image.version)


def console_arg(arch: Arch) -> str:
    """The kernel argument for the serial console of `arch`."""
    return f"console={arch.console},115200n8" if arch is Arch.X86_64 else f"console={arch.console}"


def delivery(image: Image) -> str:
    """How the installer finds this file (said in its header)."""
    if image.arch is Arch.AARCH64:
        return "on a CD labelled OEMDRV (Anaconda reads /ks.cfg from it without any typing)"
    return "over Packer's HTTP server (inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg)"


def development_users(image: Image) -> list[str]:
    """Names of the users whose hash is one of the shipped development defaults."""
    return [u.name for u in image.users if u.password_hash in DEVELOPMENT_HASHES]


def ksquote(value: object) -> str:
    """Quote one kickstart argument (pykickstart splits command lines with shlex)."""
    text = str(value)
    if any(c in text for c in "\n\r\0"):
        raise ValueError(f"kickstart value holds a line break: {text[:40]!r}")
    return shlex.quote(text)


def context(image: Image, source: str = "invoke.yaml", repo_base: str | None = None) -> dict[str, object]:
    """Everything the template reads, derived from the image and the package repo
    (`repo_base`: <mirror>/<release>; default: the major release on AlmaLinux's mirror)."""
    base = repo_base or f"{MIRROR}/{major(image)}"
    others: list[User] = [u for u in image.users if u.name != "root"]
    bios = image.arch is Arch.X86_64  # x86_64 disks get a biosboot partition next to the ESP
    # Installed under UEFI, the x86_64 disk also gets the BIOS GRUB (as the official images do),
    # so it boots under both; installed under BIOS it has no UEFI boot loader.
    hybrid = bios and image.firmware is Firmware.UEFI
    return {
        "source": Path(source).name,
        "image": image,
        "arch": image.arch.value,
        "major": major(image),
        "repo_base": base,
        "repo_arch": iso_arch(image),
        "release": base.rstrip("/").rsplit("/", 1)[-1],
        "root": image.user("root"),
        "users": others,
        "key_users": [u for u in image.users if u.public_keys],
        "sudo_users": [u for u in others if u.sudo],
        "dev_users": development_users(image),
        "console": image.arch.console,
        "console_arg": console_arg(image.arch),
        "bios": bios,
        "hybrid": hybrid,
        "boots": "BIOS and UEFI" if hybrid else ("BIOS" if bios else "UEFI"),
        # Root's password works over SSH only when the image says so (the shipped AlmaLinux
        # entries do: the original tooling's dev images log in as root).
        "root_ssh": image.root_ssh,
        "delivery": delivery(image),
        "firmware": image.firmware is Firmware.UEFI,
        # the package list (pipeline.contents.packages): written in %post, downloaded by Packer
        "rpm_list": GUEST_RPM_LIST,
        "rpm_queryformat": RPM_QUERYFORMAT,
    }


def render(image: Image, source: str = "invoke.yaml", repo_base: str | None = None) -> str:
    """The ks.cfg text for `image` (undefined template names are errors, not blanks)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["ksquote"] = ksquote
    return env.get_template(KICKSTART_TEMPLATE).render(**context(image, source, repo_base))
