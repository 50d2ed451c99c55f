"""Safe file system work: atomic writes, and deleting or linking only what is imagepipe's own.

Atomic writes: every write goes to a temp file in the target's own folder (so the rename stays
on one file system), is flushed and fsynced, gets its mode, and then replaces the target with
one `os.replace`. If anything fails on the way the temp file is removed and the old file is left
as it was. A symlink at the target is replaced by the new file, never written through.

Ownership: before imagepipe deletes, replaces or writes into anything under its output folder
it checks with lstat that the thing is what imagepipe makes there (a real folder, a real file,
a link) and that it resolves inside the folder it belongs to (`output/<image>/`). A symlink
someone planted (`.staging -> /home/me`, `builds -> /`, `.lock -> /etc/passwd`) is refused with
`UnsafePath`, never followed. A disk that is full or read-only gives `StorageError` with the
path and the free space (`storage_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.base.errors import StorageError, UnsafePath

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


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace `path` with `text` (same folder temp file + rename); False if unchanged."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return True


def atomic_copy(src: Path, dest: Path, *, mode: int = DEFAULT_MODE) -> None:
    """Replace `dest` with a copy of `src` in one atomic step (streamed: firmware files are large)."""
    with open(src, "rb") as source, _replacing(dest, mode) as out:
        shutil.copyfileobj(source, out)


def link_or_copy(src: Path, dest: Path) -> None:
    """Make `dest` (a new name) hold `src`'s bytes: a hard link where the file system allows it
    (no bytes copied), else a copy. Only for a `src` that is never written in place afterwards
    (imagepipe's own caches, which are replaced by rename), since both names share the file."""
    try:
        os.link(src, dest, follow_symlinks=False)
        if not stat.S_ISREG(os.lstat(dest).st_mode):  # a link to a symlink: copy the bytes instead
            os.unlink(dest)
            raise OSError(errno.EINVAL, "not a regular file", str(src))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise
        shutil.copyfile(src, dest)


# --------------------------------------------------------------------------------- ownership


def _real(path: Path) -> str:
    return os.path.realpath(os.fspath(path))


def resolves_inside(path: Path, root: Path) -> bool:
    """True when `path` (links followed) is `root` or lies below it (links followed too)."""
    real, top = _real(path), _real(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return "special file"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _refuse(path: Path, why: str, fix: str | None = None) -> UnsafePath:
    return UnsafePath(f"refusing to touch {path}: {why}",
                      fix or "imagepipe only deletes or writes what it made itself under its output "
                             "folder; move the entry away (or remove it yourself) and run again")


def check_dir(path: Path, inside: Path) -> None:
    """`path` (when it exists) is a real folder, not a link, and resolves inside `inside`; every
    folder between `inside` and `path` is a real folder too. Raises UnsafePath otherwise."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(inside)))
    if rel.parts[:1] == ("..",):
        raise _refuse(path, f"it is not inside {inside}")
    current = Path(inside)
    for part in rel.parts if rel != Path(".") else ():
        current = current / part
        st = _lstat(current)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(current, f"it is a {_kind(st.st_mode)}"
                                   + (f" pointing to {os.readlink(current)}" if stat.S_ISLNK(st.st_mode) else "")
                                   + ", where imagepipe keeps a folder of its own")
    if not resolves_inside(path, inside):
        raise _refuse(path, f"it resolves to {_real(path)}, outside {inside}")


def ensure_dir(path: Path, inside: Path, mode: int = 0o777) -> Path:
    """Create `path` (and missing parents) below `inside`, refusing links and foreign entries on
    the way (checked before and after, so a link planted meanwhile is caught too)."""
    check_dir(path, inside)
    Path(path).mkdir(parents=True, exist_ok=True, mode=mode)
    check_dir(path, inside)
    return Path(path)


def safe_rmtree(path: Path, inside: Path, *, ignore_errors: bool = False) -> bool:
    """Remove the folder (or file) `path`, which must lie inside `inside`, without following any
    link: a link at `path` is removed itself (its target is untouched); inside the folder,
    shutil.rmtree's fd-based walk unlinks links instead of descending into them. Returns True
    when something was removed. UnsafePath when `path` or a folder above it (up to `inside`) is a
    link or resolves elsewhere."""
    st = _lstat(path)
    if st is None:
        return False
    check_dir(Path(path).parent, inside)
    if os.path.abspath(path) == os.path.abspath(inside):
        raise _refuse(path, "it is the folder imagepipe was asked to keep")
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError:
        if not ignore_errors:
            raise
    return True


def replace_link(link: Path, target: str, *, inside: Path) -> None:
    """Point the symlink `link` at `target` in one atomic step. A link already there is replaced
    (whatever it points to: imagepipe owns the links it makes in its folders); a real file or
    folder there is someone else's and is refused with UnsafePath."""
    check_dir(Path(link).parent, inside)
    st = _lstat(link)
    if st is not None and not stat.S_ISLNK(st.st_mode):
        raise _refuse(link, f"a {_kind(st.st_mode)} is where imagepipe keeps a link",
                      f"move {link} away; imagepipe recreates the link on the next publish")
    tmp = Path(link).with_name(f".{Path(link).name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def flocked(path: Path, record: Mapping[str, Any], on_busy: Callable[[], None]) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (a regular file, created when missing, never opened
    through a link) for the duration: the kernel releases it on any exit, `kill -9` included.
    Held by another process: `on_busy()` first (say who holds it, or raise to give up), then wait
    for it. Once held, `record` is written into the file as JSON for whoever finds it busy next
    (`read_record`). Yields whether it had to wait (what was read before may be stale then)."""
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_busy()
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as exc:
            raise storage_error(exc, path) from None
        yield waited
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object a lock's holder wrote into `path` (`flocked`); {} for anything else
    (missing, unreadable, not an object): it only ever feeds a message."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace") or "{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses to follow a link at `path` (O_NOFOLLOW) and opens regular files only."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(Path(path), f"it is a symbolic link to {os.readlink(path)}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(Path(path), "it is not a regular file")
    return fd


# --------------------------------------------------------------------------------- disk errors

# errno → what the disk said, in words
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def existing_parent(path: Path) -> Path:
    """The nearest existing ancestor of `path` (itself when it exists)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = existing_parent(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_space(path: Path) -> str:
    """"12.3 MiB free on /mnt" for the file system holding `path` (named by its mount point)."""
    where = mount_point(path)
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return f"free space on {where} unknown"
    free = float(usage.free)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            amount = f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
            break
        free /= 1024
    return f"{amount} free on {where}"


def is_storage_error(exc: BaseException) -> bool:
    """True for an OSError that is about the disk (full, read-only, not writable)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def storage_error(exc: OSError, path: Path | str | None = None, doing: str = "writing") -> StorageError:
    """One clear line for a disk error: what, which path, how much is free."""
    why = STORAGE_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
    if not (path or exc.filename):  # the OS did not say which file: say what we know
        return StorageError(f"{doing} failed: {why}", "check the free space and permissions of defaults.output_dir, "
                                                 "and of the file the output goes to")
    where = Path(path or exc.filename)
    hint = {
        errno.ENOSPC: "free some space (invoke gc removes old builds) or point defaults.output_dir at a bigger disk",
        errno.EDQUOT: "free some space or raise your quota",
        errno.EROFS: "point defaults.output_dir at a writable folder",
    }.get(exc.errno or 0, f"check the permissions of {existing_parent(where)}")
    return StorageError(f"{doing} {where}: {why} ({free_space(where)})", hint)


def private_dir() -> Path:
    """A new 0700 folder for a unix socket ssh uses (short path: sun_path holds ~100 bytes; no '%',
    which ssh would expand)."""
    base = tempfile.gettempdir()
    if len(base) > 60 or "%" in base or any(ch.isspace() for ch in base):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="imagepipe-ssh-", dir=base))
