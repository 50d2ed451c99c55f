"""rsync command lines (pure) and its `--stats` report parsed into numbers.

Both directions go over OpenSSH with the same ssh_config Fabric reads, so an alias, its
HostName/User/Port/IdentityFile/ProxyJump and its known_hosts apply to rsync too. The `-e`
value is the one place a shell-like string is unavoidable: it is `shlex.join` of an argv list.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.numbers import int_or_none

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
              excludes: Iterable[str] = SYNC_EXCLUDES) -> list[str]:
    """Mirror the directory `src` into `host:dest` (deleting what is gone here, keeping excludes
    and the builder's own flake.lock files)."""
    return [
        "rsync", "--recursive", "--links", "--perms", "--times", "--delete", "--stats",
        "--protect-args", "-e", shlex.join(ssh_argv(ssh_config)),
        *(f"--exclude={e}" for e in excludes),
        *(f"--filter=P {p}" for p in SYNC_PROTECT),
        f"{src}/", f"{host}:{dest}/",
    ]


def pull_argv(host: str, sources: Sequence[str], dest: Path, ssh_config: Path | None, *,
              resume: bool = True, ssh_extra: Sequence[str] = ()) -> list[str]:
    """Copy remote files into the folder `dest`, writing each file front to back in place.

    --inplace writes straight into the destination file, so whatever arrived before an
    interruption (even SIGKILL or a dropped link) stays. Fresh (`resume=False`) files come
    --whole-file; with `resume`, --append-verify sends only the rest and checks the whole
    file's checksum, re-sending what differs in a second pass (seen as extra data in --stats).
    Either way rsync writes each file sequentially and never seeks over data it skips, which
    lets pipeline.builders.follow hash the bytes as they land. No --sparse for that reason (a seeked-
    over run of zeros would only show up at the end); the follower punches the holes instead.
    """
    mode = ["--append-verify"] if resume else ["--whole-file"]
    return [
        "rsync", "--times", "--stats", "--protect-args", "--inplace", *mode,
        "-e", shlex.join(ssh_argv(ssh_config, ssh_extra)),
        *(f"{host}:{s}" for s in sources),
        f"{dest}/",
    ]


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
