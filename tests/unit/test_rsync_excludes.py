"""The sync's exclude list, run through the real rsync on two local folders: a project whose
virtualenv is a symbolic link leaves the builder's own .venv alone under --delete."""

from __future__ import annotations

import subprocess

from pipeline.builders.rsync import SYNC_EXCLUDES
from tests.support import require_tool


def test_a_linked_venv_is_neither_sent_nor_deletes_the_builders_venv(tmp_path):
    require_tool("rsync", "rsync")
    here, there = tmp_path / "project", tmp_path / "builder"
    (here / "pkg").mkdir(parents=True)
    (here / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "venv-elsewhere").mkdir()
    (here / ".venv").symlink_to(tmp_path / "venv-elsewhere")
    (there / ".venv" / "bin").mkdir(parents=True)
    (there / ".venv" / "bin" / "python").write_text("builder's venv\n")
    (there / "stale.txt").write_text("removed by --delete\n")
    argv = ["rsync", "-a", "--delete", *(f"--exclude={p}" for p in SYNC_EXCLUDES), f"{here}/", f"{there}/"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert (there / ".venv" / "bin" / "python").read_text() == "builder's venv\n"
    assert not (there / ".venv").is_symlink()
    assert (there / "pkg" / "a.py").is_file() and not (there / "stale.txt").exists()
