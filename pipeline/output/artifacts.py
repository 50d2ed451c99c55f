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
folder, which is why every one of them has its link here. The manifest's `blake3` names the same
files with their BLAKE3 (pipeline.base.digest), taken in the same read as their sha256: what a
fetch verifies with.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.base import digest
from pipeline.base.errors import CorruptState, VerifyFailed
from pipeline.base.fsutil import ensure_dir, replace_link, resolves_inside, safe_rmtree
from pipeline.base.numbers import int_or_none
from pipeline.base.run import run
from pipeline.base.text import visible
from pipeline.output import manifest_check

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
    blake3: str | None = None    # None where this Python has no BLAKE3

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


def publish_hashes() -> tuple[str, ...]:
    """The hashes a build records for each file: sha256, and BLAKE3 where this Python has it."""
    return (digest.SHA256, digest.FAST) if digest.has_fast() else (digest.SHA256,)


def hash_file(path: Path) -> dict[str, str]:
    """Every publish hash of `path` (publish_hashes()), in one read."""
    return digest.of_file(path, publish_hashes())


# Files whose hashes are being taken ahead of time (hash_ahead): path → (its stat stamp when the
# hash started, the hashes' future). Only this process's own staging files go here.
_AHEAD: dict[str, tuple[tuple[int, ...], concurrent.futures.Future[dict[str, str]]]] = {}


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have changed (a write moves mtime and ctime)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_ahead(paths: Iterable[Path]) -> None:
    """Start hashing staged files that will not change any more (the demo's kernel and initramfs)
    in a background thread, so their hashes are ready when the manifest is written instead of
    costing a read after the engine finished; hashes_known() takes the result."""
    for path in paths:
        future: concurrent.futures.Future[dict[str, str]] = concurrent.futures.Future()
        try:
            stamp = _stamp(path)
        except OSError:
            continue
        _AHEAD[str(path)] = (stamp, future)
        threading.Thread(target=_hash_into, args=(path, future), daemon=True, name=f"hash {path.name}").start()


def _hash_into(path: Path, future: concurrent.futures.Future[dict[str, str]]) -> None:
    try:
        future.set_result(hash_file(path))
    except OSError as exc:  # hashes_known() hashes the file itself instead
        future.set_exception(exc)
    finally:
        future.cancel()  # only takes effect when nothing was set: the waiter never hangs


def hashes_known(path: Path) -> dict[str, str]:
    """The publish hashes of `path`: those hash_ahead() took when the file is unchanged since
    (same inode, size, mtime and ctime before the hash started and now), else read now."""
    ahead = _AHEAD.pop(str(path), None)
    if ahead is not None:
        stamp, future = ahead
        try:
            hashes = future.result()
            if _stamp(path) == stamp:
                return hashes
        except (OSError, concurrent.futures.CancelledError):
            pass
    return hash_file(path)


def verify(path: Path, fmt: str, *, compressed: bool = False) -> Verified:
    """`qemu-img info` must agree on the format, `qemu-img check` must pass (qcow2, vdi, vhdx,
    vmdk), then sha256 (and BLAKE3, in the same read)."""
    if not path.is_file() or path.stat().st_size == 0:
        raise VerifyFailed(f"no image produced at {path}")
    # hash while qemu-img reads, and check while info answers: hashlib drops the GIL on large
    # buffers and the two qemu-img runs are separate processes, so all three overlap
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        hashes = pool.submit(hash_file, path)
        check = pool.submit(run, ["qemu-img", "check", "-q", "-f", fmt, path], check=False) if fmt in CHECKABLE else None
        virtual_size = _qemu_img_info(path, fmt)
        if check is not None:
            res = check.result()
            if res.returncode != 0:
                raise VerifyFailed(f"{path.name}: qemu-img check failed: {(res.stdout + res.stderr).strip()[-400:]}")
        got = hashes.result()
    return Verified(path.name, fmt, path.stat().st_size, virtual_size, got[digest.SHA256], compressed,
                    got.get(digest.FAST))


def _qemu_img_info(path: Path, fmt: str) -> int:
    """The format qemu-img finds agrees with `fmt`; returns the virtual size. qemu-img probes the
    format itself (with `-f` it would only echo what it was told); output that is not JSON is
    shown as text (the check cannot go on without it)."""
    out = run(["qemu-img", "info", "--output=json", path]).stdout
    try:
        info = json.loads(out)
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise VerifyFailed(f"{path.name}: qemu-img info did not print a JSON object: {visible(out.strip()[:300])!r}")
    if info.get("format") != fmt:
        raise VerifyFailed(f"{path.name}: expected a {fmt} image, qemu-img says {info.get('format')}")
    return int_or_none(info.get("virtual-size", 0)) or 0


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
    """Point `link` at `target` atomically; a real file or folder there is refused (UnsafePath)."""
    replace_link(link, target, inside=link.parent)


def publish(stage: Path, image_dir: Path, build_id: str, artifact_name: str | None = None) -> Path:
    """Move the verified staging folder into builds/<id>, point `current` at it atomically, then
    give every file of the build its fixed link `<name> -> current/<name>` (and drop the links of
    files the new build does not have). `artifact_name` is accepted for older callers; every file
    is linked anyway. Links are replaced, never written through (pipeline.base.fsutil)."""
    builds = ensure_dir(image_dir / "builds", image_dir)
    final = builds / build_id
    os.rename(stage, final)
    _fsync_dir(builds)
    replace_link(image_dir / CURRENT, f"builds/{build_id}", inside=image_dir)
    link_files(image_dir, final)
    _fsync_dir(image_dir)
    return final


def link_files(image_dir: Path, build: Path) -> None:
    """The fixed links of output/<image>/: one per file of `build`; links of ours (`current/<name>`)
    whose file the build lacks are removed. A link under a wanted name that points anywhere else
    (planted, or left by hand) is replaced, never followed; a real file or folder there is
    someone else's and is left alone."""
    names = {p.name for p in build.iterdir() if p.is_file() and not p.is_symlink()} - RESERVED
    for name in sorted(names):
        link = image_dir / name
        if link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}":
            continue
        if link.is_symlink() or not link.exists():
            replace_link(link, f"{CURRENT}/{name}", inside=image_dir)
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
    """Remove a staging folder (failed or interrupted build); never through a link."""
    parent = stage.parent
    safe_rmtree(stage, parent.parent if parent.name == ".staging" else parent, ignore_errors=True)
    if parent.name == ".staging" and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()


def current_build(image_dir: Path) -> Path | None:
    """builds/<id> of the published build, or None."""
    link = image_dir / CURRENT
    if image_dir.is_symlink() or (image_dir / "builds").is_symlink():
        return None  # folders imagepipe did not make hold no build of its own
    if not link.is_symlink() or not resolves_inside(link, image_dir / "builds"):
        return None  # a `current` pointing anywhere else is not a build of this image
    target = link.resolve()
    return target if target.is_dir() and target.parent == (image_dir / "builds").resolve() else None


def read_manifest(image_dir: Path) -> dict[str, Any] | None:
    """The published build's manifest, or None when nothing is published."""
    build = current_build(image_dir)
    if build is None or not (build / MANIFEST).exists():
        return None
    path = build / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptState(f"{path} cannot be read ({exc})", "rebuild the image (invoke build IMAGE)") from None
    return manifest_check.parse(text, str(path), f"rebuild the image (invoke build {image_dir.name}), or move "
                                                  f"{image_dir / CURRENT} away to unpublish the damaged build")


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
