"""The hash of a file computed while another program writes it front to back (rsync --inplace).

A fetch used to hash the image after the transfer: a second full read, which on a CPU without
SHA instructions costs as much CPU as the transfer itself. A `Follower` thread instead reads
the file as it grows and hashes each byte once, from the page cache, while rsync is still busy,
with the hash the builder's manifest offers (BLAKE3, or sha256 from older builders:
pipeline.base.digest).

This is only sound for a writer that never goes back: bytes below the current end of the file
must be final. rsync in the modes pipeline.builders.rsync.pull_argv uses writes sequentially, except
when it re-sends a file whose whole-file checksum failed. So the digest is *trusted* only when
everything seen agrees with one front-to-back pass (`Followed.covers`, plus rsync's stats in
pipeline.fetch), and the caller reads the final file again whenever it is not.

Holes: rsync's --sparse would seek over runs of zeros, so the file would not grow through them
and a follower could hash them only after the transfer (for a mostly empty image: all of it,
afterwards). Instead rsync writes the zeros and the follower, having hashed them, gives every
aligned all-zero segment back to the filesystem (FALLOC_FL_PUNCH_HOLE, Linux): the file ends
up as sparse as --sparse would have made it, and the zeros are hashed while they arrive.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.base import digest

CHUNK = 4 << 20     # bytes per read; both hashes drop the GIL while they hash a buffer this large
SEG = 64 << 10      # hole granularity (a qcow2 cluster); reads stop at a segment boundary
POLL = 0.01         # seconds between looks at a file that has not grown
ZERO = bytes(SEG)


@dataclass(frozen=True)
class Followed:
    """What a follower read: the digest of `length` bytes of the file with identity `ident`."""

    digest: str                 # hex, of the follower's algorithm
    length: int
    ident: tuple[int, int]      # (st_dev, st_ino) of the file it read
    shrank: bool                # the file got shorter while being read: it was rewritten
    punched: int                # bytes of zeros given back to the filesystem as holes
    caught_up: int              # times it had read all there was before the writer finished

    def covers(self, path: Path) -> bool:
        """True when this digest was taken over exactly the bytes `path` holds now (same file,
        same length, never cut below what was read). Whether the writer made a single pass is
        for the caller to add (rsync's stats: pipeline.fetch.one_pass)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return not self.shrank and (st.st_dev, st.st_ino) == self.ident and st.st_size == self.length


class Follower:
    """Hash `path` as it is written (starting when it appears); `finish()` once the writer exited."""

    def __init__(self, path: Path, poll: float = POLL, punch: bool = True, algorithm: str = digest.SHA256) -> None:
        self.path = path
        self.algorithm = algorithm
        self.poll = poll
        self.holes = Holes() if punch else None
        self._writer_done = threading.Event()
        self._cancel = threading.Event()
        self._result: Followed | None = None
        self._thread = threading.Thread(target=self._run, name=f"follow {path.name}", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def finish(self, *, cancel: bool = False) -> Followed | None:
        """The writer has exited: read to the end and return the digest (None if the file never
        appeared or could not be read). `cancel` stops at once and returns None."""
        if cancel:
            self._cancel.set()
        self._writer_done.set()
        self._thread.join()
        return None if cancel else self._result

    def _run(self) -> None:
        fd = self._open()
        if fd is None:
            return
        try:
            self._result = self._follow(fd)
        except OSError:
            self._result = None
        finally:
            os.close(fd)

    def _open(self) -> int | None:
        """The file, once the writer has created it (None if it never does)."""
        while True:
            last = self._writer_done.is_set()  # checked before trying: a last try after the end
            try:
                return self._open_now()
            except FileNotFoundError:
                if last or self._cancel.is_set():
                    return None
            except OSError:
                return None
            self._writer_done.wait(self.poll)

    def _open_now(self) -> int:
        if self.holes:
            try:
                return os.open(self.path, os.O_RDWR)  # punching holes needs write access
            except PermissionError:
                self.holes = None  # read-only file: hash it, leave its zeros alone
        return os.open(self.path, os.O_RDONLY)

    def _follow(self, fd: int) -> Followed | None:
        st = os.fstat(fd)
        h = digest.new(self.algorithm)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pos, shrank, last_pass, caught_up = 0, False, False, 0
        while not self._cancel.is_set():
            size = os.fstat(fd).st_size
            if size < pos:
                shrank = True  # cut below what we read: rewritten from an earlier point
                break
            want = min(size - pos, CHUNK)
            if not self._writer_done.is_set():
                want -= (pos + want) % SEG  # while it grows, read whole segments only
            n = os.readv(fd, [view[:want]]) if want > 0 else 0  # our fd: its offset is pos
            if n:
                h.update(view[:n])
                if self.holes:
                    self.holes.scan(fd, buf, pos, n)
                pos += n
                continue
            if last_pass:  # nothing left after the writer exited: this is the end
                break
            if self._writer_done.is_set():
                last_pass = True  # it may have written more between our look and its exit
                continue
            caught_up += 1
            self._writer_done.wait(self.poll)
        if self._cancel.is_set():
            return None
        punched = self.holes.punched if self.holes else 0
        return Followed(h.hexdigest(), pos, (st.st_dev, st.st_ino), shrank, punched, caught_up)


class Holes:
    """Turns aligned all-zero segments the follower has hashed into holes (runs within a read
    coalesced)."""

    def __init__(self) -> None:
        self.run_start = -1       # offset of the pending zero run, -1 when none
        self.run_end = -1
        self.punched = 0
        self.fallocate = _fallocate()

    def scan(self, fd: int, buf: bytearray, pos: int, n: int) -> None:
        """Punch the all-zero segments of buf[:n], the file's bytes from `pos` (normally a segment
        boundary). Punched at once, not saved up: only what was just read is touched, which a
        single-pass writer has left behind for good (and a second pass makes the digest
        untrusted anyway, see pipeline.fetch)."""
        if self.fallocate is None:
            return
        for off in range(0, n - SEG + 1, SEG):
            if buf.startswith(ZERO, off, off + SEG):  # memcmp, no copy
                if self.run_end != pos + off:
                    self.flush(fd)
                    self.run_start = pos + off
                self.run_end = pos + off + SEG
            elif self.run_end > 0:
                self.flush(fd)
        self.flush(fd)

    def flush(self, fd: int) -> int:
        """Punch the pending run; returns the bytes punched so far."""
        if self.run_end > self.run_start >= 0 and self.fallocate is not None:
            length = self.run_end - self.run_start
            if self.fallocate(fd, PUNCH_HOLE | KEEP_SIZE, self.run_start, length) == 0:
                self.punched += length
            else:  # the filesystem cannot (EOPNOTSUPP): keep the zeros, stop trying
                self.fallocate = None
        self.run_start = self.run_end = -1
        return self.punched


PUNCH_HOLE, KEEP_SIZE = 0x02, 0x01  # linux/falloc.h


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None

    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn
