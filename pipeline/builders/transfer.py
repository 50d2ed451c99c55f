"""One rsync from a builder into a staging folder: compressed per link, delta against the
previous build, resumable, and hashed as the bytes land.

- **Compression**: the caller's `Wire` (pipeline.builders.wire), chosen per link.
- **Basis**: `basis`, a folder holding the previous build's files under the same names. rsync's
  delta transfer then sends only what they lack (a rebuilt image with a package added moves a
  tenth of its bytes), writing each new file front to back as a fresh transfer does.
- **Resume**: what an interrupted transfer left stays in `stage` (--inplace). Without a basis the
  next run appends the rest (--append-verify). With one, the kept part and the previous build
  both serve: the kept part, followed by the previous build's file, becomes the basis (written
  beside it, holes kept as holes), so neither what already arrived nor what the previous build
  holds crosses the link again.
- **Hashing while receiving**: a follower per file (pipeline.builders.follow) hashes what rsync
  writes. Its digest counts only when rsync's itemized output and --stats show each file written
  once, front to back (`one_pass`); the caller reads any other file again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.base import digest
from pipeline.base.errors import CommandFailed
from pipeline.base.fsutil import ensure_dir
from pipeline.base.run import stream
from pipeline.builders import follow, rsync
from pipeline.builders.remote import Target, main_thread_timeout
from pipeline.builders.wire import Wire

BASIS = ".basis"   # inside the staging folder: the composite basis of a resumed delta transfer


@dataclass(frozen=True)
class Received:
    """One rsync run: its stats, and each file's digest where it covers the final file."""

    stats: rsync.Stats
    digests: dict[str, str]       # file name → hex digest (the followers' algorithm)
    items: dict[str, str]         # file name → rsync's itemized change code


def pull(target: Target, sources: Sequence[str], stage: Path, *, wire: Wire, basis: Path | None = None,
         resume: bool = True, ssh_extra: Sequence[str] = (), algorithm: str | None = digest.SHA256,
         hint: str | None = None) -> Received:
    """rsync `sources` (paths on the builder) into `stage` while hashing them with `algorithm`
    (None: not at all; see the module docstring). `resume`: keep and build on what `stage`
    holds; else it is replaced."""
    names = [PurePosixPath(s).name for s in sources]
    kept = {n: _size(stage / n) for n in names}
    resuming = resume and any(kept.values())
    with _basis_for(stage, basis, kept if resuming else {}) as use:
        if use is not None and use != basis:  # the kept parts live on in the composite basis
            kept = dict.fromkeys(names, 0)
        argv = rsync.pull_argv(target.host, sources, stage, target.ssh_config, resume=resuming and use is None,
                               ssh_extra=ssh_extra, basis=use, compress=wire.rsync_args())
        followers = {n: follow.Follower(stage / n, algorithm=algorithm).start() for n in names} if algorithm else {}
        try:
            res = stream(argv, timeout=main_thread_timeout(6 * 3600), hint=hint)
        except BaseException as exc:
            for f in followers.values():
                f.finish(cancel=True)
            if isinstance(exc, CommandFailed):
                exc.hint = "the partial transfer is kept: run the same fetch again to resume"
            raise
    stats = rsync.parse_stats(res.stdout)
    items = rsync.parse_itemized(res.stdout)
    seen = {n: f.finish() for n, f in followers.items()}
    written = [n for n in names if items.get(n, "").startswith(">f")]
    digests = {}
    if one_pass(stats, {n: kept[n] for n in written}, {n: _size(stage / n) for n in written}):
        digests = {n: d.digest for n, d in seen.items() if d is not None and d.covers(stage / n)}
    return Received(stats, digests, items)


def one_pass(stats: rsync.Stats, kept: Mapping[str, int], final: Mapping[str, int]) -> bool:
    """True when rsync wrote the files it received (`final`: their sizes now; `kept`: what they
    held before) exactly once, front to back.

    In our modes (whole-file, append, or a delta against another file) a single pass writes
    exactly the bytes each received file grew by, as literal data plus data matched in a basis;
    a second pass over a file whose checksum failed (rsync's "redo") writes more, and may
    rewrite bytes a follower has already hashed.
    """
    grown = sum(final[n] - kept.get(n, 0) for n in final)
    return stats.literal + stats.matched == grown


@contextlib.contextmanager
def _basis_for(stage: Path, basis: Path | None, kept: Mapping[str, int]) -> Iterator[Path | None]:
    """The basis folder for this run: `basis` itself, or (resuming with kept parts) a composite
    of each kept part followed by the basis' file, in stage/.basis, removed afterwards. If the
    transfer ends before it got past a kept part again, that part is put back."""
    partial = {n: size for n, size in kept.items() if size}
    if basis is None or not partial:
        yield basis
        return
    folder = stage / BASIS
    shutil.rmtree(folder, ignore_errors=True)
    ensure_dir(folder, stage)
    for name, size in partial.items():
        os.replace(stage / name, folder / name)  # the kept bytes, now the head of the basis
        older = basis / name
        if older.is_file() and not older.is_symlink():
            with open(older, "rb") as src, open(folder / name, "r+b") as dest:
                copy_sparse(src.fileno(), dest.fileno(), size)
    try:
        yield folder
    finally:
        for name, size in partial.items():
            if _size(stage / name) < size:  # got less far than before: the old part is worth more
                with open(folder / name, "r+b") as f:
                    f.truncate(size)
                os.replace(folder / name, stage / name)
        shutil.rmtree(folder, ignore_errors=True)


def copy_sparse(src: int, dest: int, at: int) -> None:
    """Copy all of file `src` into `dest` from offset `at`, leaving src's holes as holes
    (SEEK_DATA/SEEK_HOLE; copy_file_range where the kernel has it, read and write elsewhere)."""
    end = os.fstat(src).st_size
    os.ftruncate(dest, at + end)
    pos = 0
    while pos < end:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but holes after pos
                return
            start, stop = pos, end        # no hole support here: all of it is data
        else:
            stop = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dest, start, stop, at)
        pos = stop


def _copy_range(src: int, dest: int, start: int, stop: int, at: int) -> None:
    while start < stop:
        n = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                n = os.copy_file_range(src, dest, min(stop - start, 1 << 30), start, at + start)
        if n <= 0:
            data = os.pread(src, min(stop - start, 4 << 20), start)
            if not data:
                return
            n = os.pwrite(dest, data, at + start)
        start += n


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
