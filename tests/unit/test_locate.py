"""Which binary imagepipe runs for a tool: PACKER=/path, else PATH, else .venv/bin (where setup.sh
links the packer it was given)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.base.errors import ToolMissing
from pipeline.base.run import locate, run, which


def _fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without packer (the interpreter's folder stays the fallback)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("PACKER", raising=False)


def test_packer_variable_wins_over_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    real = os.path.realpath(shutil.which("packer") or "/usr/bin/packer")
    copy = tmp_path / "bin" / "packer"
    copy.parent.mkdir()
    shutil.copy2(real, copy)
    monkeypatch.setenv("PACKER", str(copy))
    assert locate("packer") == str(copy)
    assert "Packer v" in run(["packer", "version"]).stdout


def test_a_packer_variable_naming_no_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PACKER", str(tmp_path / "no-such-packer"))
    assert locate("packer") is None
    with pytest.raises(ToolMissing) as err:
        which("packer")
    assert "PACKER=" in err.value.message and "not an executable file" in err.value.message


def test_the_venv_bin_is_searched_after_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    real = os.path.realpath(shutil.which("packer") or "/usr/bin/packer")
    _fake_path(tmp_path, monkeypatch)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))  # imagepipe run from that venv
    assert locate("packer") is None
    link = venv_bin / "packer"
    link.symlink_to(real)
    assert locate("packer") == str(link)
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty-path'}:{os.path.dirname(real)}")
    assert locate("packer") != str(link)  # PATH comes first
