"""Build history (SQLite, output/history.db) and per-image build locks.

History: one row per build, written when the build starts (status `running`) and updated when
it ends (`ok`, `failed`, `interrupted`). A build killed outright (kill -9, power loss) cannot
update its row; the next reader finds a `running` row whose process is gone (pid + process start
time recorded, so a reused pid does not fool it), marks it `abandoned` and stops what is left of
the tools it started (their process group is recorded with the boot it ran in).

A history.db that cannot be read (not a database, damaged pages, a foreign table) is moved aside
(history.db.unreadable-<time>, kept for a person to look at) and a fresh one is started, with a
warning; a full or read-only disk is a StorageError naming the path and the free space.

Locks: `fcntl.flock` on output/<image>/.lock (opened without following links). The kernel drops
a flock when its holder dies, even by kill -9, so a lock can never go stale; the file's content
(pid, build id) is only there to tell a waiting user who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self

from pipeline.base.errors import CorruptState, LockBusy, StorageError
from pipeline.base.fsutil import (
    check_dir,
    ensure_dir,
    flocked,
    free_space,
    open_nofollow,
    read_record,
)
from pipeline.base.numbers import decimal_or_none, int_or_none
from pipeline.base.procs import boot_id, is_alive, start_time, stop_group_leftovers
from pipeline.base.text import visible, visible_lines
from pipeline.output.artifacts import utc_stamp

DB_NAME = "history.db"
LOCK_NAME = ".lock"
STATUSES = ("running", "ok", "failed", "interrupted", "abandoned")

SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id          TEXT PRIMARY KEY,
    image       TEXT NOT NULL,
    location    TEXT NOT NULL,          -- local, or the builder host
    started     REAL NOT NULL,
    finished    REAL,
    status      TEXT NOT NULL,
    input_hash  TEXT,
    sha256      TEXT,
    size        INTEGER,
    log_path    TEXT,
    error       TEXT,
    pid         INTEGER,
    pid_start   TEXT,                   -- the process's start time, against pid reuse
    hostname    TEXT,
    removed     REAL                    -- when retention deleted the build's files
);
CREATE INDEX IF NOT EXISTS builds_image_started ON builds (image, started);
CREATE TABLE IF NOT EXISTS instance_events (
    at          REAL NOT NULL,
    instance    TEXT NOT NULL,
    image       TEXT,
    build_id    TEXT,
    event       TEXT NOT NULL,          -- created, started, stopped, idle-stop, rebased, removed
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS instance_events_at ON instance_events (instance, at);
"""
# Added after the first release: older databases get them with ALTER TABLE.
LATER_COLUMNS = {
    "tool_pgid": "INTEGER",    # the process group of the build's long-running tool (packer, nix)
    "tool_start": "TEXT",      # its leader's start time
    "boot_id": "TEXT",         # the boot the build ran in (pids mean nothing after a reboot)
}
# sqlite result codes (primary)
SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_NOTADB = 8, 10, 11, 14, 13, 26
UNREADABLE = {SQLITE_CORRUPT, SQLITE_NOTADB}


@dataclass(frozen=True)
class Event:
    """One thing that happened to an instance (pipeline.vm.instances)."""

    at: float
    instance: str
    image: str | None
    build_id: str | None
    event: str
    detail: str | None

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": utc_stamp(self.at)}


@dataclass(frozen=True)
class Build:
    """One row of the history."""

    id: str
    image: str
    location: str
    started: float
    finished: float | None
    status: str
    input_hash: str | None
    sha256: str | None
    size: int | None
    log_path: str | None
    error: str | None
    pid: int | None
    pid_start: str | None
    hostname: str | None
    removed: float | None
    tool_pgid: int | None = None
    tool_start: str | None = None
    boot_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The row with ISO timestamps (for --json)."""
        data = asdict(self)
        for key in ("started", "finished", "removed"):
            data[key] = utc_stamp(data[key]) if data[key] is not None else None
        data["duration_s"] = round(self.finished - self.started, 1) if self.finished else None
        return data


# --------------------------------------------------------------------------------- database


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _nearly_full(path: Path) -> bool:
    """sqlite reports a full disk while growing its shared-memory file as an I/O error."""
    try:
        return shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        return False


class _Unreadable(Exception):
    """The file is not a usable history database (the reason is the message)."""


class History:
    """The build history of one output folder.

    create=False (read-only commands): when there is no history.db yet, nothing is created; the
    object reads as an empty history. readonly=True (dry runs): not a byte is written, not even
    sqlite's -wal/-shm files (the file is read as it is on disk, without a build's changes that
    are still in its WAL).
    """

    def __init__(self, output_dir: Path, *, create: bool = True, readonly: bool = False,
                 say: Callable[[str], None] | None = None) -> None:
        self.path = Path(output_dir) / DB_NAME
        self.readonly = False
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            if (Path(output_dir) / name).is_symlink():
                raise CorruptState(f"{Path(output_dir) / name} is a symbolic link; imagepipe does not write through "
                                   "links it did not make", "move it away (or replace it with the file it points to)")
        if (readonly or not create) and not self.path.exists():
            self.db = self._connect(":memory:")
            return
        if readonly:
            self.db = self._open_readonly()
            return
        if create:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except _Unreadable as why:
            self._move_aside(str(why))
            self.db = self._open()
        except StorageError:
            if create:
                raise
            self.db = self._open_readonly()  # a read-only disk can still be read

    def _connect(self, target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.executescript(SCHEMA)
        self._migrate(db)
        return db

    def _open(self) -> sqlite3.Connection:
        """Connect, check the file is a sound history database, bring its table up to date."""
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise _Unreadable("sqlite's quick_check found damage")
            self._check_shape(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._migrate(db)
            return db
        except _Unreadable:
            if db is not None:
                db.close()
            raise
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.DatabaseError) and _code(exc) in UNREADABLE:
                raise _Unreadable(str(exc)) from None
            raise self._storage(exc) from None

    def _open_readonly(self) -> sqlite3.Connection:
        """The database as it is on a disk we cannot write (no WAL replay, nothing changed)."""
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
            db.row_factory = sqlite3.Row
            self._check_shape(db)
            db.execute("SELECT count(*) FROM builds").fetchone()
        except (sqlite3.Error, _Unreadable) as exc:
            raise CorruptState(f"{self.path} cannot be read: {visible(str(exc))}",
                               "check the disk and the file's permissions") from None
        self.readonly = True
        return db

    @staticmethod
    def _check_shape(db: sqlite3.Connection) -> None:
        """A `builds` table of another shape (someone else's database) is not ours to use."""
        have = {row[1] for row in db.execute("PRAGMA table_info(builds)")}
        missing = set(Build.__dataclass_fields__) - have - set(LATER_COLUMNS)
        if have and missing:
            raise _Unreadable(f"its builds table lacks {', '.join(sorted(missing))}")

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Add the columns of later versions."""
        have = {row[1] for row in db.execute("PRAGMA table_info(builds)")}
        for column, kind in LATER_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE builds ADD COLUMN {column} {kind}")

    def _move_aside(self, why: str) -> None:
        """Keep the unreadable file (and its WAL) under a dated name; a fresh history starts."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = self.path.with_name(f"{DB_NAME}.unreadable-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{kept}{suffix}")
        self.say(f"warning: {self.path} could not be read ({visible(why)}); it was moved to {kept.name} "
                 "and a new build history starts now")

    def _storage(self, exc: sqlite3.Error) -> Exception:
        """A sqlite error about the disk as a StorageError (path, free space), else CorruptState."""
        code = _code(exc)
        if code == SQLITE_FULL or (code == SQLITE_IOERR and _nearly_full(self.path)):
            return StorageError(f"writing {self.path}: the disk is full ({free_space(self.path)})",
                                "free some space (invoke gc removes old builds) or move defaults.output_dir")
        if code in (SQLITE_READONLY, SQLITE_CANTOPEN):
            return StorageError(f"cannot write {self.path}: {exc} ({free_space(self.path)})",
                                f"check that {self.path.parent} is writable (a read-only mount or its permissions)")
        return CorruptState(f"{self.path}: {visible(str(exc))}",
                            "if the file is damaged, move it away; a new history is started")

    def _sql(self, sql: str, args: Any = (), *, many: bool = False) -> list[sqlite3.Row]:
        """Run one statement; a damaged database found only now is moved aside and the statement
        retried once on a fresh one, disk errors become StorageError."""
        for attempt in (1, 2):
            try:
                cur = self.db.executemany(sql, args) if many else self.db.execute(sql, args)
                return cur.fetchall()
            except sqlite3.DatabaseError as exc:
                if _code(exc) not in UNREADABLE or attempt == 2:
                    raise self._storage(exc) from None
                self.db.close()
                self._move_aside(str(exc))
                self.db = self._open()
        return []

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, build_id: str, image: str, *, location: str = "local", input_hash: str | None = None,
              log_path: Path | None = None, started: float | None = None) -> None:
        """Record a build that is starting now, in this process."""
        pid = os.getpid()
        self._sql(
            "INSERT INTO builds (id, image, location, started, status, input_hash, log_path, pid, pid_start,"
            " hostname, boot_id) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (build_id, image, location, started or time.time(), input_hash,
             str(log_path) if log_path else None, pid, start_time(pid), socket.gethostname(), boot_id()),
        )

    def set_tool_group(self, build_id: str, pgid: int, leader_start: str | None) -> None:
        """The process group of the tool the build runs now (stopped by `reap` if the build dies)."""
        self._sql("UPDATE builds SET tool_pgid = ?, tool_start = ? WHERE id = ?", (pgid, leader_start, build_id))

    def finish(self, build_id: str, status: str, *, sha256: str | None = None, size: int | None = None,
               error: str | None = None) -> None:
        """Record how a build ended."""
        assert status in STATUSES and status != "running", status
        self._sql(
            "UPDATE builds SET finished = ?, status = ?, sha256 = ?, size = ?, error = ? WHERE id = ?",
            (time.time(), status, sha256, size, _summary(error), build_id),
        )

    def mark_removed(self, build_ids: list[str]) -> None:
        """Retention deleted these builds' files (the rows stay: history is the record)."""
        now = time.time()
        self._sql("UPDATE builds SET removed = ? WHERE id = ?", [(now, b) for b in build_ids], many=True)

    def reap(self, alive: Callable[[int | None, str | None], bool] = is_alive) -> list[str]:
        """Mark `running` rows of this host whose process is gone as `abandoned`, and stop what is
        left of their tools' process groups (same boot only); returns their ids."""
        if self.readonly:
            return []
        host, boot = socket.gethostname(), boot_id()
        rows = self._sql("SELECT * FROM builds WHERE status = 'running'")
        gone = [b for b in map(_build, rows) if b.hostname == host and not alive(b.pid, b.pid_start)]
        for b in gone:
            self._sql(
                "UPDATE builds SET status = 'abandoned', finished = ?, error = ? WHERE id = ? AND status = 'running'",
                (time.time(), "the build process disappeared (killed or crashed) before it finished", b.id),
            )
            if b.tool_pgid and boot and b.boot_id == boot:
                stopped = stop_group_leftovers(b.tool_pgid, b.tool_start)
                if stopped:
                    self.say(f"{b.image}: stopped {len(stopped)} process(es) left by the abandoned build {b.id} "
                             f"(pid {', '.join(map(str, stopped))})")
        return [b.id for b in gone]

    def builds(self, image: str | None = None, limit: int | None = None) -> list[Build]:
        """Newest first; optionally one image's, at most `limit`."""
        sql = "SELECT * FROM builds" + (" WHERE image = ?" if image else "") + " ORDER BY started DESC, id DESC"
        args: tuple[Any, ...] = (image,) if image else ()
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [_build(r) for r in self._sql(sql, args)]

    def get(self, build_id: str) -> Build | None:
        rows = self._sql("SELECT * FROM builds WHERE id = ?", (build_id,))
        return _build(rows[0]) if rows else None

    def note(self, instance: str, event: str, *, image: str | None = None, build_id: str | None = None,
             detail: str | None = None) -> None:
        """Record an event of an instance (created, started, stopped, idle-stop, rebased, removed)."""
        self._sql("INSERT INTO instance_events (at, instance, image, build_id, event, detail) VALUES (?, ?, ?, ?, ?, ?)",
                  (time.time(), instance, image, build_id, event, _summary(detail)))

    def events(self, instance: str | None = None, limit: int | None = None) -> list[Event]:
        """Instance events, newest first; optionally one instance's, at most `limit`."""
        if not self._sql("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'instance_events'"):
            return []  # a database of an older version, read without changing it
        sql = "SELECT * FROM instance_events" + (" WHERE instance = ?" if instance else "") + " ORDER BY at DESC"
        args: tuple[Any, ...] = (instance,) if instance else ()
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [Event(float(r["at"]), str(r["instance"]), r["image"], r["build_id"], str(r["event"]), r["detail"])
                for r in self._sql(sql, args)]

    def last(self, image: str, status: str | None = None) -> Build | None:
        """The newest build of `image` (with `status`, if given)."""
        sql = "SELECT * FROM builds WHERE image = ?" + (" AND status = ?" if status else "")
        rows = self._sql(sql + " ORDER BY started DESC LIMIT 1", (image, status) if status else (image,))
        return _build(rows[0]) if rows else None


# Build fields by type: a row edited by hand (or by a bug) reads as "unknown", not as a crash.
_TEXT = ("id", "image", "location", "status", "input_hash", "sha256", "log_path", "error", "pid_start",
         "hostname", "tool_start", "boot_id")
_INTS = ("size", "pid", "tool_pgid")
_REALS = ("started", "finished", "removed")


def _build(row: sqlite3.Row) -> Build:
    """A row as a Build, every field of the type the rest of imagepipe expects."""
    data = dict(row)
    out: dict[str, Any] = {}
    for f in fields(Build):
        value = data.get(f.name)
        if value is None:
            out[f.name] = None
        elif f.name in _TEXT:
            out[f.name] = value if isinstance(value, str) else str(value)
        elif f.name in _INTS:
            out[f.name] = int_or_none(value)
        else:
            out[f.name] = decimal_or_none(value, hi=1e11)
    out["error"] = visible_lines(out["error"]) if out["error"] else None  # shown in tables: text from tools
    out["id"] = out["id"] or "?"
    out["image"] = out["image"] or "?"
    out["location"] = out["location"] or "?"
    out["status"] = out["status"] if out["status"] in STATUSES else "unknown"
    out["started"] = out["started"] if out["started"] is not None else 0.0
    return Build(**out)


def _summary(error: str | None, limit: int = 600) -> str | None:
    """The first lines of an error, short enough for a table cell and a JSON line."""
    if not error:
        return None
    text = error.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------- locks


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (as written into the lock file by the holder)."""

    pid: int | None
    build_id: str | None
    since: float | None
    fetching_from: str | None = None  # a remote-fetch holds it, not a build

    def busy(self, image: str) -> str:
        """`demo is being built by pid N, build X, since T` (fetched from HOST; in use: gc, a
        no-op run's tidy-up)."""
        how = (f"being fetched from {self.fetching_from}" if self.fetching_from
               else "being built" if self.build_id else "in use")
        return f"{image} is {how} by {self.describe()}"

    def waiting(self, image: str) -> str:
        """`demo: waiting for the build held by pid N, ... to finish…` (the fetch; pid N)."""
        what = "the fetch held by " if self.fetching_from else "the build held by " if self.build_id else ""
        return f"{image}: waiting for {what}{self.describe()} to finish…"

    def describe(self) -> str:
        parts = [f"pid {self.pid}" if self.pid else "another process"]
        if self.build_id:
            parts.append(f"build {self.build_id}")
        if self.since:
            parts.append(f"since {time.strftime('%H:%M:%S', time.localtime(self.since))}")
        return ", ".join(parts)


def lock_path(image_dir: Path) -> Path:
    return image_dir / LOCK_NAME


def read_holder(path: Path) -> Holder:
    """Who wrote the lock file (anything unreadable in it reads as unknown)."""
    data = read_record(path)
    build, source = data.get("build_id"), data.get("fetching_from")
    return Holder(int_or_none(data.get("pid"), lo=1), visible(build)[:80] if isinstance(build, str) else None,
                  decimal_or_none(data.get("since"), hi=1e11),
                  visible(source)[:80] if isinstance(source, str) and source else None)


@contextlib.contextmanager
def image_lock(image_dir: Path, *, build_id: str | None = None, wait: bool = True,
               say: Callable[[str], None] | None = None, fetching_from: str | None = None) -> Iterator[bool]:
    """Hold output/<image>/.lock for the duration (flock: released by the kernel on any exit).
    Whatever writes the image's folder holds it: a build, a remote-fetch (`fetching_from`: the
    builder's name, for the holder's description), gc.

    Busy: with wait=True say who holds it and block until it is free; with wait=False raise
    LockBusy at once. Yields whether it had to wait (what was read before may be stale then).
    """
    ensure_dir(image_dir, image_dir.parent)
    path = lock_path(image_dir)

    def busy() -> None:
        holder = read_holder(path)
        if not wait:
            raise LockBusy(holder.busy(image_dir.name),
                           "wait for it (run again without --no-wait), or see: invoke history --image " + image_dir.name)
        if say:
            say(holder.waiting(image_dir.name))

    record = {"pid": os.getpid(), "build_id": build_id, "since": time.time()}
    with flocked(path, {**record, "fetching_from": fetching_from} if fetching_from else record, busy) as waited:
        yield waited


def is_locked(image_dir: Path) -> bool:
    """True when some process holds the image's build lock right now."""
    path = lock_path(image_dir)
    if not path.exists() or path.is_symlink():
        return False
    check_dir(image_dir, image_dir.parent)
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
