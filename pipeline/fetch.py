"""Fetch a builder's published image: read its manifest, rsync (resumable), verify, publish here.

The builder's manifest is the source of truth for what the image must hash to; the local
published image changes only after every fetched file matched it, through the same atomic
publish as a local build. An interrupted transfer leaves its staging folder in place, so the
next fetch sends only the rest; a file that does not match is never published.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts, manifest_check, rsync
from pipeline.config import Config, Image
from pipeline.errors import BuildFailed, CommandFailed, CorruptState, VerifyFailed
from pipeline.fsutil import ensure_dir
from pipeline.remote import REMOTE_OUTPUT, Target, check_name, main_thread_timeout, runner_for
from pipeline.run import stream
from pipeline.text import visible

SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FetchResult:
    image: str
    build_id: str
    skipped: bool                 # the local published image already had the builder's sha256
    stats: rsync.Stats | None
    build_dir: Path | None


def parse_sums(text: str) -> dict[str, str]:
    """`sha256sum` output → {file name: sha256}; names must be plain file names."""
    sums = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or not SHA_RE.fullmatch(digest):
            raise BuildFailed(f"the builder's SHA256SUMS has a malformed line: {visible(line[:120])!r}")
        sums[check_name(name, "file name")] = digest
    return sums


def check_manifest(manifest: Any, image: Image, source: str = "the builder's manifest") -> dict[str, Any]:
    """The builder's manifest, checked in full (pipeline.manifest_check: every field a fetch
    reads, with what is wrong named) and checked to be a manifest of `image`."""
    hint = f"rebuild on the builder (invoke remote-sync-build HOST --image {image.name})"
    try:
        manifest = manifest_check.check(manifest, source, hint)
    except CorruptState as exc:
        raise BuildFailed(exc.message, hint) from None
    art = manifest["artifact"]
    if manifest["image"] != image.name or art["format"] != image.format.value:
        raise BuildFailed(f"{source} is for {manifest['image']} ({art['format']}), not {image.name} "
                          f"({image.format.value})", hint)
    check_name(manifest["build_id"], "build id")
    check_name(art["file"], "image file name")
    return manifest


def read_remote(conn: Any, target: Target, image: Image) -> tuple[dict[str, Any], dict[str, str]]:
    """The builder's published manifest and SHA256SUMS for `image` (one round trip)."""
    image_dir = target.path(REMOTE_OUTPUT, image.name)
    res = runner_for(conn)(("cat", "--", f"{image_dir}/{artifacts.MANIFEST}", f"{image_dir}/{artifacts.SUMS}"))
    if not res.ok:
        raise BuildFailed(f"builder {target.name} has no published {image.name} under {target.path(REMOTE_OUTPUT)}",
                          hint=f"build it there first: invoke remote-sync-build {target.name} --image {image.name}")
    try:
        # manifest.json, then SHA256SUMS: the JSON document ends where the sums begin
        data, end = json.JSONDecoder().raw_decode(res.stdout)
    except (ValueError, RecursionError):
        raise BuildFailed(f"builder {target.name}: {image.name}'s manifest.json is not JSON (truncated or damaged)",
                          hint=f"rebuild on the builder (invoke remote-sync-build {target.name} --image {image.name})"
                          ) from None
    manifest = check_manifest(data, image, f"builder {target.name}: {image.name}'s manifest.json")
    sums = parse_sums(res.stdout[end:])
    art = manifest["artifact"]
    if sums.get(art["file"]) != art["sha256"]:
        raise VerifyFailed(f"builder {target.name}: SHA256SUMS and manifest disagree about {art['file']} "
                           "(a publish in progress? try again)")
    return manifest, sums


def up_to_date(image_dir: Path, manifest: dict[str, Any]) -> bool:
    """True when the locally published image is the builder's (same sha256 and size)."""
    try:
        local = artifacts.read_manifest(image_dir)
        path = artifacts.published_image(image_dir)
    except CorruptState:  # a damaged local record: fetching replaces it
        return False
    art = manifest["artifact"]
    return (local is not None and path is not None and local["artifact"]["sha256"] == art["sha256"]
            and path.stat().st_size == art["size"])


def fetch(conn: Any, target: Target, cfg: Config, image: Image, say: Callable[[str], None]) -> FetchResult:
    """Fetch, verify and publish the builder's image (skipped when already published here)."""
    manifest, sums = read_remote(conn, target, image)
    build_id = manifest["build_id"]
    image_dir = cfg.output_dir / image.name
    if up_to_date(image_dir, manifest):
        say(f"{target.prefix}{image.name}: local image already has sha256 {manifest['artifact']['sha256'][:12]}…, "
            "nothing to fetch")
        return FetchResult(image.name, build_id, True, None, None)
    stage = ensure_dir(image_dir / ".staging" / f"fetch-{build_id}", image_dir)  # never through a planted link
    remote_dir = target.path(REMOTE_OUTPUT, image.name, "builds", build_id)
    started = time.monotonic()
    stats = _transfer(target, remote_dir, sorted(sums), stage, resume=True)
    try:
        _verify(stage, image, manifest, sums)
    except VerifyFailed:
        # What we kept may be what broke: one clean re-transfer before blaming the builder.
        say(f"{target.prefix}{image.name}: checksum mismatch, transferring again from scratch")
        for name in sums:
            (stage / name).unlink(missing_ok=True)
        stats = _transfer(target, remote_dir, sorted(sums), stage, resume=False)
        try:
            _verify(stage, image, manifest, sums)
        except VerifyFailed as exc:
            artifacts.discard(stage)
            raise VerifyFailed(f"builder {target.name}: {exc.message}; the builder's copy does not match "
                               "its manifest, refusing it (the local image is unchanged)",
                               hint=f"rebuild on the builder: invoke remote-sync-build {target.name} "
                                    f"--image {image.name}") from None
    say(f"{target.prefix}{image.name}: received {stats.received} bytes "
        f"({stats.literal} bytes file data) in {time.monotonic() - started:.1f}s, sha256 verified")
    final = _publish(stage, image_dir, image, manifest, sums, target)
    say(f"{target.prefix}{image.name}: published {image_dir / image.artifact_name} (built on {target.name})")
    return FetchResult(image.name, build_id, False, stats, final)


def _transfer(target: Target, remote_dir: str, names: list[str], stage: Path, *, resume: bool) -> rsync.Stats:
    argv = rsync.pull_argv(target.host, [f"{remote_dir}/{n}" for n in names], stage, target.ssh_config,
                           resume=resume)
    try:
        res = stream(argv, timeout=main_thread_timeout(6 * 3600))
    except CommandFailed as exc:
        exc.hint = "the partial transfer is kept: run the same fetch again to resume"
        raise
    return rsync.parse_stats(res.stdout)


def _verify(stage: Path, image: Image, manifest: dict[str, Any], sums: dict[str, str]) -> None:
    art = manifest["artifact"]
    verified = artifacts.verify(stage / art["file"], image.format.value)
    if verified.sha256 != art["sha256"]:
        raise VerifyFailed(f"{art['file']}: sha256 {verified.sha256} does not match the manifest ({art['sha256']})")
    for name, digest in sums.items():
        if name != art["file"] and artifacts.sha256_file(stage / name) != digest:
            raise VerifyFailed(f"{name}: sha256 does not match SHA256SUMS")


def _publish(stage: Path, image_dir: Path, image: Image, manifest: dict[str, Any], sums: dict[str, str],
             target: Target) -> Path:
    """The builder's record, plus where it came from, published atomically like a local build."""
    record = {**manifest, "host": {**manifest.get("host", {}), "where": target.name},
              "fetched": {"from": target.name, "at": artifacts.utc_stamp()}}
    artifacts.write_build_files(stage, record, sums)
    build_id = manifest["build_id"]
    local_id, n = build_id, 1
    while (image_dir / "builds" / local_id).exists():  # e.g. fetched before, then replaced
        n += 1
        local_id = f"{build_id}.{n}"
    final = artifacts.publish(stage, image_dir, local_id, image.artifact_name)
    artifacts.discard(stage)  # moved away by publish: this only tidies an empty .staging/
    return final
