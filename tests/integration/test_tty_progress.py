"""The build's progress view in a real terminal: tmux (Debian's) runs the command in a pane and
`capture-pane -e` shows what a person sees, colours included - steps as N/M, the live footer
with the elapsed time and the guest console's last line, no Packer bookkeeping."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import NIX_CONFIG, ROOT, require_tool, write_config

COLOUR = re.compile(r"\x1b\[[0-9;]*(?:3[0-7]|9[0-7]|38;[0-9;]+)m")  # a foreground colour
CLOCK = re.compile(r"\b0:0\d:\d\d\b")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(screen: str) -> str:
    """The text a person reads (the escape sequences that colour it removed)."""
    return ESCAPES.sub("", screen)


class Pane:
    """One tmux server (own socket) with one pane running `argv`; kept after the command ends."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True,
                              timeout=30, check=False)

    def capture(self) -> str:
        """The pane as shown, with its escape sequences (-e), scrollback included."""
        return self.tmux("capture-pane", "-p", "-e", "-J", "-S", "-", "-t", "t").stdout

    def dead(self) -> bool:
        return self.tmux("display-message", "-p", "-t", "t", "#{pane_dead}").stdout.strip() == "1"

    def watch(self, until: Callable[[str], bool], timeout: float, every: float = 0.3) -> list[str]:
        """Every distinct screen seen until `until(screen)` or the pane's command ended."""
        frames: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.capture()
            if not frames or frames[-1] != screen:
                frames.append(screen)
            if until(screen) or self.dead():
                return frames + [self.capture()]
            time.sleep(every)
        raise AssertionError(f"deadline passed after {timeout}s; last screen:\n{frames[-1] if frames else ''}")


@contextmanager
def tmux_pane(tmp_path: Path, argv: list[str], env: dict[str, str]) -> Iterator[Pane]:
    require_tool("tmux", "tmux")
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g remain-on-exit on\nset -g history-limit 5000\nset -g default-terminal screen-256color\n")
    pane = Pane(tmp_path / "tmux.sock")
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    started = subprocess.run(["tmux", "-S", str(pane.socket), "-f", str(conf), "new-session", "-d", "-s", "t",
                              "-x", "180", "-y", "45", *env_args, *argv],
                             capture_output=True, text=True, timeout=30, check=False)
    assert started.returncode == 0, started.stderr
    try:
        yield pane
    finally:
        pane.tmux("kill-server")


SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.progress import Event, Progress
    console = Path(sys.argv[1])
    with Progress("demo-x86_64", total=4, console_log=console) as p:
        p.step_event("prepare inputs")
        p.step_event("packer build (tcg, packer 1.6.6)")
        p.emit(Event("say", "Waiting for SSH to become available..."))
        p.emit(Event("artifact", "builder-id transcend.qemu"))
        for n in range(12):
            with console.open("a") as f:
                f.write(f"\\x1b[0mguest says {n}\\r\\n")
            time.sleep(0.5)
        p.emit(Event("error", "something went wrong (shown in red)"))
        p.step_event("verify (qemu-img check, sha256)")
        p.emit(Event("done", "published demo-x86_64.qcow2"))
    print("END")
""")


def run_script(tmp_path: Path, env: dict[str, str]) -> list[str]:
    script = tmp_path / "progress_demo.py"
    script.write_text(SCRIPT)
    console = tmp_path / "console.log"
    console.write_text("")
    with tmux_pane(tmp_path, [sys.executable, str(script), str(console)], {"PYTHONPATH": str(ROOT), **env}) as pane:
        return pane.watch(lambda screen: "END" in screen, timeout=60)


def test_live_view_in_a_terminal_shows_steps_clock_console_and_colour(tmp_path):
    frames = run_script(tmp_path, {"TERM": "screen-256color"})
    final, text = frames[-1], [plain(f) for f in frames]
    assert "==> [2/4] packer build (tcg, packer 1.6.6)" in text[-1] and "==> [3/4] verify" in text[-1]
    assert "Waiting for SSH to become available..." in text[-1] and "published demo-x86_64.qcow2" in text[-1]
    assert "builder-id" not in "".join(text)  # Packer's bookkeeping never reaches the screen
    assert COLOUR.search(final), "steps, errors and the done line are coloured on a terminal"
    red = next(line for line in final.splitlines() if "something went wrong" in line)
    assert re.search(r"\x1b\[[0-9;]*(31|91)m", red), repr(red)
    # the live footer while the step is quiet: N/M, a ticking clock, the console's last line
    footers = [f for f in text if "demo-x86_64 [2/4] packer build" in f and "console: guest says" in f]
    assert footers, "the footer showed the step and the guest console:\n" + text[len(text) // 2]
    clocks = {m.group(0) for f in footers for m in CLOCK.finditer(f)}
    consoles = {m.group(0) for f in footers for m in re.finditer(r"console: guest says \d+", f)}
    assert len(clocks) >= 2 and len(consoles) >= 2, "the footer keeps ticking and follows the console"
    assert "console: guest says" not in text[-1], "the footer is gone when the build ends"


def test_no_color_is_honoured_in_a_terminal(tmp_path):
    frames = run_script(tmp_path, {"TERM": "screen-256color", "NO_COLOR": "1"})
    assert "==> [2/4] packer build" in plain(frames[-1])
    assert not any(COLOUR.search(frame) for frame in frames), "NO_COLOR: no colour codes at all"


@pytest.mark.slow
def test_a_real_demo_build_in_a_terminal(demo_build, tmp_path):
    """`invoke build-demo` in a tmux pane: what a person sees of a real packer build under TCG."""
    for tool, pkg in (("packer", "packer"), ("qemu-system-x86_64", "qemu-system-x86")):
        require_tool(tool, pkg)
    _, shared = demo_build
    out = tmp_path / "out"
    (out / ".cache").mkdir(parents=True)
    for cached in ("debs", "resolved-packages.json"):  # the session's Debian packages: no re-download
        src = shared / ".cache" / cached
        if src.is_dir():
            shutil.copytree(src, out / ".cache" / cached)
        elif src.is_file():
            shutil.copy2(src, out / ".cache" / cached)
    cfg = write_config(tmp_path / "c.yaml", out)
    argv = [sys.executable, "-m", "invoke", "-f", str(cfg), "build-demo"]
    env = {"TERM": "screen-256color", "NIX_CONFIG": NIX_CONFIG, "PYTHONPATH": str(ROOT)}
    with tmux_pane(tmp_path, ["env", "-C", str(ROOT), *argv], env) as pane:
        frames = pane.watch(lambda screen: "published" in screen, timeout=600)
    final = plain(frames[-1])
    seen = "".join(plain(f) for f in frames)
    for step in ("[1/5] prepare inputs", "[2/5] packer build", "[3/5] verify", "[4/5] package list and SBOM",
                 "[5/5] publish"):
        assert step in final, step
    assert re.search(r"published .*demo-x86_64\.qcow2 \(\d+\.\d MiB, sha256 [0-9a-f]{12}…\) in 0:0\d:\d\d", final)
    for noise in ("builder-id", "files-count", "transcend.qemu", "qemu.demo-x86_64:", "PACKER_COMMA"):
        assert noise not in seen, noise
    assert not any(line.strip() == "end" for line in final.splitlines())
    assert COLOUR.search(frames[-1])
    assert any("demo-x86_64 [2/5] packer build" in plain(f) and CLOCK.search(plain(f)) for f in frames), "footer"
    log = next((out / "demo-x86_64" / "logs").glob("*/build.log")).read_text()
    assert "==> [2/5] packer build" in log and "\x1b[" not in log and "builder-id" not in log
