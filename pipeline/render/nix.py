"""Per-image parameters for the NixOS flake: nixos/params/<image>.json.

The flake under nixos/ is hand-written; what differs between images (users, keys, disk size,
hostname, arch, firmware...) comes from invoke.yaml through these JSON files, which the flake
reads with `builtins.fromJSON`. They are committed (secret-free: password *hashes* and public
keys only), so the flake stays pure and `nix build` never needs `--impure`.

`files(image, root, source)` is what `invoke render` collects per image (through the NixOS
profile, pipeline.distros.nixos). Images with their own `flake:` do not use the project's flake
and get no params.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.model import Firmware, Format, Image

# The NixOS release nixos/flake.nix pins; the stateVersion of images whose version is not X.Y.
NIXOS_RELEASE = "26.05"
PARAMS_DIR = Path("nixos") / "params"
STATE_VERSION_RE = re.compile(r"^\d{2}\.\d{2}$")

# make-disk-image.nix's partitionTableType for each firmware (modules/disk.nix follows it).
PARTITION_TABLE = {Firmware.UEFI: "efi", Firmware.BIOS: "legacy"}


def hostname(image_name: str) -> str:
    """A valid NixOS hostName from an image name (no dots or underscores, ≤ 63 characters)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", image_name).strip("-")[:63].strip("-")
    return name or "nixos"


def state_version(image: Image) -> str:
    """system.stateVersion: the image's version when it names a release (26.05), else the pin."""
    return image.version if STATE_VERSION_RE.match(image.version) else NIXOS_RELEASE


def disk_format(image: Image) -> str:
    """make-disk-image's `format` for the image's primary format (its own qcow2-compressed when
    compress_qcow2 is set); other formats are converted from it after the build (pipeline.build)."""
    if image.compress_qcow2 and image.format is Format.QCOW2:
        return "qcow2-compressed"
    return image.format.value


def params(image: Image) -> dict[str, Any]:
    """The parameters the flake's modules read for `image` (plain JSON data)."""
    return {
        "name": image.name,
        "hostname": hostname(image.name),
        "arch": image.arch.value,
        "system": image.arch.nix_system,
        "firmware": image.firmware.value,
        "partition_table": PARTITION_TABLE[image.firmware],
        "format": disk_format(image),
        "disk_size": image.disk_size,
        "console": image.arch.console,
        "ssh_port": image.ssh_port,
        "ssh_user": image.ssh_user,
        "state_version": state_version(image),
        "lang": image.lang,
        "keyboard": image.keyboard,
        "timezone": image.timezone,
        "cloud_init": True,
        "root_ssh": image.root_ssh,
        "users": [
            {
                "name": u.name,
                "password_hash": u.password_hash,
                "public_keys": list(u.public_keys),
                "sudo": u.sudo,
            }
            for u in image.users
        ],
    }


def dumps(data: dict[str, Any]) -> str:
    """Stable JSON text (sorted keys, 2-space indent, final newline) so diffs stay small."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def params_path(root: Path, image: Image) -> Path:
    """Where the params of `image` live: <root>/nixos/params/<image>.json."""
    return root / PARAMS_DIR / f"{image.name}.json"


def uses_project_flake(image: Image) -> bool:
    """True for NixOS images built from the project's nixos/ flake (no `flake:` of their own)."""
    return image.flake is None


def files(image: Image, root: Path, source: str = "invoke.yaml") -> dict[Path, str]:
    """The generated files `image` owns: its params JSON (none for images with their own flake)."""
    if not uses_project_flake(image):
        return {}
    return {params_path(root, image): dumps(params(image))}
