"""What is inside an image: its package list, one `Package` per RPM, Debian package or Nix store path.

A distro profile's `packages(plan, stage)` hook returns the list after the engine has built the
image (pipeline.distros). Where the list comes from:

    AlmaLinux   the guest itself: the kickstart's %post writes `rpm -qa --qf ...` (RPM_QUERYFORMAT)
                to GUEST_RPM_LIST, Packer's file provisioner downloads it into <stage>/collected/
    NixOS       the runtime closure of the system: `nix path-info -r --json` of its toplevel
    demo        the Debian packages the guest was assembled from (pipeline.demo)

Files a build hands to the hook wait in <stage>/collected/ (COLLECTED), which the build removes
before publishing: the manifest and the SBOM are the record. Parsers here are pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.base.errors import BuildFailed

COLLECTED = "collected"

# What the AlmaLinux kickstart asks rpm for: one package per line, tab-separated; an RPM without
# an epoch prints "(none)". rpm itself expands \t and \n in a query format.
RPM_QUERYFORMAT = r"%{NAME}\t%{EPOCH}\t%{VERSION}\t%{RELEASE}\t%{ARCH}\n"
GUEST_RPM_LIST = "/var/lib/imagepipe/rpm-packages.tsv"
RPM_LIST = "rpm-packages.tsv"  # its name under <stage>/collected/
DEB_LIST = "deb-packages.json"

KINDS = ("rpm", "deb", "nix")
NIX_STORE_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-(?P<name>[^/]+)$")


@dataclass(frozen=True, order=True)
class Package:
    """One package of an image. `version` is the upstream version; RPMs add epoch and release."""

    kind: str                      # rpm | deb | nix
    name: str
    version: str
    release: str | None = None     # rpm
    epoch: str | None = None       # rpm (None: no epoch)
    arch: str | None = None        # rpm, deb
    path: str | None = None        # nix: the store path
    distro: str | None = None      # deb: the release it comes from (the purl's distro qualifier: debian-13)

    @property
    def full_version(self) -> str:
        """The version as people compare it: rpm [epoch:]version-release; deb and nix as they are."""
        if self.kind == "rpm":
            head = f"{self.epoch}:" if self.epoch else ""
            return f"{head}{self.version}-{self.release}" if self.release else f"{head}{self.version}"
        return self.version

    @property
    def key(self) -> str:
        """What identifies "the same package" across builds: name (+ arch where there is one)."""
        return f"{self.name}.{self.arch}" if self.arch else self.name

    @property
    def purl(self) -> str:
        """The package URL (purl-spec): pkg:rpm/almalinux/..., pkg:deb/debian/..., pkg:nix/..."""
        namespace = {"rpm": "almalinux/", "deb": "debian/", "nix": ""}[self.kind]
        version = self.full_version if self.kind != "rpm" else _rpm_purl_version(self)
        qualifiers = {"arch": self.arch} if self.arch else {}
        if self.distro:
            qualifiers["distro"] = self.distro
        if self.kind == "rpm" and self.epoch:
            qualifiers["epoch"] = self.epoch
        at = f"@{_enc(version)}" if version else ""
        query = "&".join(f"{k}={_enc(v)}" for k, v in sorted(qualifiers.items()))
        return f"pkg:{self.kind}/{namespace}{_enc(self.name)}{at}" + (f"?{query}" if query else "")

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's record of this package (None fields left out)."""
        record: dict[str, Any] = {"type": self.kind, "name": self.name, "version": self.version}
        for key in ("epoch", "release", "arch", "path", "distro"):
            value = getattr(self, key)
            if value is not None:
                record[key] = value
        record["purl"] = self.purl
        return record


def _rpm_purl_version(p: Package) -> str:
    """purl's rpm version is version-release; the epoch goes into a qualifier."""
    return f"{p.version}-{p.release}" if p.release else p.version


def _enc(text: str) -> str:
    """Percent-encode a purl component (':' stays readable, as purl-spec allows)."""
    return quote(text, safe="").replace("%3A", ":")


def from_manifest(records: Iterable[Mapping[str, Any]]) -> list[Package]:
    """The manifest's `packages` back into Packages (unknown keys are ignored)."""
    out = []
    for r in records:
        out.append(Package(str(r.get("type", "")), str(r["name"]), str(r.get("version", "")),
                           _opt(r.get("release")), _opt(r.get("epoch")), _opt(r.get("arch")), _opt(r.get("path")),
                           _opt(r.get("distro"))))
    return out


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------------ rpm


def parse_rpm_list(text: str) -> list[Package]:
    """Lines written by `rpm -qa --qf RPM_QUERYFORMAT` → Packages, sorted.

    `gpg-pubkey` entries are imported signing keys, not software: they are left out.
    """
    packages = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5 or not all(fields[i] for i in (0, 2, 3, 4)):
            raise BuildFailed(f"the guest's package list has a malformed line {number}: {line[:120]!r}",
                              hint=f"it is written by `rpm -qa --qf '{RPM_QUERYFORMAT}'` in the kickstart's %post")
        name, epoch, version, release, arch = fields
        if name == "gpg-pubkey":
            continue
        packages.append(Package("rpm", name, version, release, None if epoch in ("(none)", "") else epoch, arch))
    return sorted(packages)


def read_rpm_list(stage: Path) -> list[Package]:
    """The package list the AlmaLinux guest handed back (<stage>/collected/RPM_LIST)."""
    path = stage / COLLECTED / RPM_LIST
    if not path.is_file():
        raise BuildFailed(f"the guest handed back no package list ({GUEST_RPM_LIST} → {path})",
                          hint="the kickstart's %post writes it and the template's file provisioner downloads it: "
                               "run `invoke render` and check both")
    return parse_rpm_list(path.read_text(encoding="utf-8", errors="replace"))


# ------------------------------------------------------------------------------------------ deb


def deb_package(fields: Mapping[str, str]) -> Package:
    """A Debian package from its control fields (Package, Version, Architecture)."""
    return Package("deb", fields["Package"], fields["Version"], arch=fields.get("Architecture") or None)


def write_deb_list(stage: Path, packages: Iterable[Package]) -> Path:
    """Record the Debian packages a guest was made of, for the packages hook."""
    folder = stage / COLLECTED
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DEB_LIST
    path.write_text(json.dumps([p.as_manifest() for p in sorted(packages)], indent=1) + "\n", encoding="utf-8")
    return path


def write_collected(stage: Path, name: str, data: Any) -> Path:
    """Keep `data` (JSON) for the steps after the engine's (<stage>/collected/`name`)."""
    folder = stage / COLLECTED
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_collected(stage: Path, name: str) -> Any:
    """What `write_collected` kept (None when there is nothing)."""
    try:
        return json.loads((stage / COLLECTED / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def parse_dpkg_query(text: str, distro: str | None = None) -> list[Package]:
    """`dpkg-query -W -f '${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\n'` lines →
    the installed packages, sorted (`distro`: the purls' distro qualifier, e.g. debian-13)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4 or not fields[0] or not fields[1]:
            raise BuildFailed(f"dpkg-query printed a malformed line {number}: {line[:120]!r}")
        name, version, arch, status = fields
        if status.strip() == "ii":
            out.append(Package("deb", name, version, arch=arch or None, distro=distro))
    return sorted(out)


def read_deb_list(stage: Path) -> list[Package]:
    """The Debian packages recorded by `write_deb_list`."""
    path = stage / COLLECTED / DEB_LIST
    if not path.is_file():
        raise BuildFailed(f"no record of the guest's Debian packages at {path}")
    return from_manifest(json.loads(path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------ nix


def split_drv_name(name: str) -> tuple[str, str]:
    """Nix's own rule (builtins.parseDrvName): the version starts at the first '-' that is not
    followed by a letter. "openssh-9.9p1" → ("openssh", "9.9p1"); "hello" → ("hello", "")."""
    for i, char in enumerate(name[:-1]):
        if char == "-" and not name[i + 1].isalpha():
            return name[:i], name[i + 1:]
    return name, ""


def nix_package(store_path: str) -> Package | None:
    """A store path → Package (None for something that is not a store path)."""
    m = NIX_STORE_RE.match(store_path)
    if not m:
        return None
    name, version = split_drv_name(m.group("name"))
    return Package("nix", name, version, path=store_path)


def parse_path_info(text: str) -> list[Package]:
    """`nix path-info -r --json` → Packages, sorted. Read by its shape: nix < 2.19 prints a list
    of objects with "path"; newer nix (and `--json-format 1`) an object keyed by path;
    `--json-format 2` (nix 2.33+) `{"info": {"<hash>-<name>": {...}}, "storeDir": ..., "version": 2}`,
    its keys without the store directory."""
    try:
        data = json.loads(text)
    except ValueError:
        raise BuildFailed("nix path-info did not print JSON") from None
    if isinstance(data, dict) and isinstance(data.get("info"), dict) and "version" in data:
        store = str(data.get("storeDir") or "/nix/store").rstrip("/")
        paths = [p if p.startswith("/") else f"{store}/{p}" for p in data["info"]]
    elif isinstance(data, dict):
        paths = list(data)
    elif isinstance(data, list):
        paths = [item.get("path", "") for item in data if isinstance(item, dict)]
    else:
        paths = []
    found = [nix_package(p) for p in paths]
    return sorted(p for p in found if p is not None)


# ------------------------------------------------------------------------------------------ all


def to_manifest(packages: Iterable[Package]) -> list[dict[str, Any]]:
    return [p.as_manifest() for p in sorted(packages)]
