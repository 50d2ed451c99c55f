"""Build outputs: staging, verification, atomic publish, manifest and SHA256SUMS.

Layout of output/<image>/ (the published build is whatever `current` points to):

    .staging/<id>/            a build in progress (removed on failure)
    builds/<id>/              finished builds: the image in every configured format, manifest.json,
                              SHA256SUMS, sbom.cdx.json (+ boot files, the template or flake.lock)
    logs/<id>/                build.log and console.log of every build, failed ones included
    current -> builds/<id>    swapped with one atomic rename: publishing is all-or-nothing
    <file> -> current/<file>  one fixed link per file of the published build (image files,
                              manifest.json, SHA256SUMS, ...), so the stable paths never dangle
                              mid-publish and `sha256sum -c SHA256SUMS` works here as in current/

SHA256SUMS names every file of the build (but itself and manifest.json) relative to the build
folder, which is why every one of them has its link here.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import VerifyFailed
from pipeline.run import run

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
CURRENT = "current"
# Names inside output/<image>/ that are folders of imagepipe's own, never a build file's link.
RESERVED = frozenset({CURRENT, "builds", "logs", "run", ".staging"})
# Formats `qemu-img check` can check (raw has no metadata to check).
CHECKABLE = frozenset({"qcow2", "vdi", "vhdx", "vmdk"})


@dataclass(frozen=True)
class Verified:
    """What verification established about an image file."""

    file: str
    format: str
    size: int
    virtual_size: int
    sha256: str
    compressed: bool = False

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's record of this file."""
        record: dict[str, Any] = {"file": self.file, "format": self.format, "size": self.size,
                                  "virtual_size": self.virtual_size, "sha256": self.sha256}
        if self.compressed:
            record["compressed"] = True
        return record


def utc_stamp(ts: float | None = None) -> str:
    """The timestamp format of manifests and history: 2026-11-23T21:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def sha256_file(path: Path, bufsize: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, fmt: str, *, compressed: bool = False) -> Verified:
    """`qemu-img info` must agree on the format, `qemu-img check` must pass (qcow2, vdi, vhdx,
    vmdk), then sha256."""
    if not path.is_file() or path.stat().st_size == 0:
        raise VerifyFailed(f"no image produced at {path}")
    # hash while qemu-img reads: hashlib drops the GIL on large buffers, so the two overlap
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, path)
        virtual_size = _qemu_img_checks(path, fmt)
        sha = digest.result()
    return Verified(path.name, fmt, path.stat().st_size, virtual_size, sha, compressed)


def _qemu_img_checks(path: Path, fmt: str) -> int:
    """Format agrees and `qemu-img check` passes; returns the virtual size. qemu-img probes the
    format itself (with `-f` it would only echo what it was told)."""
    info = json.loads(run(["qemu-img", "info", "--output=json", path]).stdout)
    if info.get("format") != fmt:
        raise VerifyFailed(f"{path.name}: expected a {fmt} image, qemu-img says {info.get('format')}")
    if fmt in CHECKABLE:
        res = run(["qemu-img", "check", "-q", "-f", fmt, path], check=False)
        if res.returncode != 0:
            raise VerifyFailed(f"{path.name}: qemu-img check failed: {(res.stdout + res.stderr).strip()[-400:]}")
    return int(info.get("virtual-size", 0))


def format_file(primary: str, fmt: str) -> str:
    """The file name of the image in another format: demo-x86_64.qcow2 → demo-x86_64.vmdk."""
    return f"{Path(primary).stem}.{fmt}"


def convert(source: Verified, folder: Path, fmt: str, *, compress: bool = False,
            timeout: float = 4 * 3600) -> Verified:
    """Write the verified image `source` (in `folder`) as `fmt` with `qemu-img convert`, then verify
    the new file as any image is (format, check, sha256). compress: a compressed qcow2 (-c)."""
    dest = folder / format_file(source.file, fmt)
    part = dest.with_name(dest.name + ".part")
    compressed = compress and fmt == "qcow2"
    argv: list[str | Path] = ["qemu-img", "convert", "-f", source.format, "-O", fmt]
    argv += ["-c"] if compressed else []
    try:
        run([*argv, folder / source.file, part], timeout=timeout)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return verify(dest, fmt, compressed=compressed)


def write_build_files(stage: Path, manifest: dict[str, Any], sums: dict[str, str]) -> None:
    """manifest.json and SHA256SUMS (`sha256sum -c` format) inside the staging folder."""
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (stage / SUMS).write_text("".join(f"{h}  {name}\n" for name, h in sorted(sums.items())), encoding="utf-8")


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def publish(stage: Path, image_dir: Path, build_id: str, artifact_name: str | None = None) -> Path:
    """Move the verified staging folder into builds/<id>, point `current` at it atomically, then
    give every file of the build its fixed link `<name> -> current/<name>` (and drop the links of
    files the new build does not have). `artifact_name` is accepted for older callers; every file
    is linked anyway."""
    builds = image_dir / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    final = builds / build_id
    os.rename(stage, final)
    _fsync_dir(builds)
    _atomic_symlink(f"builds/{build_id}", image_dir / CURRENT)
    link_files(image_dir, final)
    _fsync_dir(image_dir)
    return final


def link_files(image_dir: Path, build: Path) -> None:
    """The fixed links of output/<image>/: one per file of `build`; links of ours (`current/<name>`)
    whose file the build lacks are removed. Anything else found under a wanted name is left alone."""
    names = {p.name for p in build.iterdir() if p.is_file() and not p.is_symlink()} - RESERVED
    for name in sorted(names):
        link = image_dir / name
        if not link.is_symlink() and not link.exists():
            _atomic_symlink(f"{CURRENT}/{name}", link)
    for link in image_dir.iterdir():
        if link.name not in names and link.is_symlink() and os.readlink(link) == f"{CURRENT}/{link.name}":
            link.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(stage: Path) -> None:
    """Remove a staging folder (failed or interrupted build)."""
    shutil.rmtree(stage, ignore_errors=True)
    parent = stage.parent
    if parent.name == ".staging" and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()


def current_build(image_dir: Path) -> Path | None:
    """builds/<id> of the published build, or None."""
    link = image_dir / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def read_manifest(image_dir: Path) -> dict[str, Any] | None:
    """The published build's manifest, or None when nothing is published."""
    build = current_build(image_dir)
    if build is None or not (build / MANIFEST).exists():
        return None
    return json.loads((build / MANIFEST).read_text(encoding="utf-8"))


def image_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every image file a manifest records, the primary first (manifests older than the
    `artifacts` list hold only `artifact`)."""
    files = manifest.get("artifacts")
    if isinstance(files, list) and files:
        return files
    return [manifest["artifact"]]


def published_image(image_dir: Path) -> Path | None:
    """Absolute path of the published image file (inside builds/<id>), or None."""
    manifest = read_manifest(image_dir)
    build = current_build(image_dir)
    if not manifest or build is None:
        return None
    path = build / manifest["artifact"]["file"]
    return path if path.exists() else None


def verify_published(image_dir: Path) -> str:
    """Re-hash the published image against its manifest; returns the sha256 or raises."""
    manifest = read_manifest(image_dir)
    image = published_image(image_dir)
    if manifest is None or image is None:
        raise VerifyFailed(f"nothing published under {image_dir}")
    actual = sha256_file(image)
    if actual != manifest["artifact"]["sha256"]:
        raise VerifyFailed(f"{image}: sha256 {actual} does not match the manifest ({manifest['artifact']['sha256']})")
    return actual
