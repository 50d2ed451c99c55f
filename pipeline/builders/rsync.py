"""rsync command lines (pure), its `--stats` and itemized output parsed, what an rsync can do
(its `--version`: the check that the local rsync can run our transfers, and which compressors
both ends have).

Both directions go over OpenSSH with the same ssh_config Fabric reads, so an alias, its
HostName/User/Port/IdentityFile/ProxyJump and its known_hosts apply to rsync too. The `-e`
value is the one place a shell-like string is unavoidable: it is `shlex.join` of an argv list.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.errors import ImagepipeError, ToolMissing
from pipeline.base.numbers import int_or_none
from pipeline.base.run import package_manager, run

# The file that makes a builder dir imagepipe's (remote.claim_dir); excluded, so --delete keeps it.
BUILDER_MARKER = ".imagepipe-builder"
# What never goes to a builder: outputs, VCS data, virtualenvs and caches. ("/.git" without a
# slash: in a git worktree .git is a file; ".venv" and "/venv" without one: a virtualenv here may
# be a symbolic link, which must neither be sent nor make --delete touch the builder's own venv.)
SYNC_EXCLUDES: tuple[str, ...] = (
    "/output/", "/.git", ".venv", "/venv", "__pycache__/", "*.pyc", "*.egg-info/",
    ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".cache/", "/build/", "/result",
    f"/{BUILDER_MARKER}",
)

# What `--delete` must never remove on a builder although it is missing here: a flake.lock the
# builder's nix wrote (nixos/flake.lock before it is committed). One that exists here is still
# sent and replaces the builder's, so both sides evaluate the same nixpkgs.
SYNC_PROTECT: tuple[str, ...] = ("flake.lock",)


def ssh_argv(ssh_config: Path | None, extra: Sequence[str] = ()) -> list[str]:
    """The ssh command rsync uses: our ssh_config (if any), never a prompt, never an unknown key.

    `extra` are further `-o` options (e.g. the ControlPath of an open connection to reuse).
    """
    argv = ["ssh"]
    if ssh_config is not None:
        argv += ["-F", str(ssh_config)]
    # BatchMode: fail instead of prompting (we run unattended and in threads).
    # StrictHostKeyChecking=yes: the key was checked (or explicitly accepted) before rsync runs.
    return argv + ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", *extra]


def push_argv(src: Path, host: str, dest: str, ssh_config: Path | None,
              excludes: Iterable[str] = SYNC_EXCLUDES, compress: Sequence[str] = ()) -> list[str]:
    """Mirror the directory `src` into `host:dest` (deleting what is gone here, keeping excludes
    and the builder's own flake.lock files): a delta against what the builder holds, compressed
    with `compress` (pipeline.builders.wire)."""
    return [
        "rsync", "--recursive", "--links", "--perms", "--times", "--delete", "--stats",
        "--protect-args", *compress, "-e", shlex.join(ssh_argv(ssh_config)),
        *(f"--exclude={e}" for e in excludes),
        *(f"--filter=P {p}" for p in SYNC_PROTECT),
        f"{src}/", f"{host}:{dest}/",
    ]


# One line per file rsync handled: its itemized change code and name (parse_itemized).
ITEMIZE = "--out-format=imagepipe-item %i %n"


def pull_argv(host: str, sources: Sequence[str], dest: Path, ssh_config: Path | None, *,
              resume: bool = True, ssh_extra: Sequence[str] = (), basis: Path | None = None,
              compress: Sequence[str] = ()) -> list[str]:
    """Copy remote files into the folder `dest`, writing each file front to back in place.

    --inplace writes straight into the destination file, so whatever arrived before an
    interruption (even SIGKILL or a dropped link) stays. Three modes:
    - fresh (`resume=False`, no basis): --whole-file, the file's bytes as they are;
    - `resume`: --append-verify sends only the rest and checks the whole file's checksum,
      re-sending what differs in a second pass (seen as extra data in --stats);
    - `basis`, a folder holding older files of the same names (the previous build): rsync's
      delta transfer against them (--copy-dest: only what they lack crosses the link; a file
      equal by size and time is copied from there).
    Each mode writes a file sequentially and never seeks over data it skips, which lets
    pipeline.builders.follow hash the bytes as they land. No --sparse for that reason (a seeked-
    over run of zeros would only show up at the end); the follower punches the holes instead.
    `compress`: rsync's compression options (pipeline.builders.wire). Every file handled is
    itemized on its own line (parse_itemized).
    """
    if basis is not None:
        # --ignore-times: a new build is never the old one, whatever size and time say; without
        # it an equal size and time made rsync copy the basis as it was, the check failed, and
        # the clean re-transfer sent the whole image
        mode = ["--no-whole-file", "--ignore-times", f"--copy-dest={basis}"]
    else:
        mode = ["--append-verify"] if resume else ["--whole-file"]
    return [
        "rsync", "--times", "--stats", ITEMIZE, "--protect-args", "--inplace", *mode, *compress,
        "-e", shlex.join(ssh_argv(ssh_config, ssh_extra)),
        *(f"{host}:{s}" for s in sources),
        f"{dest}/",
    ]


def parse_itemized(output: str) -> dict[str, str]:
    """The ITEMIZE lines of rsync's output → {file name: its change code, e.g. '>f+++++++++'}.
    '>f' received (written here, front to back), 'cf' copied from a --copy-dest folder, '.f' left
    as it was."""
    out = {}
    for line in output.splitlines():
        if line.startswith("imagepipe-item "):
            _, code, name = line.split(" ", 2)
            out[name] = code
    return out


@dataclass(frozen=True)
class Stats:
    """The numbers of one rsync run that say how much work it did."""

    files: int = 0               # regular files in the transfer set
    transferred: int = 0         # regular files that were (re)sent
    total_size: int = 0          # bytes of all files
    literal: int = 0             # file data actually sent (not matched from the other side)
    matched: int = 0             # file data the receiver found in its basis file (not sent)
    sent: int = 0                # bytes on the wire, sender side
    received: int = 0            # bytes on the wire, receiver side

    @property
    def wire(self) -> int:
        return self.sent + self.received


_STAT_KEYS = {
    "Number of files": "files",
    "Number of regular files transferred": "transferred",
    "Total file size": "total_size",
    "Literal data": "literal",
    "Matched data": "matched",
    "Total bytes sent": "sent",
    "Total bytes received": "received",
}
_STAT_RE = re.compile(r"^\s*([A-Za-z ]+?):\s+([0-9,.]+)")


def parse_stats(output: str) -> Stats:
    """`rsync --stats` output → Stats (thousands separators and locales with '.' allowed)."""
    values: dict[str, int] = {}
    for line in output.splitlines():
        m = _STAT_RE.match(line)
        if m and m.group(1) in _STAT_KEYS:
            number = int_or_none(re.sub(r"[,.]", "", m.group(2)))
            if number is not None:
                values[_STAT_KEYS[m.group(1)]] = number
    return Stats(**values)


# --------------------------------------------------------------------------------- the local rsync

# The oldest rsync that has every flag imagepipe passes: --protect-args (3.0.0; rsync 3.2.4+ calls
# it --secluded-args and still takes the old name) and --append-verify, --inplace, --stats, -e.
MIN_VERSION = (3, 1, 0)
_VERSION_RE = re.compile(r"^rsync\s+version\s+v?(\d+)\.(\d+)(?:\.(\d+))?\S*\s+protocol version (\d+)", re.M)
_OPENRSYNC_RE = re.compile(r"^openrsync:?\s+protocol version (\d+)", re.M)


# rsync's compressors, best first (its own order of preference, 3.2 and later)
COMPRESSORS: tuple[str, ...] = ("zstd", "lz4", "zlibx", "zlib")


@dataclass(frozen=True)
class RsyncVersion:
    """What `rsync --version` says: which rsync, its version, its protocol, its compressors."""

    flavor: str                        # "rsync" (Samba's), "openrsync", or "unknown"
    version: tuple[int, ...] = ()
    protocol: int | None = None
    compress: tuple[str, ...] = ()     # its "Compress list" (3.2+); ("zlib",) before (-z); () else

    @property
    def text(self) -> str:
        number = ".".join(map(str, self.version)) if self.version else "unknown version"
        return f"{self.flavor} {number}" if self.flavor != "rsync" else f"rsync {number}"

    @property
    def named(self) -> bool:
        """It takes --compress-choice (rsync 3.2 and later list their compressors)."""
        return self.flavor == "rsync" and self.version >= (3, 2)

    def common(self, other: RsyncVersion) -> tuple[str, ...]:
        """The compressors both ends have, best first (--compress-choice needs both to have it)."""
        return tuple(c for c in COMPRESSORS if c in self.compress and c in other.compress)


def parse_version(output: str) -> RsyncVersion:
    """`rsync --version` output → RsyncVersion. openrsync (macOS 15 and later) names itself on
    its first line and then claims "rsync version 2.6.9 compatible"; Samba's rsync prints
    "rsync  version 3.2.7  protocol version 32"."""
    found = _OPENRSYNC_RE.search(output)
    if found:
        return RsyncVersion("openrsync", (), int(found.group(1)))
    found = _VERSION_RE.search(output)
    if found:
        major, minor, patch, protocol = found.groups()
        listed = re.search(r"^Compress list:\s*\n((?:[ \t]+\S.*\n?)+)", output, re.M)
        # rsync before 3.2 lists none but has zlib (-z)
        compress = tuple(c for c in listed.group(1).split() if c in COMPRESSORS) if listed else ("zlib",)
        return RsyncVersion("rsync", (int(major), int(minor), int(patch or 0)), int(protocol), compress)
    return RsyncVersion("unknown")


def version_problem(found: RsyncVersion) -> str | None:
    """Why this rsync cannot run imagepipe's transfers (None: it can)."""
    lacks = "it lacks --protect-args and --append-verify, which every sync and fetch passes"
    if found.flavor == "openrsync":
        return f"the rsync on PATH is openrsync (macOS's /usr/bin/rsync): {lacks}"
    if found.flavor != "rsync":
        return "the rsync on PATH does not say which version it is (`rsync --version`)"
    if found.version < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        return f"the rsync on PATH is {found.text} (macOS before 15 ships 2.6.9): {lacks}; imagepipe needs {need} or later"
    return None


def upgrade_hint(manager: str | None) -> str:
    """How to get a current rsync first on PATH, for this host's package manager."""
    return {
        "brew": "brew install rsync (Homebrew's rsync 3 then comes before /usr/bin/rsync on PATH), "
                "or run imagepipe inside `nix develop`",
        "nix": "nix profile install nixpkgs#rsync, or run imagepipe inside `nix develop`",
        "apt": "sudo apt-get install rsync",
        "dnf": "sudo dnf install rsync",
    }.get(manager or "", "install rsync 3.1 or later first on PATH (Homebrew: brew install rsync; "
                          "Nix: nix develop)")


def compress_args(choice: str | None, level: int | None = None, *, named: bool = True) -> list[str]:
    """rsync's options for compressor `choice` (None: none). `named`: both ends know
    --compress-choice (rsync 3.2+); else plain -z, which is zlib there."""
    if not choice:
        return []
    pick = [f"--compress-choice={choice}"] if named else []
    return ["--compress", *pick, *([f"--compress-level={level}"] if level is not None else [])]


@functools.cache
def local_version() -> RsyncVersion:
    """The local rsync's version (asked once per process)."""
    res = run(["rsync", "--version"], check=False, timeout=30)
    return parse_version(res.stdout) if res.ok else RsyncVersion("unknown")


def require_capable() -> RsyncVersion:
    """The local rsync, or ToolMissing naming what it lacks and how to get a current one (before
    anything connects or builds: a --builder build would otherwise fail only at the copy back)."""
    try:
        found = local_version()
    except ImagepipeError as exc:  # not on PATH at all
        raise ToolMissing(exc.message, upgrade_hint(package_manager())) from None
    problem = version_problem(found)
    if problem:
        raise ToolMissing(problem, upgrade_hint(package_manager()))
    return found
