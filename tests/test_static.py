"""The static checks are part of the test command: `ruff check` (the rule selection in
pyproject.toml) over the whole project and `mypy pipeline` (strict about missing annotations).
Both tools are pinned in the `test` extra, so a new release cannot turn the suite red by itself."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def _check(tool: str, *args: str) -> None:
    res = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{tool} {' '.join(args)} found problems:\n{res.stdout}\n{res.stderr}"


def test_ruff_check_is_clean() -> None:
    _check("ruff", "check", "--no-cache", ".")


def test_mypy_pipeline_is_clean() -> None:
    _check("mypy", "pipeline")
