"""Where the packer in use came from, for `invoke doctor`: a command plus a pure parser.

On Debian 13 and later there is no distribution package, so people get Packer from HashiCorp's
apt repository, a release binary, or a binary of their own named by PACKER; a Packer that is too
old for `required_plugins` (before 1.7, as Debian 12's 1.6.6) builds with the older form of the
templates. ORIGIN_SNIPPET reports the binary's path, whether PACKER named it, the link it may be,
and which package owns it (dpkg or rpm, with the package's maintainer or vendor);
`parse_origin` reads that and `ToolOrigin.describe` says it in one line.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.base.run import TOOL_VARIABLES, locate
from pipeline.host import Runner
from pipeline.render.packer import supports_plugins

# $1: the binary to judge (empty: PACKER, else `command -v packer`, as on a builder); $2: how it
# was found ("variable" or "path"). A constant: the paths come in as arguments, never interpolated.
ORIGIN_SNIPPET = r"""
p=${1:-} via=${2:-}
if [ -z "$p" ]; then
  if [ -n "${PACKER:-}" ]; then p=$PACKER via=variable
  else p=$(command -v packer 2>/dev/null) || { echo "via=none"; exit 0; }; via=path
  fi
fi
printf 'via=%s\npath=%s\n' "$via" "$p"
[ -f "$p" ] && [ -x "$p" ] || { echo "state=not-executable"; exit 0; }
real=$(readlink -f -- "$p" 2>/dev/null) || real=$p
printf 'real=%s\n' "$real"
[ -L "$p" ] && printf 'link=%s\n' "$(readlink -- "$p")"
[ -f "$(dirname -- "$p")/../pyvenv.cfg" ] && echo "venv=yes"
if command -v dpkg-query >/dev/null 2>&1; then
  owner=$(dpkg-query -S -- "$real" 2>/dev/null || dpkg-query -S -- "${real#/usr}" 2>/dev/null)
  pkg=$(printf '%s\n' "$owner" | sed -n '1s/: .*//p')
  [ -n "$pkg" ] && dpkg-query -W -f='package=${Package}\npackage_version=${Version}\nmaker=${Maintainer}\n' -- "$pkg" 2>/dev/null
fi
if command -v rpm >/dev/null 2>&1 && rpm -qf -- "$real" >/dev/null 2>&1; then
  rpm -qf --qf 'package=%{NAME}\npackage_version=%{VERSION}-%{RELEASE}\nmaker=%{VENDOR}\n' -- "$real"
fi
exit 0
"""

@dataclass(frozen=True)
class ToolOrigin:
    """Where one tool's binary came from (all None: the tool is missing)."""

    kind: str                     # variable, setup-link, hashicorp, distribution, nix, homebrew, unpackaged, missing
    path: str | None = None       # the binary that runs
    real: str | None = None       # with links resolved
    package: str | None = None    # the package that owns it, with its version
    maker: str | None = None      # the package's maintainer (dpkg) or vendor (rpm)

    def describe(self) -> str:
        """One line for people: where it came from."""
        owned = f"package {self.package}" if self.package else ""
        if self.kind == "missing":
            return "not installed"
        if self.kind == "variable":
            return f"PACKER={self.path}" + (f" ({owned})" if owned else "")
        if self.kind == "setup-link":
            return (f"{self.path}, a link that setup.sh made to {self.real} (given in PACKER)"
                    + (f"; {owned}" if owned else ""))
        if self.kind == "hashicorp":
            return f"HashiCorp's package repository ({owned}, {self.path})"
        if self.kind == "distribution":
            return f"the distribution's package ({owned}, {self.path})"
        if self.kind in ("nix", "homebrew"):
            return f"{'Nix' if self.kind == 'nix' else 'Homebrew'} ({self.real})"
        return f"{self.path} on PATH, owned by no package: a release binary or one built by hand"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def parse_origin(out: str) -> ToolOrigin:
    """ORIGIN_SNIPPET's `key=value` lines → ToolOrigin (pure)."""
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in fields:
            fields[key.strip()] = value.strip()
    via, path = fields.get("via", "none"), fields.get("path")
    if via == "none" or not path or fields.get("state") == "not-executable":
        return ToolOrigin("missing", path)
    real = fields.get("real", path)
    package = f"{fields['package']} {fields.get('package_version', '')}".strip() if fields.get("package") else None
    maker = fields.get("maker") or None
    if via == "variable":
        kind = "variable"
    elif "link" in fields and fields.get("venv") == "yes":
        kind = "setup-link"
    elif package and maker and "hashicorp" in maker.lower():
        kind = "hashicorp"
    elif package:
        kind = "distribution"
    elif real.startswith("/nix/store/"):
        kind = "nix"
    elif "/Cellar/" in real or real.startswith("/opt/homebrew/"):
        kind = "homebrew"
    else:
        kind = "unpackaged"
    return ToolOrigin(kind, path, real, package, maker)


def probe_packer(runner: Runner, *, local: bool = True) -> ToolOrigin:
    """Where this host's packer came from: locally the binary imagepipe would run (PACKER, PATH,
    then .venv/bin); on a builder (`local=False`) its PACKER or the packer on its PATH."""
    args: tuple[str, ...] = ("sh", "-c", ORIGIN_SNIPPET, "origin")
    if local:
        path = locate("packer")
        if path is None and not os.environ.get(TOOL_VARIABLES["packer"]):
            return ToolOrigin("missing")
        via = "variable" if os.environ.get(TOOL_VARIABLES["packer"]) else "path"
        args += (path or os.environ[TOOL_VARIABLES["packer"]], via)
    res = runner(args)
    return parse_origin(res.stdout) if res.ok else ToolOrigin("missing")


def plugins_note(version: tuple[int, ...] | None) -> str:
    """Whether a packer of `version` knows `required_plugins` and `packer init` (1.7 and later)."""
    if version is None:
        return "its version is unknown: cannot tell whether it knows required_plugins / packer init (1.7+)"
    shown = ".".join(map(str, version))
    if supports_plugins(version):
        return f"{shown} is new enough for required_plugins and `packer init` (1.7+)"
    return (f"{shown} predates required_plugins and `packer init` (1.7): imagepipe renders the templates'"
            " Packer < 1.7 form for it (its qemu builder is built in)")
