"""Debian: a cloud image assembled from Debian's packages on the host, with no build VM.

mmdebstrap installs the root from a Debian mirror (by default the one this host's apt sources
name; `mirror:` overrides it) and runs the image's committed customize hook in it
(pipeline.render.debian: accounts, SSH, sudo, console, networking, cloud-init, apt sources, no
per-machine identity). imagepipe's own steps then make the disk on the host without loop devices
or mounts: a GPT on a file, the root as ext4 (`mke2fs -d`), the ESP as FAT (mtools), GRUB for
UEFI and, on x86_64, for BIOS, using the GRUB tools of the new root itself
(pipeline.drivers.mmdebstrap). The image boots from its own boot loader.

The suite's Release files are an input of the build: `--if-changed` and `rebuild` build again
when Debian publishes an update, and not otherwise; their date is the build's SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import os
import re
import shlex
import urllib.error
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline import contract, keys
from pipeline.base.errors import HostUnsuitable, MirrorUnavailable
from pipeline.base.fsutil import atomic_write
from pipeline.contents import packages
from pipeline.distros import Profile, Report
from pipeline.drivers import Prepared, debcache
from pipeline.model import Accel, Arch, Config, Image
from pipeline.render import debian as render

if TYPE_CHECKING:
    from pipeline.contents.packages import Package
    from pipeline.drivers.mmdebstrap import MmdebstrapDriver
    from pipeline.host import HostFacts
    from pipeline.plan import BuildPlan

DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = Path("/etc/apt")
RELEASE_TIMEOUT = 20.0
INFO_FILE = "debian.json"  # in <stage>/collected/: what the build was made from (the manifest's `debian`)


@dataclass(frozen=True)
class Mirrors:
    """Where a Debian image's packages come from, and how that was decided."""

    main: str
    security: str | None
    source: str  # "invoke.yaml" | the host's sources file | "the default"


class Debian(Profile):
    name = "debian"
    title = "Debian"
    tcg_duration = "No build VM: the root is assembled on the host (a minute or two); the boot test runs under TCG"
    image_defaults: ClassVar[Mapping[str, Any]] = {"disk_size": 3072}
    own_keys = frozenset({"mirror", "packages"})
    build_vm = False

    @property
    def driver(self) -> MmdebstrapDriver:
        from pipeline.drivers.mmdebstrap import MmdebstrapDriver  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return MmdebstrapDriver(self)

    # ------------------------------------------------------------------ configuration and files

    def config_problems(self, image: Image) -> list[tuple[str, str]]:
        problems = super().config_problems(image)
        if image.version not in render.SUITES:
            offered = ", ".join(f"{v} ({s})" for v, s in render.SUITES.items())
            problems.append(("version", f"Debian {image.version!r} is not a release imagepipe builds: use one of "
                                        f"{offered}"))
        return problems

    def family(self, image: Image) -> str:
        return f"debian{image.version}"

    def template(self, root: Path, image: Image) -> Path:
        """The image's committed customize hook."""
        return render.template_path(root, image)

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        return {self.template(root, image): render.customize_script(image, source)}

    def input_parts(self, root: Path, image: Image) -> dict[str, str]:
        """The package set's pins: each pocket's Release file (its sha256; network, once per
        process), the mirror, and the packages asked for."""
        mirrors = mirrors_for(image)
        parts = {"debian:mirror": mirrors.main, "debian:packages": ",".join(render.packages(image))}
        for url in release_urls(image, mirrors):
            parts[f"debian:release:{pocket_name(url)}"] = fetch_release(url).sha256
        return parts

    def hash_tools(self, image: Image) -> list[str]:
        return ["mmdebstrap", "mke2fs"]

    # ------------------------------------------------------------------ this host

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        tools = {"mmdebstrap": "assembling the root", "sfdisk": "the partition table", "mke2fs": "the root file system",
                 "debugfs": "the root file system's file times",
                 "mkfs.vfat": "the EFI system partition", "mcopy": "the EFI system partition (mtools)",
                 "unshare": "the private mount namespace of the build", "chroot": "GRUB's tools of the new root",
                 "qemu-img": "the qcow2 image"}
        if facts is None or facts.arch is not image.arch:
            tools[qemu_user(image)] = f"running {render.DPKG_ARCH[image.arch]} programs in the root (qemu-user-static)"
        return tools

    def host_problem(self, image: Image, facts: HostFacts, cfg: Config) -> HostUnsuitable | None:
        """Linux only (mmdebstrap, chroot, e2fsprogs), as root (mmdebstrap --mode=root)."""
        if facts.os != "linux":
            return HostUnsuitable(f"{image.name} cannot be built on {'macOS' if facts.os == 'darwin' else facts.os}: "
                                  "Debian images are assembled with mmdebstrap, chroot and Linux file system tools",
                                  remote_hint(image, cfg))
        if os.geteuid() != 0:
            return HostUnsuitable(f"building {image.name} needs root: mmdebstrap --mode=root installs the packages as "
                                  "root, and GRUB's tools run inside the new root (chroot)",
                                  f"run the build as root (sudo .venv/bin/invoke build {image.name}), or on a "
                                  f"builder that logs in as root: invoke remote-sync-build HOST --image {image.name}")
        return None

    # ------------------------------------------------------------------ one build

    def prepared_variables(self, image: Image) -> list[str]:
        return ["mirror", "security_mirror", "source_date_epoch", "customize", "ssh_keys"]

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """The mirrors and their Release files (checked: a missing suite fails here), the staged
        customize hook and the build's SSH keys."""
        image = plan.image
        mirrors = mirrors_for(image)
        report(f"mirror {mirrors.main} ({mirrors.source})"
               + (f", security {mirrors.security}" if mirrors.security else ", no security archive"))
        releases = {pocket_name(url): fetch_release(url) for url in release_urls(image, mirrors)}
        suite = render.suite(image)
        date = releases[suite].epoch
        report(f"{suite}: Release of {releases[suite].date}")
        inputs = stage / "inputs"  # the driver removes it before publishing
        inputs.mkdir(exist_ok=True)
        committed = self.template(plan.root, image)
        text = render.customize_script(image)
        if not committed.is_file() or committed.read_text(encoding="utf-8") != render.customize_script(image, "invoke.yaml"):
            report(f"note: {committed.relative_to(plan.root)} is not what invoke.yaml renders (building with the "
                   "rendered one): run invoke render and commit it")
        customize = inputs / "customize.sh"
        atomic_write(customize, text, mode=0o755)
        ssh_keys = inputs / "ssh_keys"
        staged = contract.with_build_key(image, keys.public_key(plan.ssh_key), *plan.extra_keys)
        user = staged.user(image.ssh_user)
        atomic_write(ssh_keys, "".join(f"{k}\n" for k in (user.public_keys if user else ())), mode=0o644)
        info = {"suite": suite, "mirror": mirrors.main, "security_mirror": mirrors.security,
                "release": {name: {"date": r.date, "sha256": r.sha256} for name, r in releases.items()}}
        packages.write_collected(stage, INFO_FILE, info)
        return Prepared(variables={"mirror": mirrors.main, "security_mirror": mirrors.security or "",
                                   "source_date_epoch": str(date), "customize": str(customize),
                                   "ssh_keys": str(ssh_keys)})

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """Every package installed in the root (dpkg-query over its database, by the driver)."""
        return packages.read_deb_list(stage)

    def manifest_extra(self, plan: BuildPlan) -> dict[str, Any]:
        """The suite, the mirrors and the Release files the build was made from."""
        return {"debian": packages.read_collected(plan.staging, INFO_FILE)}

    def guest_agent(self, image: Image) -> bool:
        return True

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """The suite, the mirror (and where it was found), the packages and the .deb cache."""
        mirrors = mirrors_for(image)
        cached = debcache.count(debcache.cache_dir())
        return {"suite": f"{render.suite(image)} (Debian {image.version}, {render.DPKG_ARCH[image.arch]})",
                "mirror": f"{mirrors.main} ({mirrors.source})",
                "security": mirrors.security or "none (no security archive in the host's apt sources)",
                "packages": ", ".join(render.packages(image)) + " (and Debian's required ones)",
                "deb cache": f"{cached} packages in {debcache.cache_dir()}" if cached else
                             f"empty ({debcache.cache_dir()}): the first build downloads every package",
                "variables": {"mirror": mirrors.main, "security_mirror": mirrors.security or ""}}

    def boot_deadline(self, image: Image, accel: Accel) -> float:
        """A whole Debian boots under TCG in one to three minutes here (cloud-init's first boot
        is the slow part), an aarch64 one emulated on x86_64 in about eight; a busy host doubles
        that."""
        if accel is not Accel.TCG:
            return 120.0
        return 1200.0 if image.arch is Arch.AARCH64 else 420.0

    def announce(self, plan: BuildPlan, facts: HostFacts) -> str | None:
        where = "" if facts.arch is plan.image.arch else \
            f" ({render.DPKG_ARCH[plan.image.arch]} programs run under qemu-user)"
        return (f"no build VM: mmdebstrap assembles the root here{where}; "
                f"a boot test would use {plan.accel.accel.value} ({plan.accel.reason})")


def guest_view(image: Image, script: str, staged_keys: str = "") -> contract.GuestView:
    """What a rendered customize hook (and the build's staged key file) give the guest contract:
    the keys each user gets, the sudoers drop-in, root's SSH login, GRUB's console, and what the
    package set brings (systemd-logind powers off on the ACPI button; the guest agent)."""
    found: dict[str, set[str]] = {}
    sudoers: set[str] = set()
    in_sudoers = False
    for line in script.splitlines():
        if line.startswith("put 0440 /etc/sudoers.d/"):
            in_sudoers = True
            continue
        if in_sudoers:
            if line == "EOF":
                in_sudoers = False
            elif line.endswith("NOPASSWD: ALL"):
                sudoers.add(line.split()[0])
            continue
        words = shlex.split(line, comments=True) if "| keys " in line or "then keys " in line else []
        if "keys" in words:
            user = words[words.index("keys") + 1]
            given = words[2:words.index("|")] if words[:2] == ["printf", "%s\\n"] else staged_keys.splitlines()
            found.setdefault(user, set()).update(k for k in given if k)
    consoles = re.findall(r"console=(\w+)", next((x for x in script.splitlines() if x.startswith("GRUB_CMDLINE_LINUX=")), ""))
    root_password = any(line.startswith("printf '%s\\n' 'root:") for line in script.splitlines())
    wanted = render.packages(image)
    return contract.GuestView(
        keys={u: frozenset(k) for u, k in found.items()}, passwordless_sudo=frozenset(sudoers),
        root_password_ssh=root_password and "PermitRootLogin yes" in script.splitlines(),
        console=consoles[-1] if consoles else None, power_button="systemd-sysv" in wanted,
        guest_agent="qemu-guest-agent" in wanted)


def remote_hint(image: Image, cfg: Config) -> str:
    """Where else `image` can be built: a Linux builder (any arch: the root of another arch is
    assembled under qemu-user), then fetched."""
    builders = sorted(b.name for b in cfg.builders.values())
    host = builders[0] if len(builders) == 1 else "HOST"
    line = (f"build it on a Linux builder (as root) and fetch it: invoke remote-sync-build {host} --image {image.name}"
            f" && invoke remote-fetch {host} {image.name}")
    return line + (f"\n  configured builders: {', '.join(builders)}" if builders else
                   f"\n  no builder is configured: add one under builders: in {cfg.source}")


def qemu_user(image: Image) -> str:
    """The qemu-user-static binary that runs `image`'s programs on another arch."""
    return f"qemu-{image.arch.value}-static"


# ---------------------------------------------------------------------------------------------
# Mirrors: the host's apt sources, or invoke.yaml's


DEB_LINE = re.compile(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)")
DEBIAN_SUITES = {"stable", "testing", "unstable", "oldstable", "sid", "experimental", "bullseye", "bookworm",
                 "trixie", "forky", "duke", "buster"}


def parse_sources(texts: Iterable[str]) -> list[tuple[str, str]]:
    """(URI, suite) of every `deb` entry in apt sources: deb822 `.sources` stanzas or one-line
    `sources.list` lines (pure)."""
    out: list[tuple[str, str]] = []
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = _deb822(stanza)
            if "uris" in fields:
                if "deb" in fields.get("types", "deb").split() and fields.get("enabled", "yes").lower() != "no":
                    out += [(uri, suite) for uri in fields["uris"].split() for suite in fields.get("suites", "").split()]
                continue
            for line in stanza.splitlines():
                m = DEB_LINE.match(line)
                if m:
                    out.append((m.group("uri"), m.group("suite")))
    return out


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0] in " \t" and key:
            fields[key] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep and " " not in name:
            key = name.strip().lower()
            fields[key] = value.strip()
    return fields


def host_mirrors(entries: Iterable[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The Debian mirror and security archive the host's apt sources name (pure): the first
    entry with a Debian suite (an Ubuntu host's mirror is not one), and the first `-security` one."""
    main = security = None
    for uri, suite in entries:
        base, _sep, pocket = suite.partition("-")
        if base not in DEBIAN_SUITES or not uri.startswith(("http://", "https://", "file:/")):
            continue
        if pocket == "security" and security is None:
            security = uri.rstrip("/")
        elif not pocket and main is None:
            main = uri.rstrip("/")
    return main, security


@functools.cache
def _host_sources() -> tuple[tuple[str, str] | None, str | None]:
    """The host's mirror (and the file naming it) and its security archive (read once)."""
    files = sorted((APT_SOURCES / "sources.list.d").glob("*.sources")) + [APT_SOURCES / "sources.list"] + \
        sorted((APT_SOURCES / "sources.list.d").glob("*.list"))
    main: tuple[str, str] | None = None
    security = None
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        m, s = host_mirrors(parse_sources([text]))
        if m and main is None:
            main = (m, str(path))
        security = security or s
    return main, security


def mirrors_for(image: Image) -> Mirrors:
    """invoke.yaml's `mirror:`, else the host's apt sources, else deb.debian.org; the security
    archive from the host's sources (none when it names none, or when `mirror:` is a file://)."""
    host, security = _host_sources()
    if image.mirror:
        return Mirrors(image.mirror.rstrip("/"), None if image.mirror.startswith("file:") else security,
                       "mirror: in invoke.yaml")
    if host is not None:
        return Mirrors(host[0], security, f"from {host[1]}")
    return Mirrors(DEFAULT_MIRROR, security, "the default: the host's apt sources name no Debian mirror")


def release_urls(image: Image, mirrors: Mirrors) -> list[str]:
    """The InRelease file of every pocket the image is built from."""
    suite = render.suite(image)
    urls = [f"{mirrors.main}/dists/{suite}/InRelease", f"{mirrors.main}/dists/{suite}-updates/InRelease"]
    if mirrors.security:
        urls.append(f"{mirrors.security}/dists/{suite}-security/InRelease")
    return urls


def pocket_name(url: str) -> str:
    """trixie, trixie-updates, trixie-security from a Release URL."""
    return url.rsplit("/", 2)[-2]


@dataclass(frozen=True)
class Release:
    sha256: str
    date: str    # the Release file's Date field, as written
    epoch: int   # the same as seconds (the build's SOURCE_DATE_EPOCH)


def parse_release_date(text: str) -> tuple[str, int] | None:
    """The `Date:` of a Release file and its epoch seconds (pure; None without a valid one)."""
    m = re.search(r"^Date:\s*(.+)$", text, re.MULTILINE)
    if not m:
        return None
    try:
        return m.group(1).strip(), int(email.utils.parsedate_to_datetime(m.group(1).strip()).timestamp())
    except (TypeError, ValueError):
        return None


@functools.cache
def fetch_release(url: str) -> Release:
    """The InRelease file at `url` (once per process): its sha256 and date. MirrorUnavailable
    names the mirror and what is wrong: it does not answer, or it has no such suite."""
    from pipeline.download import NotFound, open_url, reason  # noqa: PLC0415 (urllib.request: kept off every command's start)

    mirror = url.rsplit("/dists/", 1)[0]
    suite = pocket_name(url)
    try:
        if url.startswith("file:"):
            data = Path(urllib.parse.urlsplit(url).path).read_bytes()
        else:
            with open_url(url, timeout=RELEASE_TIMEOUT) as response:
                data = response.read()
    except (NotFound, FileNotFoundError):
        raise MirrorUnavailable(f"the mirror {mirror} has no suite {suite} ({url} does not exist)",
                                "check the image's version and `mirror:` in invoke.yaml (the mirror must carry "
                                f"{suite}, e.g. {DEFAULT_MIRROR})") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise MirrorUnavailable(f"the mirror {mirror} does not answer ({reason(exc)}) while fetching {suite}'s "
                                "Release file", "check the network or set `mirror:` for the image in invoke.yaml "
                                                f"(it is {mirror})") from None
    text = data.decode("utf-8", errors="replace")
    date = parse_release_date(text)
    if date is None:
        raise MirrorUnavailable(f"{url} is not a Release file (no Date: field)",
                                f"check that {mirror} is a Debian mirror")
    return Release(hashlib.sha256(data).hexdigest(), date[0], date[1])


PROFILE = Debian()
