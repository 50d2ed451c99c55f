"""pipeline.base.fsutil: atomic writes (real files in a temp folder)."""

import os
import stat

import pytest

from pipeline.base.fsutil import atomic_copy, atomic_write


def test_text_and_bytes_with_mode(tmp_path):
    text, blob = tmp_path / "a.txt", tmp_path / "b.bin"
    atomic_write(text, "héllo\n")
    atomic_write(blob, b"\x00\x01", mode=0o600)
    assert text.read_text(encoding="utf-8") == "héllo\n" and blob.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(text.stat().st_mode) == 0o644 and stat.S_IMODE(blob.stat().st_mode) == 0o600
    atomic_write(text, "second")
    assert text.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temp left behind


def test_a_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "state"
    link.symlink_to(victim)
    atomic_write(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and victim.read_text() == "keep"


def test_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "inside").write_text("x")  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        atomic_write(target, "data")
    assert target.is_dir() and os.listdir(tmp_path) == ["busy"]


def test_missing_folder_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "such" / "file", "x")
    assert os.listdir(tmp_path) == []


def test_copy(tmp_path):
    src = tmp_path / "src.fd"
    src.write_bytes(os.urandom(300_000))
    dest = tmp_path / "dest.fd"
    atomic_copy(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "absent", dest)
    assert dest.read_bytes() == src.read_bytes() and sorted(os.listdir(tmp_path)) == ["dest.fd", "src.fd"]
