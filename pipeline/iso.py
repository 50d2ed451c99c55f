"""AlmaLinux installer ISOs: resolve a version to a point release, pin it, fetch and verify it.

`resolve()` turns `10` / `latest` / `10.1` into a concrete point release, its URL and sha256,
read from the mirror's CHECKSUM file (BSD style `SHA256 (name) = hex`); a point release that
left repo.almalinux.org is looked up on vault.almalinux.org. `invoke update-iso` writes the
result to iso.lock.json (committed), so builds are reproducible. `ensure()` gives a build a
local, verified ISO: the configured `iso:` (a local file, sha256 computed and cached by size and
mtime, or a URL), else the locked one, downloaded once into the cache and checked before use —
a checksum mismatch refuses the build. Mirrors can be overridden for tests and private mirrors
with IMAGEPIPE_ALMA_MIRROR and IMAGEPIPE_ALMA_VAULT.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.base import openpgp
from pipeline.base.errors import (
    ChecksumMismatch,
    ImagepipeError,
    IsoUnavailable,
    NotFound,
    UsageError,
    VerifyFailed,
)
from pipeline.base.fsutil import write_if_changed
from pipeline.base.run import install_hint
from pipeline.download import cached_sha256, fetch_verified, open_url
from pipeline.download import reason as _reason
from pipeline.model import Image

LOCK_FILE = "iso.lock.json"
REPO = "https://repo.almalinux.org/almalinux"
VAULT = "https://vault.almalinux.org"
MIRROR_ENV = "IMAGEPIPE_ALMA_MIRROR"
VAULT_ENV = "IMAGEPIPE_ALMA_VAULT"
BSD_LINE = re.compile(r"^SHA256 \((?P<name>[^)]+)\) = (?P<hex>[0-9a-fA-F]{64})$")
GNU_LINE = re.compile(r"^(?P<hex>[0-9a-fA-F]{64}) [ *](?P<name>\S+)$")

Report = Callable[[str], None]


@dataclass(frozen=True)
class Mirrors:
    repo: str = REPO
    vault: str = VAULT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Mirrors:
        """Mirror bases, overridable by IMAGEPIPE_ALMA_MIRROR / IMAGEPIPE_ALMA_VAULT."""
        env = os.environ if env is None else env
        return cls(env.get(MIRROR_ENV, REPO).rstrip("/"), env.get(VAULT_ENV, VAULT).rstrip("/"))


@dataclass(frozen=True)
class LockEntry:
    """One pinned ISO: what was asked for and what it resolved to."""

    requested: str
    version: str
    arch: str
    name: str
    url: str
    sha256: str
    source: str  # "repo" or "vault"
    signature: str = ""  # how the CHECKSUM the sha256 came from was checked ("" in older locks)


@dataclass(frozen=True)
class LocalIso:
    path: Path
    sha256: str
    version: str | None = None  # the point release (None: unknown, e.g. a renamed local file)
    source: str | None = None   # repo, vault or url: where it came from


def iso_arch(image: Image) -> str:
    """The folder and file-name arch of the image's media and packages: its variant
    (AlmaLinux 10's x86_64_v2) or its arch."""
    return image.variant or image.arch.value


# --------------------------------------------------------------------------------- pure parts


def parse_checksums(text: str) -> dict[str, str]:
    """A CHECKSUM file -> {file name: sha256 hex}; BSD style (and GNU style) lines, comments skipped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = BSD_LINE.match(line) or GNU_LINE.match(line)
        if m:
            out[m.group("name")] = m.group("hex").lower()
    return out


def iso_name(version: str, arch: str) -> str:
    return f"AlmaLinux-{version}-{arch}-boot.iso"


def boot_isos(checksums: Mapping[str, str], arch: str) -> dict[str, str]:
    """{point release: file name} of the boot ISOs listed in a CHECKSUM file."""
    pattern = re.compile(rf"^AlmaLinux-(\d+\.\d+)-{re.escape(arch)}-boot\.iso$")
    return {m.group(1): name for name in checksums if (m := pattern.match(name))}


def newest(versions: list[str]) -> str:
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))


def is_point_release(version: str) -> bool:
    return re.fullmatch(r"\d+\.\d+", version) is not None


def major_of(version: str) -> str:
    """The AlmaLinux major release of a configured version: `10` for 10, 10.1 and latest."""
    head = version.split(".")[0]
    return head if head.isdigit() else "10"


def folder(base: str, version: str, arch: str) -> str:
    return f"{base}/{version}/isos/{arch}"


def offline_message(url: str, reason: str, image: Image) -> str:
    """The one line shown when a download cannot start."""
    return (
        f"cannot download {url} ({reason}); to build without network set "
        f"`iso: /path/to/{iso_name(major_of(image.version) + '.x', iso_arch(image))}` "
        f"under images.{image.name} in invoke.yaml"
    )


# --------------------------------------------------------------------------------- network


def fetch_text(url: str, image: Image, offline: Callable[[str, str, Image], str] | None = None) -> str:
    """The body of a small file (a CHECKSUM), or IsoUnavailable: one line from `offline`
    (default: naming the URL and the `iso:` override)."""
    try:
        with open_url(url) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except NotFound:
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise IsoUnavailable((offline or offline_message)(url, _reason(exc), image)) from None


# --------------------------------------------------------------------------------- signatures

# AlmaLinux clear-signs its CHECKSUM files with the release key of each major release, shipped
# in pipeline/distros/keys/ (its README says where it came from): major → (file, fingerprint).
KEYS_DIR = Path(__file__).resolve().parent / "distros" / "keys"
RELEASE_KEYS: Mapping[str, tuple[str, str]] = {
    "10": ("RPM-GPG-KEY-AlmaLinux-10", "EE6DB7B98F5BF5EDD9DA0DE5DEE5C11CC2A1E572"),
}
# Another public key file (a private mirror signing its own CHECKSUM files; the tests' key): its
# fingerprint is whatever the file holds, so who sets the variable chooses whom to trust.
KEY_ENV = "IMAGEPIPE_ALMA_KEY"
BadSignature = openpgp.BadSignature


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    fingerprint: str | None  # None: the key in IMAGEPIPE_ALMA_KEY, whatever it is
    label: str


def trusted_key(major: str, env: Mapping[str, str] | None = None) -> TrustedKey | None:
    """The key CHECKSUM files of release `major` must be signed with (None: imagepipe has none)."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return TrustedKey(Path(env[KEY_ENV]).expanduser(), None, f"the key in {KEY_ENV}")
    if major not in RELEASE_KEYS:
        return None
    name, fpr = RELEASE_KEYS[major]
    return TrustedKey(KEYS_DIR / name, fpr, f"AlmaLinux {major} key {fpr[:4]}…{fpr[-4:]}")


def checked_checksum(text: str, major: str, url: str) -> tuple[str, str]:
    """(the text to read sums from, how it was checked) for a CHECKSUM file from `url`: the part
    the signature covers when gpgv verifies it with AlmaLinux's key; the file as it came, said to
    be unverified, without gpgv or without a key for `major`; BadSignature when the signature is
    bad, another key's, or missing (AlmaLinux signs every CHECKSUM file)."""
    key = trusted_key(major)
    if key is None:
        return text, f"not verified: imagepipe has no release key for AlmaLinux {major}"
    if openpgp.gpgv() is None:
        return text, f"not verified: gpgv not found ({install_hint('gpgv')})"
    hint = (f"check the mirror: AlmaLinux clear-signs its CHECKSUM files (overrides in {MIRROR_ENV} / "
            f"{VAULT_ENV}; a private mirror's key in {KEY_ENV})")
    signed = openpgp.verify_clearsigned(text, key.path, key.fingerprint, what=url, key_label=key.label, hint=hint)
    return signed, f"verified ({key.label})"


def signed_sums(url: str, image: Image) -> tuple[dict[str, str], str]:
    """A CHECKSUM file's sums, from the part its signature covers, and how that was checked."""
    text, how = checked_checksum(fetch_text(url, image), major_of(image.version), url)
    return parse_checksums(text), how


def resolve(image: Image, mirrors: Mirrors) -> LockEntry:
    """Version (10 / latest / 10.1) -> the concrete point release, URL and sha256."""
    arch = iso_arch(image)
    if is_point_release(image.version):
        return _resolve_point(image, image.version, mirrors)
    url = folder(mirrors.repo, major_of(image.version), arch) + "/CHECKSUM"
    try:
        sums, _how = signed_sums(url, image)
    except NotFound:
        raise IsoUnavailable(f"{url} does not exist: is {image.version!r} an AlmaLinux release?") from None
    found = boot_isos(sums, arch)
    if not found:
        raise IsoUnavailable(f"{url} lists no {arch} boot ISO")
    return _resolve_point(image, newest(list(found)), mirrors)


def _resolve_point(image: Image, version: str, mirrors: Mirrors) -> LockEntry:
    arch = iso_arch(image)
    name = iso_name(version, arch)
    for source, base in (("repo", mirrors.repo), ("vault", mirrors.vault)):
        url = folder(base, version, arch)
        try:
            sums, how = signed_sums(url + "/CHECKSUM", image)
        except NotFound:
            continue  # a point release moves to the vault when the next one ships
        if name not in sums:
            raise IsoUnavailable(f"{url}/CHECKSUM does not list {name}")
        return LockEntry(image.version, version, arch, name, f"{url}/{name}", sums[name], source, how)
    raise IsoUnavailable(f"AlmaLinux {version} ({arch}) is neither on {mirrors.repo} nor on {mirrors.vault}")


# --------------------------------------------------------------------------------- lock file


def read_lock(root: Path) -> dict[str, LockEntry]:
    """iso.lock.json -> {image name: entry} (empty when absent)."""
    path = root / LOCK_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: LockEntry(**entry) for name, entry in data.get("images", {}).items()}
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a valid ISO lock ({exc})", "run: invoke update-iso") from None


def lock_text(entries: Mapping[str, LockEntry]) -> str:
    doc = {
        "comment": "Pinned AlmaLinux ISOs, written by `invoke update-iso`; builds verify the sha256.",
        "images": {name: asdict(entries[name]) for name in sorted(entries)},
    }
    return json.dumps(doc, indent=2) + "\n"


def write_lock(root: Path, entries: Mapping[str, LockEntry]) -> bool:
    """Write the lock atomically; False when the content is unchanged (nothing touched)."""
    return write_if_changed(root / LOCK_FILE, lock_text(entries))


def locked(image: Image, root: Path) -> LockEntry:
    """The pinned ISO for `image`, or a UsageError saying how to pin it."""
    entry = read_lock(root).get(image.name)
    if entry is None or entry.requested != image.version or entry.arch != iso_arch(image):
        state = "no ISO pinned" if entry is None else f"the pinned ISO is for version {entry.requested}"
        raise UsageError(
            f"{image.name}: {state} in {LOCK_FILE} (config says version {image.version})",
            f"run: invoke update-iso {image.name}   (or set images.{image.name}.iso to a local ISO)",
        )
    return entry


# --------------------------------------------------------------------------------- local files


def download(url: str, dest: Path, sha256: str, image: Image, report: Report | None = None) -> Path:
    """Fetch `url` to `dest` via dest.part, verify sha256, then rename; mismatch refuses.

    A .part left by an earlier, interrupted download is resumed with an HTTP Range request (a
    server that ignores Range sends the whole file, which then starts from zero); it is kept
    when the download fails again and removed only when the finished file does not verify.
    Progress (bytes, speed, ETA) goes to `report.transfer` when the reporter has it (the build's
    progress view), else to `report` as a line at most every few seconds (pipeline.download).
    """
    part = dest.with_name(dest.name + ".part")
    try:
        return fetch_verified(url, dest, sha256, report)
    except NotFound:
        raise  # the point release moved: the caller tries the vault (the .part stays for it)
    except ChecksumMismatch as exc:
        raise VerifyFailed(
            f"checksum mismatch for {url}: got sha256 {exc.args[0]}, expected {sha256}; refusing to build",
            "the mirror or the download is corrupt, or the pin is stale: run invoke update-iso",
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        kept = part.stat().st_size if part.exists() else 0
        why = _reason(exc) + (f"; {kept / 1024**2:.1f} MiB kept in {part.name}, resumed next time" if kept else "")
        raise IsoUnavailable(offline_message(url, why, image)) from None


def ensure(image: Image, root: Path, cache_dir: Path, mirrors: Mirrors | None = None,
           report: Report | None = None) -> LocalIso:
    """A local, verified installer ISO for `image` (see the module docstring for the order)."""
    mirrors = mirrors or Mirrors.from_env()
    if image.iso and "://" not in image.iso:
        path = Path(image.iso).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise UsageError(f"images.{image.name}.iso: {path} does not exist", "point iso: at a downloaded AlmaLinux boot ISO")
        named = re.match(r"AlmaLinux-(\d+\.\d+)-", path.name)
        return LocalIso(path, cached_sha256(path, cache_dir), named.group(1) if named else None, None)
    entry = _entry_for_url(image, root, mirrors) if image.iso else pinned_or_resolved(image, root, mirrors, report)
    dest = cache_dir / entry.sha256[:16] / entry.name
    if dest.is_file() and cached_sha256(dest, cache_dir) == entry.sha256:
        return LocalIso(dest, entry.sha256, entry.version, entry.source)
    vault_url = f"{folder(mirrors.vault, entry.version, entry.arch)}/{entry.name}"
    urls = (entry.url, vault_url) if entry.source in ("repo", "vault") else (entry.url,)
    for url in dict.fromkeys(urls):
        try:
            got = download(url, dest, entry.sha256, image, report)
            return LocalIso(got, entry.sha256, entry.version, "vault" if url == vault_url else entry.source)
        except NotFound:
            continue  # the point release moved to the vault after it was pinned
    raise IsoUnavailable(f"{entry.name} is gone from {entry.url} and {vault_url}: run invoke update-iso {image.name}")


def describe(image: Image, root: Path, cache_dir: Path, mirrors: Mirrors | None = None) -> dict[str, Any]:
    """Which ISO a build of `image` would use, without any network or write (the dry run).

    Keys: summary (one line), source, version, url, path, sha256, cached, note, and `problem`
    (message, hint, exit_code) when a build could not start (a configured file that is missing).
    """
    mirrors = mirrors or Mirrors.from_env()
    if image.iso and "://" not in image.iso:
        path = Path(image.iso).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            return {"summary": f"configured file {path} is MISSING", "source": "images.iso", "path": str(path),
                    "problem": {"message": f"images.{image.name}.iso: {path} does not exist",
                                "hint": "point iso: at a downloaded AlmaLinux boot ISO", "exit_code": 2}}
        known = _indexed_sha256(path, cache_dir)
        return {"summary": f"configured file {path.name} (images.{image.name}.iso)", "source": "images.iso",
                "path": str(path), "sha256": known or "computed at build time (not hashed yet)"}
    try:
        pinned = read_lock(root).get(image.name)
    except UsageError as exc:
        return {"summary": f"{LOCK_FILE} is unreadable", "problem": {"message": exc.message, "hint": exc.hint,
                                                                     "exit_code": exc.exit_code}}
    if image.iso:
        if pinned and pinned.url == image.iso:
            return _pinned(pinned, cache_dir, f"configured URL, sha256 pinned in {LOCK_FILE}")
        return {"summary": f"configured URL {image.iso}", "source": "images.iso", "url": image.iso,
                "note": "sha256 read from the CHECKSUM file beside it when the build starts, its signature "
                        "checked with AlmaLinux's key where gpgv is installed"}
    if pinned and pinned.requested == image.version and pinned.arch == iso_arch(image):
        return _pinned(pinned, cache_dir, f"pinned in {LOCK_FILE}")
    why = "no ISO pinned" if pinned is None else f"the pin is for version {pinned.requested}"
    return {"summary": f"NOT PINNED ({why} in {LOCK_FILE})", "source": "unpinned", "version": image.version,
            "note": (f"the build would resolve {image.version!r} to the newest point release on {mirrors.repo} "
                     f"when it starts and download that; pin it first with `invoke update-iso {image.name}` "
                     f"(resolves now and records the URL and sha256 in {LOCK_FILE}, for reproducible builds)")}


def _pinned(entry: LockEntry, cache_dir: Path, source: str) -> dict[str, Any]:
    cached = cache_dir / entry.sha256[:16] / entry.name
    part = cached.with_name(cached.name + ".part")
    state = (f"yes: {cached}" if cached.is_file() else
             f"partly ({part.stat().st_size / 1024**2:.1f} MiB in {part.name}): the download resumes" if part.is_file()
             else "no: downloaded (and verified) when the build starts")
    return {"summary": f"{entry.name} (AlmaLinux {entry.version}, {source})", "source": source,
            "version": entry.version, "url": entry.url, "sha256": entry.sha256, "cached": state,
            "signature": entry.signature or ("not recorded (pinned before imagepipe checked CHECKSUM signatures; "
                                             "invoke update-iso pins it again)")}


def _indexed_sha256(path: Path, cache_dir: Path) -> str | None:
    """The sha256 `cached_sha256` remembered for this file (same size and mtime), read only."""
    try:
        index = json.loads((cache_dir / "sha256-index.json").read_text(encoding="utf-8"))
        hit = index.get(str(path.resolve()))
        st = path.stat()
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit.get("sha256"))
    return None


def pinned_or_resolved(image: Image, root: Path, mirrors: Mirrors, report: Report | None = None) -> LockEntry:
    """The lock's entry; without a (current) one, resolve from the mirror now and say how to pin."""
    try:
        return locked(image, root)
    except UsageError as exc:
        entry = resolve(image, mirrors)
        if report:
            report(f"{exc.message}; using {entry.name} from {entry.source}, CHECKSUM {entry.signature} "
                   f"(pin it: invoke update-iso {image.name})")
        return entry


def _entry_for_url(image: Image, root: Path, mirrors: Mirrors) -> LockEntry:
    """`iso:` is a URL: its sha256 comes from the lock (same URL) or the CHECKSUM beside it."""
    url = str(image.iso)
    pinned = read_lock(root).get(image.name)
    name = url.rsplit("/", 1)[-1]
    if pinned and pinned.url == url:
        return pinned
    try:
        sums, how = signed_sums(url.rsplit("/", 1)[0] + "/CHECKSUM", image)
    except NotFound:
        sums, how = {}, ""
    if name not in sums:
        raise IsoUnavailable(f"no CHECKSUM beside {url} lists {name}: download it and set iso: to the local path")
    return LockEntry(image.version, image.version, image.arch.value, name, url, sums[name], "url", how)


# --------------------------------------------------------------------------------- package repos


def repo_base(version: str, source: str | None, mirrors: Mirrors) -> str:
    """<base>/<point release>: where BaseOS and AppStream of that release live (a release that
    left repo.almalinux.org is on the vault, under the same layout)."""
    return f"{mirrors.vault if source == 'vault' else mirrors.repo}/{version}"


def committed_repo_base(image: Image, root: Path) -> str:
    """The package repo the committed kickstart names: the pinned point release of the committed
    iso.lock.json when it pins this image, else the major release; never a host's mirror."""
    try:
        entry = locked(image, root)
    except UsageError:
        return f"{REPO}/{major_of(image.version)}"
    return repo_base(entry.version, entry.source, Mirrors())


def repo_answers(base: str, arch: str, timeout: float = 15.0) -> bool | None:
    """True when <base>/BaseOS/<arch>/os/repodata/repomd.xml is there, False on 404/410, None
    when the mirror cannot be asked (offline)."""
    try:
        with open_url(f"{base}/BaseOS/{arch}/os/repodata/repomd.xml", timeout=timeout):
            return True
    except NotFound:
        return False
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def staged_repo_base(image: Image, local: LocalIso, mirrors: Mirrors) -> tuple[str, str | None]:
    """The package repo for this build: the ISO's point release on the (possibly overridden)
    mirror, or on the vault when it has left the mirror; and a note when it is only a guess."""
    arch = iso_arch(image)
    if local.version is None:
        base = f"{mirrors.repo}/{major_of(image.version)}"
        return base, f"the ISO's point release is unknown: packages come from {base} (the newest release)"
    bases = [repo_base(local.version, local.source, mirrors)]
    if local.source != "vault":
        bases.append(repo_base(local.version, "vault", mirrors))
    for base in bases:
        answer = repo_answers(base, arch)
        if answer:
            return base, None
        if answer is None:
            return base, f"cannot reach {base} to check it: the installer will try it"
    return bases[0], f"AlmaLinux {local.version} packages are on neither {' nor '.join(bases)}"


# --------------------------------------------------------------------------------- cloud images

CLOUD_NAME = "AlmaLinux-{major}-GenericCloud-latest.{arch}.qcow2"


@dataclass(frozen=True)
class CloudImage:
    """AlmaLinux's generic cloud qcow2 (what Lima runs), pinned by its digest."""

    location: str
    arch: str
    digest: str  # sha256:<hex>


def cloud_image(image: Image, mirrors: Mirrors) -> CloudImage:
    """The generic cloud qcow2 for the image's arch, with its digest from the mirror's CHECKSUM."""
    arch, major = image.arch.value, major_of(image.version)
    base = f"{mirrors.repo}/{major}/cloud/{arch}/images"
    name = CLOUD_NAME.format(major=major, arch=arch)
    try:
        sums = parse_checksums(fetch_text(f"{base}/CHECKSUM", image, offline=_cloud_offline))
    except NotFound:
        raise IsoUnavailable(f"{base}/CHECKSUM does not exist") from None
    if name not in sums:
        raise ImagepipeError(f"{base}/CHECKSUM does not list {name}")
    return CloudImage(f"{base}/{name}", arch, f"sha256:{sums[name]}")


def _cloud_offline(url: str, reason: str, image: Image) -> str:
    return f"cannot download {url} ({reason}): Lima needs the network once to pin the cloud image's digest"
