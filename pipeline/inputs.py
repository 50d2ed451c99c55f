"""The input hash of an image: everything that decides what a build produces, in one sha256.

Parts (each named in `InputHash.parts`, so a changed hash can be explained):
  - the committed rendered files of the image: its Packer template, its kickstart, its
    iso.lock.json entry (AlmaLinux); for NixOS the flake (flake.nix, flake.lock, modules/,
    params/<image>.json);
  - the image's configuration (canonical JSON of the Image, minus fields that only steer the
    pipeline: `retention`, `schedule`);
  - the feature versions of the tools that build it: packer and nix major.minor (their major
    never moves; minor releases change behaviour, e.g. Packer 1.7's plugins), qemu major;
  - imagepipe's version.

Speed matters (`invoke build IMAGE --if-changed` runs from a timer and must answer well under a
second): no host probe and no heavy import. Tool versions come from a small cache keyed by the
binary's path, size and mtime (output/.cache/tool-versions.json), so a version command only runs
after a tool was installed or upgraded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline import __version__, distros
from pipeline.base.errors import CorruptState
from pipeline.host import cached_tools
from pipeline.model import Config, Image
from pipeline.output import artifacts

# Image fields that steer the pipeline but never change the bytes of a build.
NOT_INPUTS = frozenset({"retention", "schedule"})
VERSION_CACHE = Path(".cache") / "tool-versions.json"


@dataclass(frozen=True)
class InputHash:
    """The hash and what went into it (part name -> sha256 or value)."""

    value: str
    parts: dict[str, str]

    def changed_parts(self, previous: dict[str, str] | None) -> list[str]:
        """Names of the parts that differ from an earlier `parts` (all when unknown)."""
        if not previous:
            return sorted(self.parts)
        keys = set(self.parts) | set(previous)
        return sorted(k for k in keys if self.parts.get(k) != previous.get(k))


def input_files(root: Path, image: Image) -> list[Path]:
    """The committed files that define `image` (existing ones only), in a stable order."""
    return sorted({p for p in distros.profile(image).input_files(root, image) if p.is_file()})


def image_config(image: Image) -> str:
    """Canonical JSON of the image's build-relevant configuration."""
    data = {f.name: _plain(getattr(image, f.name)) for f in fields(image) if f.name not in NOT_INPUTS}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def tools_for(image: Image) -> list[str]:
    """The host tools whose version can change the build's output."""
    return distros.profile(image).hash_tools(image)


def feature_version(tool: str, version: str | None) -> str:
    """qemu: major; packer, nix: major.minor; 'missing' when the tool is not installed."""
    if not version:
        return "missing"
    parts = version.split(".")
    return parts[0] if tool.startswith("qemu") else ".".join(parts[:2])


def tool_versions(tools: list[str], cache_dir: Path, save: bool = True) -> dict[str, str | None]:
    """Version strings of `tools`, from the stat-keyed cache or by running `TOOL --version`
    (save=False: the cache is read, never written)."""
    return {name: info.version for name, info in cached_tools(tools, cache_dir / VERSION_CACHE, save).items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compute(cfg: Config, image: Image, versions: dict[str, str | None] | None = None, *,
            save_cache: bool = True) -> InputHash:
    """The input hash of `image` under `cfg` (versions: tool -> version, looked up if omitted;
    save_cache=False: the version cache is not written, as in a dry run)."""
    if versions is None:
        versions = tool_versions(tools_for(image), cfg.output_dir, save_cache)
    parts: dict[str, str] = {}
    for path in input_files(cfg.root, image):
        parts[f"file:{path.relative_to(cfg.root) if path.is_relative_to(cfg.root) else path}"] = _sha(path.read_bytes())
    parts.update(distros.profile(image).input_parts(cfg.root, image))
    parts["config"] = _sha(image_config(image).encode())
    for tool in tools_for(image):
        parts[f"tool:{tool}"] = feature_version(tool, versions.get(tool))
    parts["imagepipe"] = __version__
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return InputHash(_sha(canonical), parts)


def up_to_date(image_dir: Path, input_hash: str) -> str | None:
    """"up to date: built <when>, <sha>" when the published build has this input hash, else None."""
    try:
        manifest = artifacts.read_manifest(image_dir)
    except CorruptState:  # a damaged published record is not "up to date": building replaces it
        return None
    if not manifest or manifest.get("input_hash") != input_hash:
        return None
    build = artifacts.current_build(image_dir)
    if build is None or not (build / manifest["artifact"]["file"]).is_file():
        return None
    return (f"up to date: built {manifest.get('finished', '?')}, sha256 {manifest['artifact']['sha256'][:16]}… "
            f"(build {manifest['build_id']}, inputs {input_hash[:12]})")
