"""Build history (SQLite, output/history.db) and per-image build locks.

History: one row per build, written when the build starts (status `running`) and updated when
it ends (`ok`, `failed`, `interrupted`). A build killed outright (kill -9, power loss) cannot
update its row; the next reader finds a `running` row whose process is gone (pid + process start
time recorded, so a reused pid does not fool it) and marks it `abandoned`.

Locks: `fcntl.flock` on output/<image>/.lock. The kernel drops a flock when its holder dies,
even by kill -9, so a lock can never go stale; the file's content (pid, build id) is only there
to tell a waiting user who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import utc_stamp
from pipeline.errors import LockBusy
from pipeline.procs import is_alive, start_time

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
"""


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

    def as_json(self) -> dict[str, Any]:
        """The row with ISO timestamps (for --json)."""
        data = asdict(self)
        for key in ("started", "finished", "removed"):
            data[key] = utc_stamp(data[key]) if data[key] is not None else None
        data["duration_s"] = round(self.finished - self.started, 1) if self.finished else None
        return data


# --------------------------------------------------------------------------------- database


class History:
    """The build history of one output folder."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, build_id: str, image: str, *, location: str = "local", input_hash: str | None = None,
              log_path: Path | None = None, started: float | None = None) -> None:
        """Record a build that is starting now, in this process."""
        pid = os.getpid()
        self.db.execute(
            "INSERT INTO builds (id, image, location, started, status, input_hash, log_path, pid, pid_start,"
            " hostname) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            (build_id, image, location, started or time.time(), input_hash,
             str(log_path) if log_path else None, pid, start_time(pid), socket.gethostname()),
        )

    def finish(self, build_id: str, status: str, *, sha256: str | None = None, size: int | None = None,
               error: str | None = None) -> None:
        """Record how a build ended."""
        assert status in STATUSES and status != "running", status
        self.db.execute(
            "UPDATE builds SET finished = ?, status = ?, sha256 = ?, size = ?, error = ? WHERE id = ?",
            (time.time(), status, sha256, size, _summary(error), build_id),
        )

    def mark_removed(self, build_ids: list[str]) -> None:
        """Retention deleted these builds' files (the rows stay: history is the record)."""
        now = time.time()
        self.db.executemany("UPDATE builds SET removed = ? WHERE id = ?", [(now, b) for b in build_ids])

    def reap(self, alive: Callable[[int | None, str | None], bool] = is_alive) -> list[str]:
        """Mark `running` rows of this host whose process is gone as `abandoned`; returns their ids."""
        host = socket.gethostname()
        rows = self.db.execute("SELECT id, pid, pid_start, hostname FROM builds WHERE status = 'running'").fetchall()
        gone = [r["id"] for r in rows if r["hostname"] == host and not alive(r["pid"], r["pid_start"])]
        for build_id in gone:
            self.db.execute(
                "UPDATE builds SET status = 'abandoned', finished = ?, error = ? WHERE id = ? AND status = 'running'",
                (time.time(), "the build process disappeared (killed or crashed) before it finished", build_id),
            )
        return gone

    def builds(self, image: str | None = None, limit: int | None = None) -> list[Build]:
        """Newest first; optionally one image's, at most `limit`."""
        sql = "SELECT * FROM builds" + (" WHERE image = ?" if image else "") + " ORDER BY started DESC, id DESC"
        args: tuple[Any, ...] = (image,) if image else ()
        if limit:
            sql += " LIMIT ?"
            args += (limit,)
        return [Build(**dict(r)) for r in self.db.execute(sql, args).fetchall()]

    def get(self, build_id: str) -> Build | None:
        row = self.db.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        return Build(**dict(row)) if row else None

    def last(self, image: str, status: str | None = None) -> Build | None:
        """The newest build of `image` (with `status`, if given)."""
        sql = "SELECT * FROM builds WHERE image = ?" + (" AND status = ?" if status else "")
        row = self.db.execute(sql + " ORDER BY started DESC LIMIT 1", (image, status) if status else (image,)).fetchone()
        return Build(**dict(row)) if row else None


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
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        data = {}
    return Holder(data.get("pid"), data.get("build_id"), data.get("since"))


@contextlib.contextmanager
def image_lock(image_dir: Path, *, build_id: str | None = None, wait: bool = True,
               say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold output/<image>/.lock for the duration (flock: released by the kernel on any exit).

    Busy: with wait=True say who holds it and block until it is free; with wait=False raise
    LockBusy at once.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(image_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            if not wait:
                raise LockBusy(
                    f"{image_dir.name} is being built by {holder.describe()}",
                    "wait for it (run again without --no-wait), or see: invoke history --image " + image_dir.name,
                ) from None
            if say:
                say(f"{image_dir.name}: waiting for the build held by {holder.describe()} to finish…")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "build_id": build_id, "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def is_locked(image_dir: Path) -> bool:
    """True when some process holds the image's build lock right now."""
    path = lock_path(image_dir)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
