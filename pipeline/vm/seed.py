"""An instance's first-boot customisation: a NoCloud seed, a small ISO labelled `cidata`.

The seed holds three things (the renderers are pure; `write_seed` makes the ISO with xorriso):

    meta-data          the instance-id (new per instance: cloud-init's per-instance steps run
                       once on its first boot) and local-hostname (the instance's hostname)
    user-data          imagepipe's cloud-config: the SSH keys authorized for the image's
                       ssh_user, the hostname in /etc/hosts, and a boot command that runs
                       imagepipe/boot.sh from this seed on every boot. A user's --user-data
                       (a cloud-config or a script) comes first in a MIME multipart; imagepipe's
                       part is merged into it (lists appended, the user's values kept).
    imagepipe/boot.sh  rewritten at every start: mounts the instance's shared folders at
                       /mnt/TAG (cloud-init runs user-data once, but the boot command every boot,
                       so shares given to a later `run` are mounted too).

cloud-init reads it on the images that have it (Debian; AlmaLinux and NixOS as built by
imagepipe). The demo guest has no cloud-init: its init reads the same seed itself (hostname,
keys, boot.sh; never user-data scripts).
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import yaml

from pipeline.base.errors import UsageError
from pipeline.base.fsutil import atomic_copy
from pipeline.base.run import run

LABEL = "cidata"
SEED_MOUNT = "/run/imagepipe-seed"
BOOT_SCRIPT = "imagepipe/boot.sh"
BOUNDARY = "==imagepipe-user-data=="
# imagepipe's part is merged into the user's: lists appended (both parts' users, bootcmd), and
# where both set one key, the user's value stays.
MERGE_HOW = "dict(no_replace,recurse_list)+list(append)"
# user-data kinds imagepipe can merge with its own (first line → MIME subtype)
KINDS = {"#cloud-config": "cloud-config", "#!": "x-shellscript"}
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# every boot: mount this seed, run its boot.sh (the shares of this start), unmount it
BOOTCMD = (f"d=$(blkid -L {LABEL} || blkid -L {LABEL.upper()}) || exit 0; mkdir -p {SEED_MOUNT} && "
           f"mount -o ro \"$d\" {SEED_MOUNT} || exit 0; sh {SEED_MOUNT}/{BOOT_SCRIPT}; umount {SEED_MOUNT}")


@dataclass(frozen=True)
class SeedShare:
    """A shared folder as the guest mounts it."""

    tag: str
    method: str  # virtiofs | 9p


@dataclass(frozen=True)
class Seed:
    """What an instance's seed says."""

    instance_id: str
    hostname: str
    user: str                       # the image's ssh_user: gets the keys
    keys: tuple[str, ...]           # public keys (`type base64 [comment]`)
    user_data: str | None = None    # the user's --user-data, checked by `check_user_data`
    shares: tuple[SeedShare, ...] = ()


def hostname_for(name: str) -> str:
    """An instance name as a hostname: lower case, '_' and '.' as '-' (RFC 1123 label)."""
    host = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:63].rstrip("-")
    if not HOSTNAME_RE.fullmatch(host):
        raise UsageError(f"instance name {name!r} gives no valid hostname", "use letters, digits and '-'")
    return host


def meta_data(seed: Seed) -> str:
    return yaml.safe_dump({"instance-id": seed.instance_id, "local-hostname": seed.hostname}, sort_keys=False)


def cloud_config(seed: Seed) -> dict[str, object]:
    """imagepipe's cloud-config for the instance (a mapping; `user_data` renders it)."""
    return {
        "manage_etc_hosts": "localhost",   # 127.0.1.1 names the new hostname (sudo resolves it)
        "disable_root": False,             # root's keys are not made to print "log in as ..."
        "users": [{"name": seed.user, "lock_passwd": False, "ssh_authorized_keys": list(seed.keys)}],
        "bootcmd": [["sh", "-c", BOOTCMD]],
    }


def user_data(seed: Seed) -> str:
    """The seed's user-data: imagepipe's cloud-config alone, or a MIME multipart with the
    user's part first and imagepipe's merged into it."""
    ours = "#cloud-config\n" + yaml.safe_dump(cloud_config(seed), sort_keys=False, width=1 << 16)
    if seed.user_data is None:
        return ours
    kind = user_data_kind(seed.user_data)
    mime = MIMEMultipart(boundary=BOUNDARY)
    mime.attach(_part(seed.user_data, kind, "user-data"))
    mine = ours + yaml.safe_dump({"merge_how": MERGE_HOW}, width=1 << 16)
    mime.attach(_part(mine, "cloud-config", "imagepipe.cfg"))
    return mime.as_string() + "\n"


def _part(text: str, subtype: str, name: str) -> MIMEText:
    part = MIMEText(text, subtype, "utf-8")
    part.add_header("Content-Disposition", "attachment", filename=name)
    return part


def user_data_kind(text: str) -> str:
    """The MIME subtype of a user's user-data, from its first line."""
    first = text.split("\n", 1)[0].strip()
    for prefix, kind in KINDS.items():
        if first == prefix or (prefix == "#!" and first.startswith(prefix)):
            return kind
    raise UsageError(f"user-data must start with '#cloud-config' or a '#!' script line, not {first[:40]!r}",
                     "imagepipe merges a cloud-config or a script with its own part (other kinds: "
                     "write them into a cloud-config's write_files or runcmd)")


def check_user_data(path: Path) -> str:
    """A user's --user-data file, read and checked: a cloud-config must be a YAML mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--user-data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--user-data {path}: cannot be read ({exc})") from None
    if BOUNDARY in text:
        raise UsageError(f"--user-data {path}: contains imagepipe's MIME boundary {BOUNDARY!r}")
    if user_data_kind(text) == "cloud-config":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--user-data {path}: not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise UsageError(f"--user-data {path}: a cloud-config must be a mapping (key: value), "
                             f"not a {type(data).__name__}")
    return text


def boot_script(name: str, shares: Sequence[SeedShare]) -> str:
    """imagepipe/boot.sh: mount the shared folders of this start at /mnt/TAG (POSIX sh, root)."""
    lines = [
        "#!/bin/sh",
        f"# Written by imagepipe at this start of instance {name}: mount its shared folders.",
        "# share METHOD TAG: mount the shared folder TAG at /mnt/TAG, unless something is mounted there",
        "share() {",
        '  mkdir -p "/mnt/$2" || return',
        '  grep -qs " /mnt/$2 " /proc/mounts && return',
        '  case "$1" in',
        '    virtiofs) mount -t virtiofs "$2" "/mnt/$2" ;;',
        '    9p) mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$2" "/mnt/$2" ;;',
        "  esac || echo \"imagepipe: the shared folder $2 could not be mounted at /mnt/$2\" >&2",
        "}",
    ]
    lines += [f"share {s.method} {shlex.quote(s.tag)}" for s in shares]
    return "\n".join(lines) + "\n"


def write_seed(seed: Seed, name: str, dest: Path) -> None:
    """The seed ISO at `dest` (replaced atomically): meta-data, user-data, imagepipe/boot.sh,
    volume label cidata, Rock Ridge and Joliet names (what cloud-init's NoCloud reads)."""
    with tempfile.TemporaryDirectory(prefix="imagepipe-seed-") as tmp:
        folder = Path(tmp)
        files = {"meta-data": meta_data(seed), "user-data": user_data(seed),
                 BOOT_SCRIPT: boot_script(name, seed.shares)}
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text, encoding="utf-8")
        iso = folder / "seed.iso"
        run(["xorriso", "-as", "mkisofs", "-quiet", "-output", iso, "-volid", LABEL, "-joliet", "-rock",
             "-graft-points", *[f"{rel}={folder / rel}" for rel in files]], timeout=60)
        atomic_copy(iso, dest)
