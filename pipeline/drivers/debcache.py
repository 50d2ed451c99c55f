"""The cache of downloaded Debian packages, by their sha256, shared by every build on the machine.

mmdebstrap fills the root's /var/cache/apt/archives/ from it before it downloads (a setup hook's
`sync-in`) and hands back what apt fetched (a customize hook's `sync-out`); apt checks every
cached .deb against the sha256 the mirror's index gives before it uses one, so a rebuild of
unchanged packages downloads nothing. Layout (under $XDG_CACHE_HOME/imagepipe/debs, or
IMAGEPIPE_DEB_CACHE):

    by-sha256/<sha256>.deb      the packages, named by their content
    names/<file name>           the sha256 of the package apt knows by that name
                                (name_version_arch.deb; its mtime: when a build last used it)

It lives outside any checkout, so fresh clones and other worktrees share it. Entries are written
with a temporary name and renamed (two builds filling it at once cannot tear a file), and a
package unused for PRUNE_DAYS is dropped. Nothing is ever read or written through a link.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.fsutil import atomic_write, ensure_dir, link_or_copy

PRUNE_DAYS = 30
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~%_-]*\.deb$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def cache_dir() -> Path:
    """The cache's folder (not created here)."""
    own = os.environ.get("IMAGEPIPE_DEB_CACHE")
    if own:
        return Path(own).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imagepipe" / "debs"


def _entries(cache: Path) -> dict[str, str]:
    """file name -> sha256 of every complete entry."""
    names = cache / "names"
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(names):
            if not entry.is_file(follow_symlinks=False) or not NAME_RE.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                sha = Path(entry.path).read_text(encoding="ascii").strip()
                if SHA_RE.fullmatch(sha) and (cache / "by-sha256" / f"{sha}.deb").is_file():
                    out[entry.name] = sha
    return out


def count(cache: Path) -> int:
    """How many packages the cache holds."""
    return len(_entries(cache))


def fill(cache: Path, dest: Path) -> int:
    """Put every cached package into the empty folder `dest` under the name apt looks for
    (hard links where possible); returns how many."""
    entries = _entries(cache)
    for name, sha in entries.items():
        link_or_copy(cache / "by-sha256" / f"{sha}.deb", dest / name)
    return len(entries)


@dataclass(frozen=True)
class Absorbed:
    added: int      # packages new to the cache
    added_bytes: int
    used: int       # packages of this build already cached (apt did not download them)


def absorb(cache: Path, source: Path, used: set[str] | None = None) -> Absorbed:
    """Take the packages of a finished build (`source`: its archives folder) into the cache; mark
    those it used as used now; drop what no build used for PRUNE_DAYS. `used`: the names
    the build needed (default: everything in `source`)."""
    known = _entries(cache)
    ensure_dir(cache / "by-sha256", cache.parent)
    ensure_dir(cache / "names", cache.parent)
    added = added_bytes = reused = 0
    now = time.time()
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if not entry.is_file(follow_symlinks=False) or not NAME_RE.fullmatch(entry.name):
            continue
        if used is not None and entry.name not in used:
            continue
        if entry.name in known:  # a Debian archive never gives one name_version_arch two contents
            reused += 1
            with contextlib.suppress(OSError):
                os.utime(cache / "names" / entry.name, (now, now))
            continue
        sha = _sha256(Path(entry.path))
        blob = cache / "by-sha256" / f"{sha}.deb"
        if not blob.is_file():
            tmp = blob.with_name(f".{blob.name}.{os.getpid()}.tmp")
            shutil.copyfile(entry.path, tmp)
            os.replace(tmp, blob)
            added_bytes += entry.stat(follow_symlinks=False).st_size
        atomic_write(cache / "names" / entry.name, sha + "\n", mode=0o644)
        added += 1
    prune(cache, now - PRUNE_DAYS * 86400)
    return Absorbed(added, added_bytes, reused)


def prune(cache: Path, before: float) -> int:
    """Drop the names last used before `before` and the packages no name holds; returns how many."""
    dropped = 0
    names = cache / "names"
    with contextlib.suppress(OSError):
        for entry in os.scandir(names):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < before:
                os.unlink(entry.path)
                dropped += 1
    held = set(_entries(cache).values())
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache / "by-sha256"):
            stem = entry.name.removesuffix(".deb")
            if entry.is_file(follow_symlinks=False) and SHA_RE.fullmatch(stem) and stem not in held:
                os.unlink(entry.path)
    return dropped


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
