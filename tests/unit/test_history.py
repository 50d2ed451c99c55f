"""History rows, abandoned-build detection with real processes, and flock-based image locks."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.base import procs
from pipeline.base.errors import LockBusy
from pipeline.output.history import History, image_lock, is_locked
from tests.support import hold_image_lock

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{"pid": %d, "build_id": "held-by-test"}' % os.getpid())
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(lock: Path, seconds: float) -> subprocess.Popen:
    """A real second process holding the lock (flock is per open file, so a thread would not do)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_rows_from_start_to_finish(tmp_path):
    with History(tmp_path) as h:
        h.start("20260101T000000Z-aaaa", "demo", input_hash="h1", log_path=tmp_path / "logs")
        row = h.get("20260101T000000Z-aaaa")
        assert row.status == "running" and row.pid == os.getpid() and row.pid_start and row.finished is None
        h.finish("20260101T000000Z-aaaa", "ok", sha256="f" * 64, size=123)
        h.start("20260101T000001Z-bbbb", "demo", started=time.time() + 1)
        h.finish("20260101T000001Z-bbbb", "failed", error="packer exited 1: boom")
        h.start("20260101T000002Z-cccc", "other")
    with History(tmp_path) as h:  # persisted, WAL mode
        assert h.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [b.id for b in h.builds("demo")] == ["20260101T000001Z-bbbb", "20260101T000000Z-aaaa"]
        assert len(h.builds(limit=2)) == 2 and len(h.builds()) == 3
        assert h.last("demo", "ok").sha256 == "f" * 64
        assert h.last("demo").error == "packer exited 1: boom"
        as_json = h.get("20260101T000000Z-aaaa").as_json()
        assert as_json["status"] == "ok" and as_json["started"].endswith("Z") and as_json["size"] == 123


def test_a_running_row_whose_process_is_gone_becomes_abandoned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with History(tmp_path) as h:
        h.start("b-dead", "demo")
        h.db.execute("UPDATE builds SET pid = ?, pid_start = ? WHERE id = 'b-dead'", (dead.pid, "1"))
        h.start("b-reused", "demo")  # our own pid, but another process's start time: a reused pid
        h.db.execute("UPDATE builds SET pid_start = '1' WHERE id = 'b-reused'")
        h.start("b-alive", "demo")
        assert sorted(h.reap()) == ["b-dead", "b-reused"]
        assert h.get("b-dead").status == "abandoned" and "disappeared" in h.get("b-dead").error
        assert h.get("b-alive").status == "running"
        assert h.reap() == []


def test_start_time_of_a_live_and_a_dead_process():
    assert procs.start_time(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procs.start_time(proc.pid) is None


def test_lock_is_exclusive_and_no_wait_fails_with_exit_75(tmp_path):
    image_dir = tmp_path / "demo"
    proc = holder(image_dir / ".lock", 30)
    try:
        assert is_locked(image_dir)
        with pytest.raises(LockBusy) as exc, image_lock(image_dir, wait=False):
            pass
        assert exc.value.exit_code == 75 and f"pid {proc.pid}" in exc.value.message
        assert "held-by-test" in exc.value.message
    finally:
        proc.kill()
        proc.wait()


def test_a_fetch_holding_the_lock_is_named_as_one(tmp_path):
    image_dir = tmp_path / "demo"
    proc = hold_image_lock(image_dir, build_id="20260101T000000Z-abcd", fetching_from="hal9000")
    try:
        with pytest.raises(LockBusy) as exc, image_lock(image_dir, wait=False):
            pass
        assert exc.value.message.startswith(f"demo is being fetched from hal9000 by pid {proc.pid}, "
                                            "build 20260101T000000Z-abcd"), exc.value.message
        said: list[str] = []
        threading.Timer(1.5, proc.stdin.close).start()  # it lets go while we wait
        with image_lock(image_dir, say=said.append):
            pass
        assert said and said[0].startswith(f"demo: waiting for the fetch held by pid {proc.pid}"), said
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_that_is_no_build_is_not_called_one(tmp_path):
    """gc and a no-op run's tidy-up hold the lock without a build id: "in use", not "being built"."""
    image_dir = tmp_path / "demo"
    proc = hold_image_lock(image_dir, wait=False)
    try:
        with pytest.raises(LockBusy) as exc, image_lock(image_dir, wait=False):
            pass
        assert exc.value.message.startswith(f"demo is in use by pid {proc.pid}, since "), exc.value.message
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_releases_the_lock(tmp_path):
    image_dir = tmp_path / "demo"
    proc = holder(image_dir / ".lock", 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_locked(image_dir)
    with image_lock(image_dir, wait=False, build_id="next"):
        assert is_locked(image_dir)
    assert not is_locked(image_dir)


def test_waiting_says_who_holds_the_lock_and_gets_it_when_released(tmp_path):
    image_dir = tmp_path / "demo"
    proc = holder(image_dir / ".lock", 1.5)
    said = []
    start = time.monotonic()
    with image_lock(image_dir, say=said.append) as had_to_wait:
        waited = time.monotonic() - start
    proc.wait()
    assert waited > 0.5 and had_to_wait, waited
    with image_lock(image_dir, say=said.append) as had_to_wait:
        assert not had_to_wait
    assert len(said) == 1 and "waiting" in said[0] and f"pid {proc.pid}" in said[0]


def test_different_images_lock_independently(tmp_path):
    with image_lock(tmp_path / "a", wait=False):
        proc = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from pipeline.output.history import image_lock\n"
            f"with image_lock(Path({str(tmp_path / 'b')!r}), wait=False): print('b locked')")],
            check=False, capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and "b locked" in proc.stdout, proc.stderr
