"""A stand-in for a full OS image where none is built: a qcow2 of an ext4 filesystem filled from
this machine's /usr (real binaries, libraries and text compress and delta like a real image's,
unlike a file of one repeated byte), and a "rebuild" of it with one more package's worth of files.

    standin(path, extra=False)   the image; extra=True adds /usr/lib/python3
                                 (about 45 MB: a package added) and rebuilds the filesystem

Both are made from scratch with `mke2fs -d` (as the Debian engine makes its root filesystem) and
`qemu-img convert`, so a rebuild moves blocks around the way a real rebuild does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BASE = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc", "/usr/share/locale")
EXTRA = ("/usr/lib/python3",)
LIMIT = 380 << 20          # bytes of file data taken from BASE (a Debian 13 root is about this)


def _files(roots: tuple[str, ...], limit: int | None) -> list[Path]:
    out, total = [], 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_symlink() or not path.is_file():
                    continue
                size = path.stat().st_size
                if limit is not None and total + size > limit:
                    return out
                out.append(path)
                total += size
    return out


def standin(path: Path, extra: bool = False, size: str = "3G") -> Path:
    """The stand-in image at `path` (qcow2); see the module docstring."""
    tree = Path(tempfile.mkdtemp(prefix="standin-", dir=path.parent))
    raw = path.with_suffix(".raw")
    try:
        files = _files(BASE, LIMIT) + (_files(EXTRA, None) if extra else [])
        for src in files:
            dest = tree / src.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(tree), str(raw), size],
                       check=True, timeout=600, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
                       stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True, timeout=600)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
        raw.unlink(missing_ok=True)
    return path
