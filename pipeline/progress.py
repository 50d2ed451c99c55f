"""How people see a build's events.

Drivers turn their tools' output (Packer's -machine-readable lines, nix's internal-json log)
into `Event`s (pipeline.events, re-exported here). A `Progress` shows them: on a TTY a live line
(step, elapsed, last message, via rich); otherwise plain timestamped lines; with json=True one
JSON object per event on stdout, in the schema of pipeline.events.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Self, TextIO

from pipeline import events
from pipeline.events import Event

__all__ = ["Event", "Progress"]


class Progress:
    """Shows events: live view on a TTY, timestamped lines otherwise, JSON lines on request."""

    def __init__(self, label: str, *, stream: TextIO | None = None, json_lines: bool = False,
                 live: bool | None = None, prefix: str = "") -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.json_lines = json_lines
        self.prefix = prefix
        self.start = time.monotonic()
        self.step = ""
        self.last = ""
        self.steps = 0
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.live_enabled = (tty and not json_lines) if live is None else live
        self._live: Any = None

    def __enter__(self) -> Self:
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.stream), refresh_per_second=4,
                              transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _render(self) -> Any:
        from rich.text import Text

        t = Text()
        t.append(f"{self.label} ", style="bold")
        t.append(f"[{_clock(self.elapsed())}] ", style="cyan")
        t.append(f"step {self.steps}: {self.step}" if self.step else "starting")
        if self.last and self.last != self.step:
            t.append(f"\n  {self.last[:160]}", style="dim")
        return t

    def emit(self, ev: Event) -> None:
        """Record and show one event."""
        if ev.kind == "step":
            self.steps += 1
            self.step = ev.message
        if ev.message:
            self.last = ev.message
        if self.json_lines:
            events.write(ev, self.label, elapsed=self.elapsed())
            return
        if self._live is not None:
            if ev.kind in ("step", "error", "done"):
                self._live.console.print(self._line(ev), highlight=False, markup=False)
            self._live.update(self._render())
            return
        print(self._line(ev), file=self.stream, flush=True)

    def _line(self, ev: Event) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
        mark = {"step": "==>", "error": "!!", "done": "✔"}.get(ev.kind, "   ")
        head = f"{self.prefix}{stamp} +{self.elapsed():6.1f}s {mark} "
        # every line of a multi-line message carries the prefix (parallel builders interleave)
        return "\n".join(head + part for part in (ev.message.splitlines() or [""]))

    def step_event(self, message: str) -> None:
        self.emit(Event("step", message, source="imagepipe"))

    def info(self, message: str) -> None:
        self.emit(Event("message", message, source="imagepipe"))


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
