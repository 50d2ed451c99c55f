"""Nix's remote builders as data: the `builders` setting and machines files, parsed (pure).

A builder is one line of nix's machines format (the `builders` setting holds such lines
separated by `;` or newlines, or `@FILE` references to machines files, /etc/nix/machines by
default):

    URI  SYSTEMS  SSH-KEY  MAX-JOBS  SPEED  SUPPORTED-FEATURES  MANDATORY-FEATURES  HOST-KEY

Every field after the URI may be left out or be `-` (its default: this host's system, no key,
1 job, speed 1, no features, no host key); lists are comma-separated; `#` starts a comment.
A URI without a scheme is an ssh:// host, as nix reads it. Which builder can take a derivation
follows nix's own rule: the builder lists the derivation's system, offers every feature it
requires (supported or mandatory), and each of its mandatory features is required.

Also here: the derivation's real needs from `nix show-derivation` (system and
`requiredSystemFeatures`, which make-disk-image.nix sets to `kvm` through runInLinuxVM), and
where a chroot store keeps its files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.base.errors import MachinesError

# What make-disk-image.nix requires of a builder (vmTools.runInLinuxVM's requiredSystemFeatures):
# the assumption where the derivation itself has not been evaluated (doctor).
DISK_IMAGE_FEATURES: frozenset[str] = frozenset({"kvm"})
# A machines file may name further files; nix follows them, we stop at this depth (a loop).
MAX_DEPTH = 8
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True)
class Machine:
    """One remote builder nix knows about."""

    uri: str
    systems: tuple[str, ...]
    ssh_key: str | None = None
    max_jobs: int = 1
    speed: float = 1.0
    supported: frozenset[str] = frozenset()
    mandatory: frozenset[str] = frozenset()
    host_key: str | None = None       # base64 of the builder's public host key (nix pins it)
    source: str = "builders"          # where it was configured: the setting or a machines file

    def lacks(self, system: str, features: Iterable[str]) -> str | None:
        """Why this builder cannot build a `system` derivation requiring `features` (None: it can)."""
        need = frozenset(features)
        if system not in self.systems:
            return f"builds {', '.join(self.systems) or 'nothing'}, not {system}"
        missing = sorted(need - self.supported - self.mandatory)
        if missing:
            return f"lacks the feature{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        unmet = sorted(self.mandatory - need)
        if unmet:
            return f"only takes derivations that require {', '.join(unmet)}"
        return None

    def can_build(self, system: str, features: Iterable[str]) -> bool:
        return self.lacks(system, features) is None

    @property
    def features(self) -> frozenset[str]:
        return self.supported | self.mandatory

    def describe(self) -> str:
        """`ssh-ng://hal9000 (x86_64-linux; kvm, big-parallel; 4 jobs)`."""
        feats = ", ".join(sorted(self.supported)) or "no features"
        if self.mandatory:
            feats += f"; mandatory: {', '.join(sorted(self.mandatory))}"
        return f"{self.uri} ({', '.join(self.systems)}; {feats}; {self.max_jobs} job{'s' if self.max_jobs != 1 else ''})"

    def as_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "systems": list(self.systems), "supported_features": sorted(self.supported),
                "mandatory_features": sorted(self.mandatory), "max_jobs": self.max_jobs, "speed": self.speed,
                "ssh_key": self.ssh_key, "host_key_pinned": self.host_key is not None, "source": self.source}


def spec_lines(text: str) -> list[str]:
    """The non-empty entries of a `builders` value or machines file (`;` / newline separated,
    `#` comments removed); `@FILE` references are kept as they are."""
    entries = []
    for raw in re.split(r"[;\n]", text):
        line = raw.split("#", 1)[0].strip()
        if line:
            entries.append(line)
    return entries


def _field(tokens: Sequence[str], i: int) -> str | None:
    return tokens[i] if len(tokens) > i and tokens[i] not in ("", "-") else None


def _number(tokens: Sequence[str], i: int, line: str, kind: type[int | float]) -> Any:
    text = _field(tokens, i)
    if text is None:
        return kind(1)
    try:
        value = kind(text)
    except ValueError:
        raise MachinesError(f"bad machine specification {line!r}: column {i + 1} ({text!r}) is not a number") from None
    if value < 0:
        raise MachinesError(f"bad machine specification {line!r}: column {i + 1} is negative")
    return value


def _with_scheme(uri: str) -> str:
    """nix's reading of a URI: a bare host name is ssh://host."""
    special = uri in ("auto", "daemon", "local") or uri.startswith(("auto?", "daemon?", "local?", "?"))
    return uri if "://" in uri or "/" in uri or special else f"ssh://{uri}"


def parse_line(line: str, this_system: str, source: str = "builders") -> Machine:
    """One machine specification (see the module docstring)."""
    tokens = line.split()
    if not tokens or tokens[0] == "-":
        raise MachinesError(f"bad machine specification {line!r}: no store URI in its first column")
    systems = tuple(s for s in (_field(tokens, 1) or this_system).split(",") if s)
    key = _field(tokens, 7)
    if key is not None and not _BASE64.match(key):
        raise MachinesError(f"bad machine specification {line!r}: column 8 (the host key) is not base64")
    return Machine(
        uri=_with_scheme(tokens[0]),
        systems=systems,
        ssh_key=_field(tokens, 2),
        max_jobs=_number(tokens, 3, line, int),
        speed=max(1.0, _number(tokens, 4, line, float)),
        supported=frozenset(f for f in (_field(tokens, 5) or "").split(",") if f),
        mandatory=frozenset(f for f in (_field(tokens, 6) or "").split(",") if f),
        host_key=key,
        source=source,
    )


def parse(text: str, this_system: str, read: Callable[[str], str | None] = lambda _p: None,
          source: str = "builders", depth: int = 0) -> list[Machine]:
    """Every machine in a `builders` value or machines file; `@FILE` entries are read through
    `read` (None: the file does not exist, which nix ignores too)."""
    machines: list[Machine] = []
    for entry in spec_lines(text):
        if entry.startswith("@"):
            path = entry[1:].strip()
            content = read(path) if depth < MAX_DEPTH else None
            if content is not None:
                machines += parse(content, this_system, read, source=path, depth=depth + 1)
            continue
        machines.append(parse_line(entry, this_system, source))
    return machines


def file_refs(text: str) -> list[str]:
    """The machines files a `builders` value refers to (`@FILE`), in order."""
    return [e[1:].strip() for e in spec_lines(text) if e.startswith("@")]


def fitting(machines: Iterable[Machine], system: str, features: Iterable[str]) -> list[Machine]:
    """The machines that can build a `system` derivation requiring `features`, fastest first
    (nix's own preference: speed factor)."""
    need = frozenset(features)
    return sorted((m for m in machines if m.can_build(system, need)), key=lambda m: -m.speed)


# --------------------------------------------------------------------------------- a derivation


@dataclass(frozen=True)
class Needs:
    """What one derivation asks of the machine that builds it."""

    system: str
    features: frozenset[str]
    drv: str = ""

    def describe(self) -> str:
        feats = ", ".join(sorted(self.features))
        return f"{self.system}" + (f" with {feats}" if feats else "")


def parse_show_derivation(text: str) -> Needs:
    """`nix derivation show INSTALLABLE` (one derivation) → its system and required features.

    Read by its shape: nix before 2.34 prints `{"/nix/store/<hash>-<name>.drv": {...}}`; 2.34 and
    later wrap it, `{"derivations": {"<hash>-<name>.drv": {...}}, "version": 4}`, with the store
    prefix left off the keys and the output paths. requiredSystemFeatures is a space-separated
    string in the environment, or a list inside `__json` for derivations with structured attributes.
    """
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("derivations"), dict) and "version" in data:
        data = data["derivations"]
    if not isinstance(data, dict) or len(data) != 1:
        count = len(data) if isinstance(data, dict) else 0
        raise ValueError(f"expected exactly one derivation, found {count}")
    drv, body = next(iter(data.items()))
    if not isinstance(body, dict):
        raise TypeError("the derivation is not a JSON object")
    env = body.get("env") or {}
    out = env.get("out")
    if not drv.startswith("/") and isinstance(out, str) and out.startswith("/"):
        drv = f"{out.rsplit('/', 1)[0]}/{drv}"  # the store directory, from the output's full path
    raw: Any = env.get("requiredSystemFeatures", "")
    if "__json" in env:
        raw = json.loads(env["__json"]).get("requiredSystemFeatures", raw)
    features = raw.split() if isinstance(raw, str) else [str(f) for f in raw]
    system = body.get("system") or body.get("platform") or env.get("system")
    if not isinstance(system, str):
        raise TypeError("the derivation names no system")
    return Needs(system, frozenset(features), drv)


# --------------------------------------------------------------------------------- store paths


def store_root(store: str | None) -> Path | None:
    """Where a chroot store keeps its files (`store = /some/dir` or `local?root=/some/dir`);
    None for the ordinary store (its paths are where they say)."""
    if not store:
        return None
    if store.startswith("/"):
        return Path(store.split("?", 1)[0])
    if store.startswith(("local?", "local://?")):
        query = store.split("?", 1)[1]
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "root" and value.startswith("/"):
                return Path(value)
    return None


def physical(path: str | Path, store: str | None) -> Path:
    """The file behind a store path, for the configured store (a chroot store relocates it)."""
    root = store_root(store)
    p = Path(path)
    return root / p.relative_to("/") if root is not None and p.is_absolute() else p


STORE_PATH = re.compile(r"^(/[A-Za-z0-9._+-]+)+/[0-9a-z]{32}-[A-Za-z0-9+._?=-]+$")


def check_store_path(path: str) -> str:
    """A store path nix reported, as a plain absolute path (it goes to rsync and ssh)."""
    if not STORE_PATH.match(path) or ".." in PurePosixPath(path).parts:
        raise ValueError(f"not a store path: {path[:200]!r}")
    return path


def configured(settings: Mapping[str, str] | None, read: Callable[[str], str | None]) -> list[Machine]:
    """The builders a nix with these settings (`nix config show`) would use."""
    if not settings:
        return []
    this_system = settings.get("system", "")
    return parse(settings.get("builders", ""), this_system, read)
