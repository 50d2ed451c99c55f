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


# ------------------------------------------------------------------------------ processes


def live_processes_mentioning(text: str) -> list[str]:
    """`pid: command line` of this user's live processes (zombies left out) whose command line
    contains `text` - the scan of pipeline.procs, shown for a failure message."""
    from pipeline import procs

    found = []
    for pid in procs.pids_mentioning(text):
        if not process_gone(pid):
            found.append(f"{pid}: {(procs.cmdline(pid) or '')[:200]}")
    return found


def live_pids_mentioning(text: str) -> list[int]:
    """The pids of live_processes_mentioning(text)."""
    return [int(line.split(":", 1)[0]) for line in live_processes_mentioning(text)]


def wait_gone(text: str, timeout: float = 30) -> None:
    """Poll until no live process mentions `text`; fail listing what is left."""
    wait_until(lambda: not live_processes_mentioning(text), timeout, f"no process mentioning {text}",
               lambda: "\n".join(live_processes_mentioning(text)))


class Background:
    """`python -m invoke -f CFG ARGS` in the project, in its own session (its whole process group
    can be killed), its output collected line by line by a reader thread so that every wait on it
    has a deadline even when it prints nothing."""

    def __init__(self, cfg: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen([sys.executable, "-m", "invoke", "-f", str(cfg), *args], cwd=ROOT,
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, *texts: str, timeout: float = 300) -> str:
        """Wait until a line holds one of `texts` (returns that line); fail with the output so far
        if the command exits first or `timeout` s pass."""
        def seen() -> str | None:
            hit = next((line for line in list(self.lines) for t in texts if t in line), None)
            if hit is None and self.proc.poll() is not None:
                self.reader.join(timeout=5)
                hit = next((line for line in list(self.lines) for t in texts if t in line), None)
                if hit is None:
                    pytest.fail(f"exited {self.proc.returncode} before {texts!r}:\n{self.output()}")
            return hit

        return wait_until(seen, timeout, f"a line with {' or '.join(map(repr, texts))}", self.output)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the command to exit (its output fully read); its exit code."""
        import subprocess

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running after {timeout:.0f}s:\n{self.output()}")
        self.reader.join(timeout=30)
        return code
