"""Atomic file writes: a reader (or a crash) never sees half a file.

Every write goes to a temp file in the target's own folder (so the rename stays on one file
system), is flushed and fsynced, gets its mode, and then replaces the target with one
`os.replace`. If anything fails on the way the temp file is removed and the old file is left as
it was. A symlink at the target is replaced by the new file, never written through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DEFAULT_MODE = 0o644


@contextlib.contextmanager
def _replacing(path: Path, mode: int) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the block ends without an exception."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes, *, mode: int = DEFAULT_MODE, encoding: str = "utf-8") -> None:
    """Replace `path` with `data` (text is encoded with `encoding`) in one atomic step."""
    with _replacing(path, mode) as out:
        out.write(data.encode(encoding) if isinstance(data, str) else data)


def atomic_copy(src: Path, dest: Path, *, mode: int = DEFAULT_MODE) -> None:
    """Replace `dest` with a copy of `src` in one atomic step (streamed: firmware files are large)."""
    with open(src, "rb") as source, _replacing(dest, mode) as out:
        shutil.copyfileobj(source, out)
