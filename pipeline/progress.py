"""How people see a build's events.

Drivers turn their tools' output (Packer's -machine-readable lines, nix's internal-json log)
into `Event`s (pipeline.base.events, re-exported here). A `Progress` shows them:

- on a TTY: coloured lines (steps as `[N/M]`, errors in red) above a live footer with the step,
  the elapsed time and the guest console's last line (rich, imported only then; NO_COLOR is
  honoured);
- otherwise: plain timestamped lines without colour, and a heartbeat line when a step has been
  quiet for `heartbeat` seconds (the elapsed time and the console's last line);
- with json_lines=True: one JSON object per event on stdout (pipeline.base.events), steps carrying
  `step`/`total`, heartbeats as their own kind.

With a `log_path`, every event people would see is also written there as a readable line
(date, time, elapsed, text): build.log. The tools' raw output is kept beside it by the driver
(build.raw.log). Tool bookkeeping (Packer's artifact lines) never reaches people.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self, TextIO

from pipeline.base import events
from pipeline.base.events import Event
from pipeline.base.units import MIB, clock, mib

__all__ = ["Event", "Progress", "clock", "console_last_line", "mib"]

HEARTBEAT = 15.0                 # seconds of silence before a plain-mode heartbeat line
TRANSFER_EVERY = 5.0             # plain/JSON mode: at most one download line per this many seconds
HIDDEN = frozenset({"artifact"})  # tool bookkeeping: JSON only, never shown or logged as text
MARKS = {"step": "==>", "error": "!!", "done": "✔", "heartbeat": "…", "transfer": "↓"}
STYLES = {"step": "bold cyan", "error": "bold red", "done": "bold green", "heartbeat": "dim",
          "message": "dim", "transfer": "magenta", "warning": "yellow"}
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def console_last_line(path: Path | None, limit: int = 4096) -> str:
    """The guest console's last non-empty line, printable (escape sequences and control
    characters removed), or "" when there is none yet."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]+", tail)):
        clean = "".join(ch for ch in ANSI.sub("", line) if ch.isprintable()).strip()
        if clean:
            return clean[:120]
    return ""


class Progress:
    """Shows events: live view on a TTY, timestamped lines otherwise, JSON lines on request."""

    def __init__(self, label: str, *, stream: TextIO | None = None, json_lines: bool = False,
                 live: bool | None = None, prefix: str = "", total: int = 0, console_log: Path | None = None,
                 log_path: Path | None = None, heartbeat: float = HEARTBEAT) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.json_lines = json_lines
        self.prefix = prefix
        self.total = total
        self.console_log = console_log
        self.log_path = log_path
        self.heartbeat = heartbeat
        self.start = time.monotonic()
        self.step = ""
        self.step_started = self.start
        self.last = ""
        self.steps = 0
        self.transfer_text = ""
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.live_enabled = (tty and not json_lines) if live is None else live
        self._live: Any = None
        self._lock = threading.RLock()
        self._quiet_since = self.start
        self._last_transfer = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._log: TextIO | None = None
        self._closed: set[Any] = set()  # streams whose reader went away

    def attach(self, *, total: int, console_log: Path | None, log_path: Path | None) -> None:
        """What a build tells its progress view before it starts: the number of steps, the guest
        console to show the last line of, and where the readable log goes."""
        self.total = total
        self.console_log = console_log
        self.log_path = log_path

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        if self.live_enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=Console(file=self.stream, highlight=False),
                              refresh_per_second=4, transient=True)
            self._live.__enter__()
        if self.heartbeat > 0 and not self.live_enabled:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="progress-heartbeat", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None
        with self._lock:
            if self._live is not None:
                self._live.__exit__(None, None, None)
                self._live = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # ------------------------------------------------------------------ events

    def emit(self, ev: Event) -> None:
        """Record and show one event."""
        with self._lock:
            ev = self._record(ev)
            if self.json_lines:
                self._out(lambda: events.write(ev, self.label, elapsed=self.elapsed()), sys.stdout)
            elif ev.kind not in HIDDEN:
                self._show(ev)
            if ev.kind not in HIDDEN and ev.kind != "heartbeat":
                self._write_log(ev)

    def _record(self, ev: Event) -> Event:
        """Update the state (step N of M, last message); a step event gains step/total fields."""
        if ev.kind == "step":
            given = ev.fields.get("step")
            self.steps = int(given) if isinstance(given, int) else self.steps + 1
            if isinstance(ev.fields.get("total"), int):
                self.total = int(ev.fields["total"])
            self.step = ev.message
            self.step_started = time.monotonic()
            self.transfer_text = ""
            ev = dataclasses.replace(ev, fields={**ev.fields, "step": self.steps, "total": self.total or None})
        if ev.kind == "transfer":
            self.transfer_text = ev.message
        elif ev.message and ev.kind not in HIDDEN and ev.kind != "heartbeat":
            self.last = ev.message
        return ev

    def _show(self, ev: Event) -> None:
        self._quiet_since = time.monotonic()
        if self._live is not None:
            if ev.kind != "transfer":  # a download shows in the footer only
                # soft_wrap: the terminal wraps long lines (paths stay whole when copied)
                self._live.console.print(self._styled(ev), soft_wrap=True)
            self._live.refresh()
            return
        self._out(lambda: print(self._line(ev), file=self.stream, flush=True), self.stream)

    def _out(self, write: Any, stream: TextIO) -> None:
        """Write to the screen or a pipe; a reader that went away (`| head`) must not stop the
        build: its stream is pointed at /dev/null and the build goes on (build.log keeps all)."""
        if stream in self._closed:
            return
        try:
            write()
        except BrokenPipeError:
            self._closed.add(stream)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    def counter(self) -> str:
        """`[2/5]` (or `[2]` when the total is unknown)."""
        return f"[{self.steps}/{self.total}]" if self.total else f"[{self.steps}]"

    def _text(self, ev: Event) -> str:
        return f"{self.counter()} {ev.message}" if ev.kind == "step" else ev.message

    def _line(self, ev: Event) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
        head = f"{self.prefix}{stamp} +{self.elapsed():6.1f}s {MARKS.get(ev.kind, '  '):3} "
        # every line of a multi-line message carries the prefix (parallel builders interleave)
        return "\n".join(head + part for part in (self._text(ev).splitlines() or [""]))

    def _styled(self, ev: Event) -> Any:
        from rich.text import Text

        t = Text(no_wrap=False)
        t.append(f"{self.prefix}{time.strftime('%H:%M:%S', time.localtime(ev.ts))} ", style="dim")
        t.append(f"{MARKS.get(ev.kind, '  '):3} ", style=STYLES.get(ev.kind, ""))
        t.append(self._text(ev), style=STYLES.get(ev.kind, ""))
        return t

    def _render(self) -> Any:
        """The live footer: spinner, image, step N/M, elapsed (total and in the step), console."""
        from rich.text import Text

        now = time.monotonic()
        t = Text()
        t.append(SPINNER[int(now * 8) % len(SPINNER)] + " ", style="cyan")
        t.append(f"{self.label} ", style="bold")
        t.append(f"{self.counter()} {self.step}" if self.step else "starting", style="bold cyan")
        t.append(f"  {clock(now - self.start)}", style="yellow")
        if self.step:
            t.append(f" (step {clock(now - self.step_started)})", style="dim")
        if self.transfer_text:
            t.append(f"\n  {self.transfer_text}", style="magenta")
        console = console_last_line(self.console_log)
        if console:
            t.append(f"\n  console: {console}", style="dim")
        elif self.last and self.last != self.step:
            t.append(f"\n  {self.last[:160]}", style="dim")
        return t

    # ------------------------------------------------------------------ readable log

    def _write_log(self, ev: Event) -> None:
        if self.log_path is None or (ev.kind == "transfer" and not ev.fields.get("final")):
            return
        try:
            if self._log is None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.ts))
            head = f"{stamp} +{self.elapsed():7.1f}s {MARKS.get(ev.kind, '  '):3} "
            self._log.write("\n".join(head + part for part in (self._text(ev).splitlines() or [""])) + "\n")
            self._log.flush()
        except OSError:
            pass  # a log that cannot be written must not stop the build

    def log_only(self, message: str) -> None:
        """A line for build.log only (the build's header: what, where, how)."""
        with self._lock:
            self._write_log(Event("message", message, source="imagepipe"))

    # ------------------------------------------------------------------ heartbeat

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.step and time.monotonic() - self._quiet_since >= self.heartbeat:
                    self._beat()

    def _beat(self) -> None:
        now = time.monotonic()
        console = console_last_line(self.console_log)
        text = f"still in {self.counter()} {self.step}: {clock(now - self.step_started)} in this step"
        text += f"; console: {console}" if console else ""
        ev = Event("heartbeat", text, source="imagepipe",
                   fields={"step": self.steps, "step_elapsed": round(now - self.step_started, 1),
                           "console": console})
        if self.json_lines:
            self._out(lambda: events.write(ev, self.label, elapsed=self.elapsed()), sys.stdout)
        else:
            self._out(lambda: print(self._line(ev), file=self.stream, flush=True), self.stream)
        self._quiet_since = now

    # ------------------------------------------------------------------ helpers for drivers

    def step_event(self, message: str) -> None:
        self.emit(Event("step", message, source="imagepipe"))

    def info(self, message: str) -> None:
        self.emit(Event("message", message, source="imagepipe"))

    def transfer(self, name: str, done: int, total: int | None, rate: float, *, final: bool = False,
                 resumed_at: int = 0) -> None:
        """A download's progress: bytes, speed, ETA. Live: the footer; otherwise at most one line
        every TRANSFER_EVERY seconds (and the last one)."""
        now = time.monotonic()
        if not final and not self.live_enabled and now - self._last_transfer < TRANSFER_EVERY:
            return
        self._last_transfer = now
        self.emit(Event("transfer", transfer_text(name, done, total, rate, final=final, resumed_at=resumed_at),
                        source="imagepipe", fields={"bytes": done, "total_bytes": total, "rate": round(rate),
                                                    "final": final}))

    def report(self) -> Reporter:
        """A `report` callable (text lines) that also carries `transfer` for downloads."""
        return Reporter(self)


class Reporter:
    """What a profile's prepare step reports through: text lines, and downloads' progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __call__(self, message: str) -> None:
        self.progress.info(message)

    def transfer(self, name: str, done: int, total: int | None, rate: float, *, final: bool = False,
                 resumed_at: int = 0) -> None:
        self.progress.transfer(name, done, total, rate, final=final, resumed_at=resumed_at)


def transfer_text(name: str, done: int, total: int | None, rate: float, *, final: bool = False,
                  resumed_at: int = 0) -> str:
    """`downloading X: 312.0 of 900.0 MiB (34%), 11.2 MiB/s, ETA 0:00:52` (pure)."""
    if final:
        return f"downloaded {name}: {mib(done)}" + (f" at {mib(rate)}/s" if rate else "")
    size = f"{done / MIB:.1f} of {mib(total)} ({done * 100 // total}%)" if total else mib(done)
    eta = f", ETA {clock((total - done) / rate)}" if total and rate > 0 else ""
    resumed = f", resumed at {mib(resumed_at)}" if resumed_at else ""
    return f"downloading {name}: {size}, {mib(rate)}/s{eta}{resumed}"
