"""Helpers shared by the tests (imported by tests/conftest.py and by test modules)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from pipeline.config import Accel, Arch
from pipeline.errors import AccelUnavailable

if TYPE_CHECKING:
    from pipeline.plan import AccelChoice

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent.parent  # the project checkout


def wait_until(check: Callable[[], T], timeout: float, what: str,
               seen: Callable[[], object] | None = None, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; when `timeout` s pass, FAIL the test naming
    `what` was awaited and what `seen()` shows at that moment (never a silent hang or a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            shown = seen() if seen else result
            pytest.fail(f"waited {timeout:.0f}s for {what}; last seen: {shown!r}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (exited, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def accel_here(requested: Accel = Accel.AUTO, guest: Arch = Arch.X86_64, *,
               purpose: str = "run") -> AccelChoice | AccelUnavailable:
    """What imagepipe's decision function gives on THIS host (probed, not assumed): the choice, or
    the refusal it raises. Tests compare the CLI's output with this, so they hold on a KVM laptop
    as on a TCG-only CI box; the table tests in tests/unit cover every host kind by hand."""
    from pipeline.host import probe
    from pipeline.plan import choose_accel

    try:
        return choose_accel(requested, probe(tools=()), guest, purpose=purpose)
    except AccelUnavailable as exc:
        return exc
