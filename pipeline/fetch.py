"""Fetch a builder's published image: read its manifest, rsync (resumable), verify, publish here.

The builder's manifest is the source of truth for what the image must hash to; the local
published image changes only after every fetched file matched it, through the same atomic
publish as a local build. Every file SHA256SUMS lists is fetched (each image format, boot files,
the SBOM); every image file the manifest lists is checked for its format, every file by the
hash the builder recorded at publish (BLAKE3; sha256 from builders whose manifest has none). An
interrupted transfer leaves its staging folder in place, so the next fetch sends only the rest;
a file that does not match is never published. Like a build, a fetch writes the
image's folder under the image's lock (so a build, `gc` or a second fetch never removes its
staging folder or publishes over it) and applies the image's retention once it has published.

What crosses the link (pipeline.builders.transfer): compressed where the link is slower than
compression (the builder's `compress`, pipeline.builders.wire), and only what the previous build
here lacks: the published build serves rsync as the basis of the new one.

What it costs on top of the transfer itself, and why it is small:
- one SSH connection: `invoke remote-fetch` opens an OpenSSH master for the manifest read (which
  also reads the builder's `rsync --version`), the link measurement and rsync's ssh
  (pipeline.builders.openssh) - no Python SSH stack to import, no 2nd handshake;
- hashed as the bytes land: a follower thread per file hashes what rsync writes while it
  writes it (pipeline.builders.follow), with BLAKE3 where the builder recorded it (several GB/s
  on one core); its digest counts only when rsync shows one front-to-back pass over exactly the
  file there now, else (or on a mismatch) the file is read again;
- no `qemu-img check` here: a hash equal to the builder's manifest proves these are the bytes
  the builder checked before it published them; a `qemu-img info` format check stays.
The fetched build's manifest says which hash was verified where (`fetched.verified`).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import distros
from pipeline.base import digest
from pipeline.base.errors import BuildFailed, CorruptState, VerifyFailed
from pipeline.base.fsutil import ensure_dir
from pipeline.base.run import run
from pipeline.base.text import visible
from pipeline.builders import openssh, rsync, transfer, wire
from pipeline.builders.remote import REMOTE_OUTPUT, Target, check_name, runner_for
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
# After SHA256SUMS, this line, then what the builder says about its end of the link (wire.FACTS).
PROBE = "--- imagepipe: builder facts follow ---"
# Prints $1, the SPLIT line ($3), $2, the PROBE line ($4), then wire.FACTS' lines; the paths are
# arguments, never script text.
READ_ALL = 'cat -- "$1" && printf "\\n%s\\n" "$3" && cat -- "$2" && printf "\\n%s\\n" "$4" && { ' + wire.FACTS + '; }'


@dataclass(frozen=True)
class Published:
    """What the builder has published for an image, and what its end of the link can do."""

    manifest: dict[str, Any]
    sums: dict[str, str]
    facts: wire.Facts = field(default_factory=lambda: wire.Facts(rsync.RsyncVersion("unknown")))

    def fast_hashes(self) -> dict[str, str] | None:
        """The builder's BLAKE3 of every file SHA256SUMS names, or None (an older builder)."""
        fast = self.manifest.get(digest.FAST)
        if isinstance(fast, dict) and set(self.sums) <= set(fast) and digest.has_fast():
            return {name: fast[name] for name in self.sums}
        return None


def read_remote(run_remote: Runner, target: Target, image: Image) -> Published:
    """The builder's published manifest and SHA256SUMS for `image`, its rsync's version and how
    it sees this connection (one round trip)."""
    image_dir = target.path(REMOTE_OUTPUT, image.name)
    res = run_remote(("sh", "-c", READ_ALL, "sh", f"{image_dir}/{artifacts.MANIFEST}",
                      f"{image_dir}/{artifacts.SUMS}", SPLIT, PROBE))
    if not res.ok:
        raise BuildFailed(f"builder {target.name} has no published {image.name} under {target.path(REMOTE_OUTPUT)}",
                          hint=f"build it there first: invoke remote-sync-build {target.name} --image {image.name}")
    hint = f"rebuild on the builder (invoke remote-sync-build {target.name} --image {image.name})"
    files, _, facts = res.stdout.partition(f"\n{PROBE}\n")
    text, _, sums_text = files.rpartition(f"\n{SPLIT}\n")
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
    return Published(manifest, sums, wire.parse_facts(facts))


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


class Link:
    """How one fetch reaches the builder: a runner for commands, and one OpenSSH master that
    the link measurement and rsync's ssh share (opened by whichever needs it first)."""

    def __init__(self, target: Target, accept_new_host_key: bool = False, conn: Any | None = None) -> None:
        self.ssh = openssh.Connection(target, accept_new_host_key=accept_new_host_key)
        self.run: Runner = runner_for(conn) if conn is not None else self.ssh.run

    def rsync_ssh(self) -> list[str]:
        """Options for rsync's ssh: ride on the master once it is open, else open its own
        (with the same cipher preference)."""
        if self.ssh.socket.exists():
            return self.ssh.rsync_ssh_options()
        return openssh.cipher_options(self.ssh.target)

    def measure(self, enough: float) -> float | None:
        """The link's rate from the builder (bytes/s), over the master."""
        return self.ssh.link_rate(enough)


@contextlib.contextmanager
def link_to(conn: Any | None, target: Target, accept_new_host_key: bool = False) -> Iterator[Link]:
    """Commands through an open Fabric connection when the caller has one (a remote build just
    ran on it), else through the OpenSSH master that rsync shares."""
    link = Link(target, accept_new_host_key, conn)
    try:
        yield link
    finally:
        link.ssh.close()


def fetch(conn: Any | None, target: Target, cfg: Config, image: Image, say: Callable[[str], None], *,
          accept_new_host_key: bool = False) -> FetchResult:
    """Fetch, verify and publish the builder's image (skipped when already published here).

    `conn` is an open Fabric connection to reuse, or None to open an OpenSSH one
    (`accept_new_host_key`: trust the builder's key if known_hosts has none yet).
    """
    rsync.require_capable()  # before connecting: an rsync that cannot resume is refused up front
    with link_to(conn, target, accept_new_host_key) as link:
        pub = read_remote(link.run, target, image)
        manifest, sums = pub.manifest, pub.sums
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
                pub = read_remote(link.run, target, image)
                manifest, sums = pub.manifest, pub.sums
                build_id = manifest["build_id"]
                if _already_here(image_dir, image, manifest, sums, target, say):
                    return FetchResult(image.name, build_id, True, None, None)
            stage_name = f"{retention.FETCH_PREFIX}{build_id}"
            retention.clean_stale(image_dir, say, fetches=True, keep=stage_name)  # resumes its own only
            stage = ensure_dir(image_dir / ".staging" / stage_name, image_dir)  # never through a link
            how = _plan(link, target, pub, image_dir)
            say(f"{target.prefix}{image.name}: {how.text}")
            started = time.monotonic()
            got, verified = _transfer(link, target, image, pub, stage, how, say)
            stats = got.stats
            matched = f", {stats.matched} matched in build {how.basis.name}" if how.basis is not None else ""
            say(f"{target.prefix}{image.name}: received {stats.received} bytes ({stats.literal} bytes file data"
                f"{matched}) in {time.monotonic() - started:.1f}s, {verified['hash']} verified {verified['how']}")
            final = _publish(stage, image_dir, image, manifest, sums, target, verified)
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


@dataclass(frozen=True)
class How:
    """How a fetch moves and checks the bytes: compression, the basis, the hash."""

    wire: wire.Wire
    basis: Path | None           # the published build here, when it can serve as a basis
    algorithm: str               # digest.FAST, or digest.SHA256 for an older builder
    expected: dict[str, str]     # file name → its hash (algorithm) per the builder

    @property
    def text(self) -> str:
        basis = f"delta against build {self.basis.name}" if self.basis is not None else "no earlier build here"
        return f"transfer {self.wire.text}, {basis}, verified by {self.algorithm}"


def _plan(link: Link, target: Target, pub: Published, image_dir: Path) -> How:
    """Compression for this link, the previous build as basis, and the hash to verify with."""
    chosen = wire.for_link(target.name, target.compress.value, pub.facts, link.measure)
    fast = pub.fast_hashes()
    algorithm, expected = (digest.FAST, fast) if fast is not None else (digest.SHA256, _sha256s(pub))
    return How(chosen, _basis(image_dir, pub), algorithm, expected)


def _sha256s(pub: Published) -> dict[str, str]:
    images = {art["file"]: art["sha256"] for art in artifacts.image_files(pub.manifest)}
    return {name: images.get(name, sha) for name, sha in pub.sums.items()}


def _basis(image_dir: Path, pub: Published) -> Path | None:
    """The build published here, if it holds a file of the same name as the new build's image
    (its own folder under builds/, never through a link we did not make)."""
    build = artifacts.current_build(image_dir)
    if build is None:
        return None
    primary = pub.manifest["artifact"]["file"]
    older = build / primary
    return build if older.is_file() and not older.is_symlink() else None


def _transfer(link: Link, target: Target, image: Image, pub: Published, stage: Path, how: How,
              say: Callable[[str], None]) -> tuple[transfer.Received, dict[str, Any]]:
    """rsync into `stage` (resuming what it holds) and verify; one clean re-transfer (no basis,
    nothing kept) when the result does not match. Returns what arrived and what was verified how."""
    remote_dir = target.path(REMOTE_OUTPUT, image.name, "builds", pub.manifest["build_id"])
    sources = [f"{remote_dir}/{n}" for n in sorted(pub.sums)]
    sizes = {a["file"]: a["size"] for a in artifacts.image_files(pub.manifest)}
    label = f"{target.prefix}{image.name}: "
    with _progress(stage, sizes, lambda line: say(label + line)):
        got = transfer.pull(target, sources, stage, wire=how.wire, basis=how.basis, resume=True,
                            ssh_extra=link.rsync_ssh(), algorithm=how.algorithm)
    try:
        return got, _verify(stage, image, pub.manifest, how, got.digests)
    except VerifyFailed:
        # What we kept, or the basis, may be what broke: one clean transfer before blaming the builder.
        say(f"{target.prefix}{image.name}: checksum mismatch, transferring again from scratch")
        for name in pub.sums:
            (stage / name).unlink(missing_ok=True)
        with _progress(stage, sizes, lambda line: say(label + line)):
            got = transfer.pull(target, sources, stage, wire=how.wire, resume=False, ssh_extra=link.rsync_ssh(),
                                algorithm=how.algorithm)
    try:
        return got, _verify(stage, image, pub.manifest, how, got.digests)
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(stage: Path, image: Image, manifest: dict[str, Any], how: How,
            digests: Mapping[str, str]) -> dict[str, Any]:
    """Every file's hash (how.algorithm) equals the builder's and every image file is of the
    manifest's format. A digest taken while receiving is accepted when it matches; anything else
    is decided by reading the file. Returns what was verified how (the manifest's record)."""
    images = {art["file"]: art for art in artifacts.image_files(manifest)}
    primary = manifest["artifact"]["file"]
    reread = []
    for name in [primary, *sorted((set(how.expected) | set(images)) - {primary})]:
        expected = how.expected.get(name)
        got = digests.get(name)
        if got is None or got != expected:
            reread.append(name)
            got = (digest.of_file(stage / name, (how.algorithm,))[how.algorithm] if (stage / name).is_file()
                   else "(missing)")
        if got != expected:
            what = "the manifest" if name in images or how.algorithm != digest.SHA256 else "SHA256SUMS"
            raise VerifyFailed(f"{name}: {how.algorithm} {got} does not match {what} ({expected})")
    for art in images.values():
        _check_format(stage / art["file"], art["format"])
    where = "while receiving" if not reread else f"(re-read after the transfer: {', '.join(reread)})"
    return {"hash": how.algorithm, "files": len(how.expected), "how": where}


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
             target: Target, verified: dict[str, Any]) -> Path:
    """The builder's record, plus where it came from and what was verified here, published
    atomically like a local build."""
    record = {**manifest, "host": {**manifest.get("host", {}), "where": target.name},
              "fetched": {"from": target.name, "at": artifacts.utc_stamp(), "verified": verified}}
    artifacts.write_build_files(stage, record, sums)
    build_id = manifest["build_id"]
    local_id, n = build_id, 1
    while (image_dir / "builds" / local_id).exists():  # e.g. fetched before, then replaced
        n += 1
        local_id = f"{build_id}.{n}"
    final = artifacts.publish(stage, image_dir, local_id)
    artifacts.discard(stage)  # moved away by publish: this only tidies an empty .staging/
    return final
