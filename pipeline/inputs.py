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
import os
import shutil
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Config, Distro, Image
from pipeline.fsutil import atomic_write
from pipeline.plan import template_path

# Image fields that steer the pipeline but never change the bytes of a build.
NOT_INPUTS = frozenset({"retention", "schedule"})
VERSION_CACHE = Path(".cache") / "tool-versions.json"
ISO_LOCK = "iso.lock.json"


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


def family_dir(image: Image) -> str:
    """almalinux10 / nixos25 / demo: the folder name the renderers use for this image."""
    return template_path(Path("."), image).parent.parent.name


def input_files(root: Path, image: Image) -> list[Path]:
    """The committed files that define `image` (existing ones only), in a stable order."""
    candidates: list[Path] = []
    if image.distro is Distro.NIXOS:
        flake = _local_flake(root, image)
        candidates += [flake / "flake.nix", flake / "flake.lock", flake / "params" / f"{image.name}.json"]
        candidates += _tree(flake / "modules")
    else:
        candidates.append(template_path(root, image))
        ks = root / "kickstart" / family_dir(image) / image.arch.value
        candidates += [ks / "ks.cfg", *_tree(ks / image.name)]
    return sorted({p for p in candidates if p.is_file()})


def _local_flake(root: Path, image: Image) -> Path:
    """The image's flake folder: `flake:` when it is a local path, else the project's nixos/."""
    ref = image.flake
    if ref and (ref.startswith(("/", "./", "../", "~")) or ":" not in ref):  # as the nix driver decides
        path = Path(ref).expanduser()
        return path if path.is_absolute() else root / path
    return root / "nixos"


def _tree(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def iso_lock_entry(root: Path, image: Image) -> Any:
    """This image's entry in iso.lock.json (None when absent): other images' pins do not count."""
    path = root / ISO_LOCK
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("images", {}).get(image.name)
    except (json.JSONDecodeError, AttributeError):
        return "unreadable:" + hashlib.sha256(path.read_bytes()).hexdigest()


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
    if image.distro.builder == "nix":
        return ["nix"]  # make-disk-image's QEMU comes from nixpkgs, not from the host
    return ["packer", image.arch.qemu_binary]


def feature_version(tool: str, version: str | None) -> str:
    """qemu: major; packer, nix: major.minor; 'missing' when the tool is not installed."""
    if not version:
        return "missing"
    parts = version.split(".")
    return parts[0] if tool.startswith("qemu") else ".".join(parts[:2])


def tool_versions(tools: list[str], cache_dir: Path) -> dict[str, str | None]:
    """Version strings of `tools`, from the stat-keyed cache or by running `TOOL --version`."""
    cache_file = cache_dir / VERSION_CACHE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    out: dict[str, str | None] = {}
    dirty = False
    for tool in tools:
        key = _stat_key(tool)
        if key is None:
            out[tool] = None
        elif key in cache:
            out[tool] = cache[key]
        else:
            out[tool] = cache[key] = _ask_version(tool)
            dirty = True
    if dirty:
        _write_json(cache_file, cache)
    return out


def _stat_key(tool: str) -> str | None:
    path = shutil.which(tool)
    if path is None:
        return None
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{tool}:{real}:{st.st_size}:{st.st_mtime_ns}"


def _ask_version(tool: str) -> str | None:
    """Run the tool's version command (the host probe's parser reads the output)."""
    from pipeline.host import TOOL_VERSION_ARGS, parse_version
    from pipeline.run import run

    argv = list(TOOL_VERSION_ARGS.get(tool, (tool, "--version")))
    res = run(argv, check=False, timeout=20)
    return parse_version(tool, res.stdout + res.stderr) if res.ok else None


def _write_json(path: Path, data: Any) -> None:
    """Best effort, atomic: a cache that cannot be written only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, sort_keys=True, indent=1))
    except OSError:
        pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compute(cfg: Config, image: Image, versions: dict[str, str | None] | None = None) -> InputHash:
    """The input hash of `image` under `cfg` (versions: tool -> version, looked up if omitted)."""
    if versions is None:
        versions = tool_versions(tools_for(image), cfg.output_dir)
    parts: dict[str, str] = {}
    for path in input_files(cfg.root, image):
        parts[f"file:{path.relative_to(cfg.root) if path.is_relative_to(cfg.root) else path}"] = _sha(path.read_bytes())
    lock = iso_lock_entry(cfg.root, image)
    if lock is not None:
        parts["iso.lock"] = _sha(json.dumps(lock, sort_keys=True).encode())
    parts["config"] = _sha(image_config(image).encode())
    for tool in tools_for(image):
        parts[f"tool:{tool}"] = feature_version(tool, versions.get(tool))
    parts["imagepipe"] = __version__
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return InputHash(_sha(canonical), parts)


def up_to_date(image_dir: Path, input_hash: str) -> str | None:
    """"up to date: built <when>, <sha>" when the published build has this input hash, else None."""
    from pipeline import artifacts

    manifest = artifacts.read_manifest(image_dir)
    if not manifest or manifest.get("input_hash") != input_hash:
        return None
    build = artifacts.current_build(image_dir)
    if build is None or not (build / manifest["artifact"]["file"]).is_file():
        return None
    return (f"up to date: built {manifest.get('finished', '?')}, sha256 {manifest['artifact']['sha256'][:16]}… "
            f"(build {manifest['build_id']}, inputs {input_hash[:12]})")
