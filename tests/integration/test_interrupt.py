"""SIGINT / SIGTERM mid-build: nothing left running, staging gone, last good image untouched."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NIX_CONFIG, ROOT, write_config

pytestmark = pytest.mark.slow


def pids_mentioning(text: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and str(os.getpid()) != entry.name:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_build(demo_build, tmp_path, sig):
    _, out_src = demo_build
    out = tmp_path / "output"
    shutil.copytree(out_src, out, symlinks=True)
    cfg = write_config(tmp_path / "test.yaml", out)
    published = out / "demo-x86_64" / "demo-x86_64.qcow2"
    before = hashlib.sha256(published.read_bytes()).hexdigest()
    current_before = os.readlink(out / "demo-x86_64" / "current")

    proc = subprocess.Popen([sys.executable, "-m", "invoke", "-f", str(cfg), "build-demo"], cwd=ROOT,
                            env={**os.environ, "NIX_CONFIG": NIX_CONFIG}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()
    lines = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until packer has started QEMU
        lines.append(line)
        if "Waiting for SSH" in line or "Starting VM" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    time.sleep(1)
    seen = pids_mentioning(str(out / "demo-x86_64" / ".staging"))
    assert any("qemu" in (Path(f"/proc/{p}/cmdline").read_text(errors="replace")) for p in seen if alive(p)), seen
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, rest
    assert "interrupted" in rest or "terminated" in rest
    time.sleep(0.5)
    assert [p for p in seen if alive(p)] == []
    assert pids_mentioning(str(out / "demo-x86_64" / ".staging")) == set()
    assert not (out / "demo-x86_64" / ".staging").exists()
    assert os.readlink(out / "demo-x86_64" / "current") == current_before
    assert hashlib.sha256(published.read_bytes()).hexdigest() == before
