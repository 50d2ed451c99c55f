"""Fetch a builder's published image: read its manifest, rsync (resumable), verify, publish here.

The builder's manifest is the source of truth for what the image must hash to; the local
published image changes only after every fetched file matched it, through the same atomic
publish as a local build. Every file SHA256SUMS lists is fetched (each image format, boot files,
the SBOM); every image file the manifest lists is checked for its format, every file by its
sha256. An interrupted transfer leaves its staging folder in place, so the next fetch sends only
the rest; a file that does not match is never published. Like a build, a fetch writes the
image's folder under the image's lock (so a build, `gc` or a second fetch never removes its
staging folder or publishes over it) and applies the image's retention once it has published.

What it costs on top of the transfer itself, and why it is small:
- one SSH connection: `invoke remote-fetch` opens an OpenSSH master for the manifest read and
  rsync's ssh rides on it (pipeline.builders.openssh) - no Python SSH stack to import, no 2nd handshake;
- sha256 as the bytes land: a follower thread per file hashes what rsync writes while it
  writes it (pipeline.builders.follow); its digest counts only when rsync's stats show one front-to-back
  pass over exactly the file there now, else (or on a mismatch) the file is read again;
- no `qemu-img check` here: a sha256 equal to the builder's manifest proves these are the bytes
  the builder checked before it published them; a `qemu-img info` format check stays.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import distros
from pipeline.base.errors import BuildFailed, CommandFailed, CorruptState, VerifyFailed
from pipeline.base.fsutil import ensure_dir
from pipeline.base.run import run, stream
from pipeline.base.text import visible
from pipeline.builders import follow, openssh, rsync
from pipeline.builders.remote import (
    REMOTE_OUTPUT,
    Target,
    check_name,
    main_thread_timeout,
    runner_for,
)
from pipeline.host import Runner
from pipeline.model import Config, Image
from pipeline.output import artifacts, history, manifest_check, retention
from pipeline.progress import TRANSFER_EVERY, transfer_text

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
    """The builder's manifest, checked in full (pipeline.output.manifest_check: every field a fetch
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
    for entry in artifacts.image_files(manifest):
        try:
            ok = bool(SHA_RE.fullmatch(entry["sha256"])) and isinstance(entry["format"], str) and isinstance(entry["size"], int)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise BuildFailed(f"the builder's manifest for {image.name} lists a malformed image file: "
                              f"{visible(str(entry)[:120])}")
        check_name(entry["file"], "image file name")
    return manifest


# Between manifest.json and SHA256SUMS in read_remote's one round trip: a line neither file can
# hold (a JSON document has no bare line of this kind after its end, and no sums line looks so),
# so junk after the manifest is blamed on the manifest and a damaged SHA256SUMS on itself.
SPLIT = "--- imagepipe: SHA256SUMS follows ---"
# Prints $1, the SPLIT line ($3), then $2; the paths are arguments, never part of the script.
READ_BOTH = 'cat -- "$1" && printf "\\n%s\\n" "$3" && cat -- "$2"'


def read_remote(run_remote: Runner, target: Target, image: Image) -> tuple[dict[str, Any], dict[str, str]]:
    """The builder's published manifest and SHA256SUMS for `image` (one round trip)."""
    image_dir = target.path(REMOTE_OUTPUT, image.name)
    res = run_remote(("sh", "-c", READ_BOTH, "sh", f"{image_dir}/{artifacts.MANIFEST}",
                      f"{image_dir}/{artifacts.SUMS}", SPLIT))
    if not res.ok:
        raise BuildFailed(f"builder {target.name} has no published {image.name} under {target.path(REMOTE_OUTPUT)}",
                          hint=f"build it there first: invoke remote-sync-build {target.name} --image {image.name}")
    hint = f"rebuild on the builder (invoke remote-sync-build {target.name} --image {image.name})"
    text, _, sums_text = res.stdout.rpartition(f"\n{SPLIT}\n")
    try:
        data = json.loads(text)
    except ValueError as exc:
        what = ("has more after its JSON document" if "Extra data" in str(exc)
                else "is not JSON (truncated or damaged)")
        raise BuildFailed(f"builder {target.name}: {image.name}'s manifest.json {what}", hint=hint) from None
    except RecursionError:
        raise BuildFailed(f"builder {target.name}: {image.name}'s manifest.json is not JSON (nested too deeply)",
                          hint=hint) from None
    manifest = check_manifest(data, image, f"builder {target.name}: {image.name}'s manifest.json")
    sums = parse_sums(sums_text)
    for art in artifacts.image_files(manifest):
        if sums.get(art["file"]) != art["sha256"]:
            raise VerifyFailed(f"builder {target.name}: SHA256SUMS and manifest disagree about {art['file']} "
                               "(a publish in progress? try again)")
    return manifest, sums


def up_to_date(image_dir: Path, manifest: dict[str, Any], sums: dict[str, str] | None = None) -> bool:
    """True when the locally published build is the builder's: the same image (sha256, size) and,
    when the builder's SHA256SUMS is given, the same files with the same hashes (a reproducible
    image can stay the same while its other formats or boot files changed)."""
    try:
        local = artifacts.read_manifest(image_dir)
        path = artifacts.published_image(image_dir)
    except CorruptState:  # a damaged local record: fetching replaces it
        return False
    art = manifest["artifact"]
    if local is None or path is None or local["artifact"]["sha256"] != art["sha256"] or path.stat().st_size != art["size"]:
        return False
    if sums is None:
        return True
    build = artifacts.current_build(image_dir)
    local_sums = build / artifacts.SUMS if build is not None else None
    try:
        return local_sums is not None and parse_sums(local_sums.read_text(encoding="utf-8")) == sums
    except (OSError, BuildFailed):
        return False


@dataclass(frozen=True)
class Link:
    """How one fetch reaches the builder: a runner for commands, extra ssh options for rsync."""

    run: Runner
    rsync_ssh: tuple[str, ...] = ()


@contextlib.contextmanager
def link_to(conn: Any | None, target: Target, accept_new_host_key: bool = False) -> Iterator[Link]:
    """Through an open Fabric connection when the caller has one (a remote build just ran on
    it), else through one OpenSSH connection shared by the manifest read and rsync."""
    if conn is not None:  # rsync opens its own ssh then: it gets the same cipher preference
        yield Link(runner_for(conn), tuple(openssh.cipher_options(target)))
        return
    with openssh.Connection(target, accept_new_host_key=accept_new_host_key) as ssh:
        yield Link(ssh.run, tuple(ssh.rsync_ssh_options()))


def fetch(conn: Any | None, target: Target, cfg: Config, image: Image, say: Callable[[str], None], *,
          accept_new_host_key: bool = False) -> FetchResult:
    """Fetch, verify and publish the builder's image (skipped when already published here).

    `conn` is an open Fabric connection to reuse, or None to open an OpenSSH one
    (`accept_new_host_key`: trust the builder's key if known_hosts has none yet).
    """
    rsync.require_capable()  # before connecting: an rsync that cannot resume is refused up front
    with link_to(conn, target, accept_new_host_key) as link:
        manifest, sums = read_remote(link.run, target, image)
        build_id = manifest["build_id"]
        image_dir = cfg.output_dir / image.name
        if _already_here(image_dir, image, manifest, sums, target, say):
            return FetchResult(image.name, build_id, True, None, None)
        # The image's folder is written under its lock, as a build writes it: a build, gc or
        # other fetch of this image meanwhile neither removes our staging folder nor publishes
        # over us. Publish and retention run under it too.
        with history.image_lock(image_dir, build_id=build_id, say=say, fetching_from=target.name) as waited:
            if waited:
                # Meanwhile the builder may have published anew (and removed the build read
                # above), or the fetch we waited for brought this very build: ask again.
                manifest, sums = read_remote(link.run, target, image)
                build_id = manifest["build_id"]
                if _already_here(image_dir, image, manifest, sums, target, say):
                    return FetchResult(image.name, build_id, True, None, None)
            stage_name = f"{retention.FETCH_PREFIX}{build_id}"
            retention.clean_stale(image_dir, say, fetches=True, keep=stage_name)  # resumes its own only
            stage = ensure_dir(image_dir / ".staging" / stage_name, image_dir)  # never through a link
            started = time.monotonic()
            got, how = _transfer(link, target, image, manifest, sums, stage, say)
            stats = got.stats
            say(f"{target.prefix}{image.name}: received {stats.received} bytes "
                f"({stats.literal} bytes file data) in {time.monotonic() - started:.1f}s, sha256 verified {how}")
            final = _publish(stage, image_dir, image, manifest, sums, target)
            say(f"{target.prefix}{image.name}: published {image_dir / distros.artifact_name(image)} "
                f"(built on {target.name})")
            retention.after_publish(cfg.output_dir, image.name, image.retention,
                                    lambda line: say(f"{target.prefix}{line}"))
    distros.profile(image).fetched(cfg.root, image, final, lambda line: say(f"{target.prefix}{image.name}: {line}"))
    return FetchResult(image.name, build_id, False, stats, final)


def _already_here(image_dir: Path, image: Image, manifest: dict[str, Any], sums: dict[str, str], target: Target,
                  say: Callable[[str], None]) -> bool:
    if not up_to_date(image_dir, manifest, sums):
        return False
    say(f"{target.prefix}{image.name}: local image already has sha256 "
        f"{manifest['artifact']['sha256'][:12]}…, nothing to fetch")
    return True


def _transfer(link: Link, target: Target, image: Image, manifest: dict[str, Any], sums: dict[str, str],
              stage: Path, say: Callable[[str], None]) -> tuple[Received, str]:
    """rsync into `stage` (resuming what it holds) and verify; one clean re-transfer when what
    was kept turns out not to match. Returns what arrived and how sha256 was verified."""
    remote_dir = target.path(REMOTE_OUTPUT, image.name, "builds", manifest["build_id"])
    sizes = {a["file"]: a["size"] for a in artifacts.image_files(manifest)}
    label = f"{target.prefix}{image.name}: "
    with _progress(stage, sizes, lambda line: say(label + line)):
        got = _receive(link, target, remote_dir, sorted(sums), stage, resume=True)
    try:
        return got, _verify(stage, image, manifest, sums, got.digests)
    except VerifyFailed:
        # What we kept may be what broke: one clean re-transfer before blaming the builder.
        say(f"{target.prefix}{image.name}: checksum mismatch, transferring again from scratch")
        for name in sums:
            (stage / name).unlink(missing_ok=True)
        with _progress(stage, sizes, lambda line: say(label + line)):
            got = _receive(link, target, remote_dir, sorted(sums), stage, resume=False)
    try:
        return got, _verify(stage, image, manifest, sums, got.digests)
    except VerifyFailed as exc:
        artifacts.discard(stage)
        raise VerifyFailed(f"builder {target.name}: {exc.message}; the builder's copy does not match "
                           "its manifest, refusing it (the local image is unchanged)",
                           hint=f"rebuild on the builder: invoke remote-sync-build {target.name} "
                                f"--image {image.name}") from None


@contextlib.contextmanager
def _progress(stage: Path, sizes: Mapping[str, int], say: Callable[[str], None],
              every: float = TRANSFER_EVERY) -> Iterator[None]:
    """While the block runs, one line every `every` seconds: how much of the image files (`sizes`:
    name → bytes, from the manifest) is in `stage`, the rate and the ETA. Nothing for a transfer
    shorter than `every`."""
    stop = threading.Event()
    total = sum(sizes.values())
    name = next(iter(sizes)) if len(sizes) == 1 else f"{len(sizes)} image files"

    def received() -> int:
        return sum(min(_size(stage / n), size) for n, size in sizes.items())

    first, start = received(), time.monotonic()

    def report() -> None:
        while not stop.wait(every):
            done = received()
            rate = (done - first) / max(time.monotonic() - start, 1e-3)
            say(transfer_text(name, done, total, rate, resumed_at=first))

    thread = threading.Thread(target=report, name="fetch progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class Received:
    """One rsync run: its stats, and the sha256 of each file whose digest covers the final file."""

    stats: rsync.Stats
    digests: dict[str, str]


def _receive(link: Link, target: Target, remote_dir: str, names: list[str], stage: Path, *,
             resume: bool) -> Received:
    """rsync `names` into `stage` (resuming what is there when `resume`) while hashing them."""
    kept = {n: _size(stage / n) for n in names}
    argv = rsync.pull_argv(target.host, [f"{remote_dir}/{n}" for n in names], stage, target.ssh_config,
                           resume=resume and any(kept.values()), ssh_extra=link.rsync_ssh)
    followers = {n: follow.Follower(stage / n).start() for n in names}
    try:
        res = stream(argv, timeout=main_thread_timeout(6 * 3600))
    except BaseException as exc:
        for f in followers.values():
            f.finish(cancel=True)
        if isinstance(exc, CommandFailed):
            exc.hint = "the partial transfer is kept: run the same fetch again to resume"
        raise
    stats = rsync.parse_stats(res.stdout)
    seen = {n: f.finish() for n, f in followers.items()}
    final = {n: _size(stage / n) for n in names}
    digests = {}
    if one_pass(stats, kept, final):
        digests = {n: d.sha256 for n, d in seen.items() if d is not None and d.covers(stage / n)}
    return Received(stats, digests)


def one_pass(stats: rsync.Stats, kept: Mapping[str, int], final: Mapping[str, int]) -> bool:
    """True when rsync received each file's new bytes exactly once, front to back.

    In our modes (whole-file, or append) a single pass receives exactly the bytes each file
    grew by; a second pass over a file whose checksum failed (rsync's "redo") receives more,
    as literal or matched data, and may rewrite bytes a follower has already hashed.
    """
    grown = sum(final[n] - kept.get(n, 0) for n in final)
    return stats.matched == 0 and stats.literal == grown


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(stage: Path, image: Image, manifest: dict[str, Any], sums: dict[str, str],
            digests: Mapping[str, str]) -> str:
    """Every file's sha256 equals SHA256SUMS (each image file's equals the manifest) and every
    image file is of the manifest's format. A digest taken while receiving is accepted when it
    matches; anything else is decided by reading the file. Returns how the hashes were taken."""
    images = {art["file"]: art for art in artifacts.image_files(manifest)}
    primary = manifest["artifact"]["file"]
    reread = []
    for name in [primary, *sorted((set(sums) | set(images)) - {primary})]:
        expected = images[name]["sha256"] if name in images else sums[name]
        got = digests.get(name)
        if got != expected:
            reread.append(name)
            got = artifacts.sha256_file(stage / name) if (stage / name).is_file() else "(missing)"
        if got != expected:
            what = "the manifest" if name in images else "SHA256SUMS"
            raise VerifyFailed(f"{name}: sha256 {got} does not match {what} ({expected})")
    for art in images.values():
        _check_format(stage / art["file"], art["format"])
    if not reread:
        return "while receiving"
    return f"(re-read after the transfer: {', '.join(reread)})"


def _check_format(path: Path, fmt: str) -> None:
    """`qemu-img info` agrees with the manifest about the format (cheap: reads the header). It
    probes the format itself: with `-f` it would only echo what it was told."""
    res = run(["qemu-img", "info", "--output=json", path], check=False, timeout=60)
    if not res.ok:
        raise VerifyFailed(f"{path.name}: qemu-img cannot read it as {fmt}: {res.stderr.strip()[-300:]}")
    info = json.loads(res.stdout)
    if info.get("format") != fmt:
        raise VerifyFailed(f"{path.name}: expected a {fmt} image, qemu-img says {info.get('format')}")


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
    final = artifacts.publish(stage, image_dir, local_id)
    artifacts.discard(stage)  # moved away by publish: this only tidies an empty .staging/
    return final
