"""Safety helpers with real files, links, sqlite and processes: nothing outside imagepipe's own
folders is deleted or written, corrupt state is moved aside or refused, errors are one line."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Exit

from pipeline.base.errors import CorruptState, NumberError, StorageError, UnsafePath
from pipeline.base.fsutil import (
    check_dir,
    ensure_dir,
    open_nofollow,
    replace_link,
    resolves_inside,
    safe_rmtree,
    storage_error,
)
from pipeline.base.numbers import int_or_none, parse_int
from pipeline.base.text import visible, visible_lines
from pipeline.output import artifacts, history, manifest_check, retention
from pipeline.output.history import History, image_lock, read_holder
from pipeline.tasks.guard import guard
from pipeline.vm.state import StatePaths, console_tail, read_status
from tests.support import ROOT


def victim(tmp_path: Path) -> Path:
    """A folder outside the output folder that must survive everything below."""
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    (v / "keep.txt").write_text("precious")
    (v / "sub" / "deep.txt").write_text("precious too")
    return v


def intact(v: Path) -> bool:
    return (v / "keep.txt").read_text() == "precious" and (v / "sub" / "deep.txt").read_text() == "precious too"


# ------------------------------------------------------------------------------ fsutil


def test_check_dir_refuses_links_and_foreign_places(tmp_path):
    out, v = tmp_path / "out", victim(tmp_path)
    (out / "img").mkdir(parents=True)
    (out / "img" / "builds").symlink_to(v)
    with pytest.raises(UnsafePath, match="symbolic link pointing to"):
        check_dir(out / "img" / "builds" / "x", out / "img")
    with pytest.raises(UnsafePath, match="not inside"):
        check_dir(tmp_path / "elsewhere", out)
    check_dir(out / "img" / "logs" / "not-yet", out)  # missing is fine: the caller creates it
    assert ensure_dir(out / "img" / "logs" / "a", out).is_dir()
    assert resolves_inside(out / "img" / "logs", out) and not resolves_inside(out / "img" / "builds", out)


def test_safe_rmtree_removes_a_planted_link_itself_never_its_target(tmp_path):
    out, v = tmp_path / "out", victim(tmp_path)
    stage = out / "img" / ".staging"
    stage.mkdir(parents=True)
    (stage / "b1").symlink_to(v)
    (stage / "b2").mkdir()
    (stage / "b2" / "link-inside").symlink_to(v)  # rmtree's fd walk unlinks it, does not descend
    assert safe_rmtree(stage / "b1", out / "img") and safe_rmtree(stage / "b2", out / "img")
    assert intact(v) and not list(stage.iterdir())
    (out / "img" / ".staging2").symlink_to(v / "sub")
    with pytest.raises(UnsafePath):
        safe_rmtree(out / "img" / ".staging2" / "deep.txt", out / "img")
    assert intact(v)


def test_replace_link_replaces_links_and_refuses_real_files(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "current").symlink_to(tmp_path)  # pointing anywhere: ours to replace
    replace_link(img / "current", "builds/b1", inside=img)
    assert os.readlink(img / "current") == "builds/b1"
    (img / "demo.qcow2").write_text("a file of the user's")
    with pytest.raises(UnsafePath, match="a file is where imagepipe keeps a link") as exc:
        replace_link(img / "demo.qcow2", "current/demo.qcow2", inside=img)
    assert "move" in exc.value.hint
    assert (img / "demo.qcow2").read_text() == "a file of the user's"


def test_open_nofollow_refuses_a_link(tmp_path):
    v = victim(tmp_path)
    (tmp_path / ".lock").symlink_to(v / "keep.txt")
    with pytest.raises(UnsafePath, match="symbolic link"):
        open_nofollow(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    assert intact(v)


def test_storage_error_names_the_path_and_the_free_space(tmp_path):
    err = storage_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")))
    assert str(tmp_path / "x") in err.message and "no space left" in err.message and "free on" in err.message
    ro = storage_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path)))
    assert "read-only" in ro.message and "writable" in ro.hint


# ------------------------------------------------------------------------------ locks and history


def test_the_lock_is_never_opened_through_a_link(tmp_path):
    v = victim(tmp_path)
    img = tmp_path / "out" / "img"
    img.mkdir(parents=True)
    (img / ".lock").symlink_to(v / "keep.txt")
    with pytest.raises(UnsafePath), image_lock(img, wait=False):
        pass
    assert intact(v) and not history.is_locked(img)


def test_a_lock_file_with_garbage_reads_as_unknown(tmp_path):
    for text in ("[1, 2]", '{"pid": "²", "since": "soon", "build_id": "\\u001b[2J"}', "{{{", "\xff"):
        (tmp_path / ".lock").write_text(text, encoding="utf-8", errors="surrogateescape")
        holder = read_holder(tmp_path / ".lock")
        assert holder.pid is None and holder.since is None and "\x1b" not in (holder.build_id or "")
        assert holder.describe()


def test_an_unreadable_history_db_is_moved_aside_and_a_new_one_started(tmp_path):
    (tmp_path / "history.db").write_bytes(b"this is not a database at all" * 100)
    said: list[str] = []
    with History(tmp_path, say=said.append) as h:
        h.start("b1", "demo")
        assert [b.id for b in h.builds()] == ["b1"]
    kept = list(tmp_path.glob("history.db.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not")
    assert "could not be read" in said[0] and kept[0].name in said[0]


def test_a_foreign_builds_table_is_moved_aside_and_an_old_one_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "history.db")
    db.execute("CREATE TABLE builds (x TEXT)")
    db.commit()
    db.close()
    with History(tmp_path, say=lambda _m: None) as h:
        h.start("b1", "demo")
    assert list(tmp_path.glob("history.db.unreadable-*"))
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "history.db")  # the first release's table: no tool_pgid, boot_id
    db.executescript(history.SCHEMA)
    db.execute("INSERT INTO builds (id, image, location, started, status) VALUES ('a', 'demo', 'local', 1, 'ok')")
    db.commit()
    db.close()
    with History(old) as h:
        assert h.get("a").status == "ok" and h.get("a").tool_pgid is None
        h.start("b", "demo")
        h.set_tool_group("b", 12345, "678")
        assert h.get("b").tool_pgid == 12345


def test_rows_of_the_wrong_type_read_as_unknown(tmp_path):
    with History(tmp_path) as h:
        h.db.execute("INSERT INTO builds (id, image, location, started, status, size, pid, finished) "
                     "VALUES ('x', 'demo', 'local', 'soon', 'weird', 'big', 'me', X'00')")
        row = h.get("x")
        assert row.started == 0.0 and row.size is None and row.pid is None and row.status == "unknown"
        assert row.as_json()["duration_s"] is None


def test_a_full_database_is_a_storage_error(tmp_path):
    with History(tmp_path) as h:
        h.db.execute("PRAGMA max_page_count = 8")  # sqlite's own "database or disk is full"
        with pytest.raises(StorageError, match="the disk is full"):
            for i in range(200):
                h.start(f"b{i}", "demo", log_path=tmp_path / ("x" * 500))


def test_history_for_reading_creates_nothing(tmp_path):
    with History(tmp_path / "nothing", create=False) as h:
        assert h.builds() == [] and h.reap() == []
    assert not (tmp_path / "nothing").exists()


def test_history_refuses_a_linked_database(tmp_path):
    v = victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "history.db").symlink_to(v / "keep.txt")
    with pytest.raises(CorruptState, match="symbolic link"):
        History(out)
    assert intact(v)


# ------------------------------------------------------------------------------ retention, artifacts


def test_clean_stale_refuses_a_planted_staging_link(tmp_path):
    v = victim(tmp_path)
    img = tmp_path / "out" / "demo"
    img.mkdir(parents=True)
    (img / ".staging").symlink_to(v)
    with pytest.raises(UnsafePath, match=r"\.staging"):
        retention.clean_stale(img)
    assert intact(v)


def test_gc_refuses_planted_builds_and_logs_links(tmp_path):
    v = victim(tmp_path)
    out = tmp_path / "out"
    for name in ("builds", "logs"):
        img = out / f"demo-{name}"
        img.mkdir(parents=True)
        (img / name).symlink_to(v)
        with pytest.raises(UnsafePath):
            retention.apply(out, img.name, keep=1)
    assert intact(v)


def test_current_pointing_outside_builds_is_not_a_build(tmp_path):
    img = tmp_path / "img"
    (img / "builds" / "b1").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text("{}")
    (img / "current").symlink_to(elsewhere)
    assert artifacts.current_build(img) is None and artifacts.read_manifest(img) is None
    (img / "current").unlink()
    (img / "current").symlink_to("builds/b1")
    assert artifacts.current_build(img) == (img / "builds" / "b1").resolve()


def test_publish_replaces_links_that_do_not_point_into_current_and_leaves_real_files_alone(tmp_path):
    v = victim(tmp_path)
    img = tmp_path / "out" / "demo"
    stage = img / ".staging" / "b1"
    stage.mkdir(parents=True)
    for name in ("demo.qcow2", "manifest.json", "SHA256SUMS", "vmlinuz"):
        (stage / name).write_text(name)
    (img / "demo.qcow2").symlink_to(v / "keep.txt")         # planted: replaced, target untouched
    (img / "vmlinuz").write_text("a file of the user's")      # a real file: left alone
    (img / "current").symlink_to(v)                            # planted `current`: replaced
    artifacts.publish(stage, img, "b1")
    assert os.readlink(img / "demo.qcow2") == "current/demo.qcow2" and os.readlink(img / "current") == "builds/b1"
    assert (img / "vmlinuz").read_text() == "a file of the user's" and intact(v)
    assert (img / "demo.qcow2").read_text() == "demo.qcow2"


GOOD = {"image": "demo-x86_64", "build_id": "20260101T000000Z-abcd",
        "artifact": {"file": "demo-x86_64.qcow2", "format": "qcow2", "size": 3, "sha256": "a" * 64},
        "boot": {"kernel": "vmlinuz", "initrd": "initrd.img", "append": "console=ttyS0"}}


@pytest.mark.parametrize("change,complaint", [
    (lambda m: m["artifact"].update(file="../../etc/passwd"), "artifact.file"),
    (lambda m: m["artifact"].update(size=True), "artifact.size"),
    (lambda m: m["artifact"].update(sha256="A" * 64), "artifact.sha256"),
    (lambda m: m.update(artifact=[1]), "artifact: expected an object"),
    (lambda m: m["boot"].update(kernel="/boot/vmlinuz"), "boot.kernel"),
    (lambda m: m["boot"].update(append="a\nb"), "boot.append"),
    (lambda m: m.update(build_id="x\n"), "build_id"),
    (lambda m: m.update(artifacts=[m["artifact"], {"file": "a/b.vmdk", "format": "vmdk", "size": 1,
                                                   "sha256": "b" * 64}]), "artifacts[1].file"),
    (lambda m: m.update(artifacts="x.vmdk"), "artifacts: expected a list"),
])
def test_bad_manifests_are_refused_with_what_is_wrong(change, complaint):
    m = json.loads(json.dumps(GOOD))
    change(m)
    with pytest.raises(CorruptState) as exc:
        manifest_check.check(m, "manifest.json")
    assert complaint in exc.value.message
    assert manifest_check.check(GOOD, "manifest.json")["build_id"] == GOOD["build_id"]


def test_a_truncated_published_manifest_is_a_clear_error(tmp_path):
    img = tmp_path / "img"
    (img / "builds" / "b1").mkdir(parents=True)
    (img / "builds" / "b1" / "manifest.json").write_text(json.dumps(GOOD)[:40])
    (img / "current").symlink_to("builds/b1")
    with pytest.raises(CorruptState, match="not valid JSON") as exc:
        artifacts.read_manifest(img)
    assert "invoke build img" in exc.value.hint


# ------------------------------------------------------------------------------ numbers, text, state


@pytest.mark.parametrize("text", ["²", "٣", " 5", "5 ", "1e3", "+5", "1_000", "9" * 25, "", "0x10", "5\n"])
def test_the_number_parser_refuses(text):
    with pytest.raises(NumberError):
        parse_int(text)
    assert int_or_none(text) is None


def test_state_files_with_garbage_read_as_stopped(tmp_path):
    state = StatePaths(tmp_path / "run")
    state.root.mkdir()
    for garbage in ("²", "٣٣", "99999999999999999999999", "-1", "\x1b[2J"):
        state.pid.write_text(garbage)
        assert read_status("demo", state).state == "stopped"


def test_console_tail_shows_escape_sequences_instead_of_running_them(tmp_path):
    state = StatePaths(tmp_path)
    state.console.write_bytes(b"boot ok\n\x1b]0;owned\x07\x1b[2Jlogin: \x9b31m\n")
    tail = console_tail(state)
    assert "\x1b" not in tail and "\x07" not in tail and "\x9b" not in tail
    assert "^[]0;owned^G^[[2Jlogin:" in tail
    assert visible("a\x1bb\x7f\u202e") == "a^[b^?\\u202e" and visible_lines("a\n\x1b") == "a\n^["


# ------------------------------------------------------------------------------ one line, never a traceback


def test_guard_turns_a_bug_into_one_line_and_keeps_the_trace(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.delenv("IMAGEPIPE_DEBUG", raising=False)

    @guard
    def task(c: object) -> None:
        _ = {}["missing"]

    with pytest.raises(Exit) as exc:
        task(object())
    message = exc.value.message
    assert exc.value.code == 70 and len(message.splitlines()) == 2 and "KeyError: 'missing'" in message
    trace = Path(message.split("the full trace is in ")[1].split(")")[0])
    assert trace.is_file() and "Traceback" in trace.read_text() and "task" in trace.read_text()


def test_guard_turns_a_full_disk_into_one_line(tmp_path):
    @guard
    def task(c: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))

    with pytest.raises(Exit) as exc:
        task(object())
    assert exc.value.code == 1 and "no space left" in exc.value.message and "free on" in exc.value.message


def test_an_exception_escaping_invoke_is_one_line(tmp_path):
    script = ("from pipeline.tasks.loading import guard_invoke_config\n"
              "guard_invoke_config()\n"
              "raise RuntimeError('broken \\x1b[2J')\n")
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 1 and "Traceback" not in res.stderr and "\x1b" not in res.stderr
    assert "internal error in invoke: RuntimeError: broken ^[[2J" in res.stderr
    assert list(tmp_path.glob("imagepipe-*/*.trace"))
