"""Debian images: the suite, the package set, the disk layout and the customize hook, rendered
from the validated Image (pure: no I/O).

The customize hook (`customize.sh`) is the image's configuration. mmdebstrap runs it once the
packages are installed, with the new root as `$1` (as Debian's own cloud images run FAI's
scripts): accounts, SSH, sudo, the serial console, networking, cloud-init, apt sources and the
removal of every per-machine identity. It is committed like a kickstart: readable, diffable,
runnable with plain mmdebstrap. What depends on the host is read from the environment at build
time (the mirror, the build's SSH key), never baked in. Every value from the configuration is
shell-quoted; the configuration's validation already refuses control characters.
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.model import Arch, Image

# Debian releases imagepipe builds: version -> suite (codename). Version 14 (forky) is
# Debian's development suite: its Release file on mirrors is often past Valid-Until.
SUITES: dict[str, str] = {"12": "bookworm", "13": "trixie"}
DPKG_ARCH: dict[Arch, str] = {Arch.X86_64: "amd64", Arch.AARCH64: "arm64"}
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HOSTNAME = "debian"

# What every image holds besides Debian's `required` packages (mmdebstrap --variant=minbase),
# as Debian's genericcloud images do: the cloud kernel, systemd with networkd and resolved,
# OpenSSH, sudo, cloud-init with growpart, the guest agent, and GRUB's tools for the boot loaders
# imagepipe installs (-bin packages: they install side by side and never touch a disk
# themselves). No NTP client and no mail or cron: nothing in the image phones out by itself.
BASE_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "libpam-systemd", "openssh-server", "openssh-sftp-server",
    "sudo", "cloud-init", "cloud-guest-utils", "qemu-guest-agent", "e2fsprogs", "initramfs-tools",
    "ca-certificates", "iproute2", "netbase", "procps", "grub2-common",
)
# Packages that exist only from a release on (bookworm's systemd still holds resolved).
SINCE: dict[str, str] = {"systemd-resolved": "13"}
ARCH_PACKAGES: dict[Arch, tuple[str, ...]] = {
    Arch.X86_64: ("linux-image-cloud-amd64", "grub-pc-bin", "grub-efi-amd64-bin"),
    Arch.AARCH64: ("linux-image-cloud-arm64", "grub-efi-arm64-bin"),
}

# GPT type GUIDs (the root's are the Discoverable Partitions Specification's, per arch)
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE: dict[Arch, str] = {Arch.X86_64: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
                              Arch.AARCH64: "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}
SECTOR = 512
MIB = 1 << 20
# The layout of Debian's cloud images: partition 14 (BIOS boot, x86_64 only) at 1 MiB, the ESP
# (15) up to 128 MiB, the root (1) last so that it can grow into a bigger disk on first boot.
BIOS_BOOT = (1 * MIB, 3 * MIB)   # (offset, size)
ESP = (4 * MIB, 124 * MIB)
ROOT_START = 128 * MIB
GPT_BACKUP = 33 * SECTOR         # the backup GPT at the disk's end (header + 32 sectors of entries)
NAMESPACE = uuid.UUID("8c1f4a0e-2d3b-5e6f-9a7b-0c1d2e3f4a5b")  # imagepipe's: fixed ids per image


def suite(image: Image) -> str:
    """The Debian suite (codename) of `image` (KeyError: not a known version)."""
    return SUITES[image.version]


def packages(image: Image) -> list[str]:
    """Every package the image asks for beyond `required`, in a stable order, its own last."""
    since = [p for p, version in SINCE.items() if int(image.version) >= int(version)]
    wanted = [*BASE_PACKAGES, *since, *ARCH_PACKAGES[image.arch], *image.packages]
    return list(dict.fromkeys(wanted))


@dataclass(frozen=True)
class Layout:
    """The disk of one image: its size, partitions (byte offsets) and the fixed ids that make
    two builds of the same inputs alike (every instance has them too, as with any cloud image)."""

    arch: Arch
    disk_bytes: int
    disk_guid: str
    root_partuuid: str
    root_uuid: str        # the ext4 file system's UUID (fstab, GRUB)
    root_hash_seed: str   # ext4's directory hash seed
    esp_partuuid: str
    esp_volume_id: str    # the FAT volume id, 8 hex digits (fstab: XXXX-XXXX)
    bios_partuuid: str

    @property
    def bios(self) -> bool:
        """x86_64 disks also boot with a BIOS (GRUB's core.img in a BIOS boot partition)."""
        return self.arch is Arch.X86_64

    @property
    def root_offset(self) -> int:
        return ROOT_START

    @property
    def root_bytes(self) -> int:
        """The root partition's size: the rest of the disk, 4 KiB blocks, before the backup GPT."""
        usable = self.disk_bytes - GPT_BACKUP - ROOT_START
        return usable - usable % 4096

    @property
    def esp_fstab_id(self) -> str:
        return f"{self.esp_volume_id[:4]}-{self.esp_volume_id[4:]}".upper()

    def sfdisk_script(self) -> str:
        """The partition table as sfdisk's input (sectors), the root first in the table as in
        Debian's images (partition 1), the BIOS boot partition 14 and the ESP 15."""
        lines = ["label: gpt", f"label-id: {self.disk_guid.upper()}", "first-lba: 2048", "table-length: 128"]
        rows = [(1, ROOT_START, self.root_bytes, ROOT_TYPE[self.arch], self.root_partuuid, "root")]
        if self.bios:
            rows.append((14, *BIOS_BOOT, BIOS_BOOT_TYPE, self.bios_partuuid, "bios"))
        rows.append((15, *ESP, ESP_TYPE, self.esp_partuuid, "esp"))
        for number, start, size, kind, partuuid, name in rows:
            lines.append(f"{number}: start={start // SECTOR}, size={size // SECTOR}, type={kind}, "
                         f"uuid={partuuid.upper()}, name=\"{name}\"")
        return "\n".join(lines) + "\n"


def layout(image: Image) -> Layout:
    """The disk layout of `image`; its ids come from the image's name, so they stay the same
    from build to build (reproducible builds) and differ between images."""
    def fixed(part: str) -> str:
        return str(uuid.uuid5(NAMESPACE, f"{image.name}/{part}"))

    return Layout(arch=image.arch, disk_bytes=image.disk_size * MIB, disk_guid=fixed("disk"),
                  root_partuuid=fixed("root-partition"), root_uuid=fixed("root-fs"),
                  root_hash_seed=fixed("root-fs-hash-seed"), esp_partuuid=fixed("esp-partition"),
                  esp_volume_id=fixed("esp-fs").replace("-", "")[:8], bios_partuuid=fixed("bios-partition"))


def kernel_args(image: Image) -> str:
    """The kernel's command line besides root=: both consoles, the serial one last (it becomes
    /dev/console: systemd's and cloud-init's messages reach the console log)."""
    serial = f"{image.arch.console},115200n8"
    return f"console=tty0 console={serial}"


def grub_defaults(image: Image) -> str:
    """/etc/default/grub: what update-grub in the guest (a kernel upgrade) renders from."""
    terminal = ('GRUB_TERMINAL="console serial"\nGRUB_SERIAL_COMMAND="serial --speed=115200"\n'
                if image.arch is Arch.X86_64 else 'GRUB_TERMINAL="console"\n')
    return ("GRUB_DEFAULT=0\nGRUB_TIMEOUT=1\nGRUB_DISTRIBUTOR=Debian\nGRUB_CMDLINE_LINUX_DEFAULT=\"\"\n"
            f"GRUB_CMDLINE_LINUX=\"{kernel_args(image)}\"\n{terminal}GRUB_DISABLE_OS_PROBER=true\n")


def grub_cfg(image: Image, kernel_version: str) -> str:
    """/boot/grub/grub.cfg of a new image (the guest's update-grub replaces it on a kernel
    upgrade, from /etc/default/grub): one entry, the serial console, the root by UUID."""
    lay = layout(image)
    serial = ("serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
              if image.arch is Arch.X86_64 else "")
    return (f"# written by imagepipe for {image.name}; update-grub in the guest replaces it\n"
            f"{serial}set default=0\nset timeout=1\ninsmod part_gpt\ninsmod ext2\n"
            f"search --no-floppy --fs-uuid --set=root {lay.root_uuid}\n"
            f"menuentry 'Debian GNU/Linux' {{\n"
            f"  linux /boot/vmlinuz-{kernel_version} root=UUID={lay.root_uuid} ro {kernel_args(image)}\n"
            f"  initrd /boot/initrd.img-{kernel_version}\n}}\n")


def grub_early_cfg(image: Image) -> str:
    """The configuration built into GRUB's core image and EFI binary: find the root by its UUID."""
    return (f"search --no-floppy --fs-uuid --set=root {layout(image).root_uuid}\n"
            "set prefix=($root)/boot/grub\n")


def template_path(root: Path, image: Image) -> Path:
    """Where the image's customize hook is committed."""
    return root / "debian" / f"debian{image.version}" / image.arch.value / image.name / "customize.sh"


# ------------------------------------------------------------------------------------------ customize.sh

HEADER = """\
#!/bin/sh
# shellcheck disable=SC2016  # crypt hashes are written as they are, in single quotes
# Generated by imagepipe from {source} (images.{name}): edit invoke.yaml and run `invoke render`.
# {title}: mmdebstrap's customize hook for this image, run as root with the new root as $1, e.g.
#   IMAGEPIPE_MIRROR={example} mmdebstrap --variant=minbase --include=... \\
#     --customize-hook=./customize.sh {suite} ROOT {example}
# It reads at build time (never baked into this file):
#   IMAGEPIPE_MIRROR           the Debian mirror the root is built from (the image's apt sources)
#   IMAGEPIPE_SECURITY_MIRROR  its security archive (empty: no security source)
#   IMAGEPIPE_SSH_KEYS         a file of further public keys for {ssh_user} (imagepipe's build key)
set -eu
root="$1"
mirror="${{IMAGEPIPE_MIRROR:?the Debian mirror the root is built from}}"
security="${{IMAGEPIPE_SECURITY_MIRROR:-}}"
in_root() {{ chroot "$root" "$@"; }}
# put MODE PATH: standard input becomes PATH inside the root
put() {{ mkdir -p "$root$(dirname "$2")"; cat > "$root$2"; chmod "$1" "$root$2"; }}
# keys USER: standard input is added to USER's authorized_keys
keys() {{
  home="$(in_root getent passwd "$1" | cut -d: -f6)"
  mkdir -p "$root$home/.ssh"
  cat >> "$root$home/.ssh/authorized_keys"
  chmod 0700 "$root$home/.ssh"; chmod 0600 "$root$home/.ssh/authorized_keys"
  in_root chown -R "$1:" "$home/.ssh"
}}
"""

IDENTITY = """
# No per-machine identity in the image: each instance makes its own machine-id (systemd) and
# SSH host keys (sshd-keygen.service / cloud-init) on first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed" \\
  "$root"/etc/ssh/ssh_host_*_key "$root"/etc/ssh/ssh_host_*_key.pub
echo {hostname} | put 0644 /etc/hostname
printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t{hostname}\\n::1\\t\\tlocalhost ip6-localhost ip6-loopback\\n' | put 0644 /etc/hosts
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
"""

APT = """
# apt: the mirror the image was built from
rm -f "$root/etc/apt/sources.list"
{{
  printf 'Types: deb\\nURIs: %s\\nSuites: {suite} {suite}-updates\\nComponents: main\\nSigned-By: {keyring}\\n' "$mirror"
  if [ -n "$security" ]; then
    printf '\\nTypes: deb\\nURIs: %s\\nSuites: {suite}-security\\nComponents: main\\nSigned-By: {keyring}\\n' "$security"
  fi
}} | put 0644 /etc/apt/sources.list.d/debian.sources
"""

SYSTEM = """
# The disk: the root and the ESP by their fixed ids (imagepipe's disk step writes them)
put 0644 /etc/fstab <<'EOF'
UUID={root_uuid} / ext4 rw,discard,errors=remount-ro 0 1
UUID={esp_id} /boot/efi vfat umask=0077,nofail 0 0
EOF
mkdir -p "$root/boot/efi"
# GRUB: what update-grub renders from after a kernel upgrade (serial console included)
put 0644 /etc/default/grub <<'EOF'
{grub_defaults}EOF
# Networking: DHCP on the guest's NIC (systemd-networkd), names through systemd-resolved
put 0644 /etc/systemd/network/90-dhcp.network <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
in_root systemctl enable systemd-networkd.service systemd-resolved.service
# cloud-init: a NoCloud seed (a CIDATA disk or /var/lib/cloud/seed/nocloud) or nothing at all;
# it never probes cloud metadata addresses. It grows the root partition on first boot.
put 0644 /etc/cloud/cloud.cfg.d/90-imagepipe.cfg <<'EOF'
datasource_list: [ NoCloud, None ]
EOF
# apt's daily timers fetch from the network unasked: off (an image is updated by rebuilding it;
# `systemctl enable --now apt-daily.timer apt-daily-upgrade.timer` turns them back on)
in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer
"""


def customize_script(image: Image, source: str = "invoke.yaml") -> str:
    """The image's customize hook (see the module docstring)."""
    lay = layout(image)
    parts = [HEADER.format(source=Path(source).name, name=image.name, title=f"Debian {image.version} ({suite(image)}) "
                           f"{image.arch.value}", example="http://deb.debian.org/debian", suite=suite(image),
                           ssh_user=image.ssh_user)]
    parts.append(IDENTITY.format(hostname=HOSTNAME))
    parts.append(APT.format(suite=suite(image), keyring=KEYRING))
    parts.append(SYSTEM.format(root_uuid=lay.root_uuid, esp_id=lay.esp_fstab_id, grub_defaults=grub_defaults(image)))
    parts.append(accounts(image))
    return "".join(parts)


def accounts(image: Image) -> str:
    """Users, passwords (crypt hashes only), keys, sudo and root's SSH login, from invoke.yaml."""
    q = shlex.quote
    lines = ["", "# Accounts (invoke.yaml users): crypt hashes and public keys only"]
    sudoers = []
    for user in image.users:
        if user.name != "root":
            lines.append(f"in_root id -u {q(user.name)} >/dev/null 2>&1 || "
                         f"in_root useradd --create-home --shell /bin/bash {q(user.name)}")
        if user.password_hash:
            lines.append(f"printf '%s\\n' {q(user.name + ':' + user.password_hash)} | in_root chpasswd --encrypted")
        if user.public_keys:
            lines.append(f"printf '%s\\n' {' '.join(q(k) for k in user.public_keys)} | keys {q(user.name)}")
        if user.sudo and user.name != "root":
            lines.append(f"in_root adduser --quiet {q(user.name)} sudo")
    # the guest contract's sudo and root-ssh (pipeline.contract: sudo_users, root_password_ssh)
    for user in image.users:
        if user.sudo and user.name != "root":
            sudoers.append(f"{user.name} ALL=(ALL:ALL) NOPASSWD: ALL")
    if image.user(image.ssh_user) is None and image.ssh_user != "root":
        lines.append(f"in_root useradd --create-home --shell /bin/bash {q(image.ssh_user)}")
    lines.append(f'if [ -n "${{IMAGEPIPE_SSH_KEYS:-}}" ]; then keys {q(image.ssh_user)} < "$IMAGEPIPE_SSH_KEYS"; fi')
    if sudoers:
        lines += ["put 0440 /etc/sudoers.d/90-imagepipe <<'EOF'", *sudoers, "EOF"]
    root = image.user("root")
    login = "yes" if image.root_ssh and root is not None and root.password_hash else "prohibit-password"
    lines += ["# root over SSH: " + ("with its password too (root_ssh: true)" if login == "yes" else "keys only"),
              "put 0644 /etc/ssh/sshd_config.d/90-imagepipe.conf <<'EOF'", f"PermitRootLogin {login}", "EOF", ""]
    return "\n".join(lines)
