"""SIGINT / SIGTERM mid-build: nothing left running, staging gone, last good image untouched."""

import hashlib
import os
import signal

import pytest

from tests.support import (
    Background,
    live_pids_mentioning,
    live_processes_mentioning,
    process_gone,
    published_copy,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_build(demo_build, tmp_path, sig):
    cfg, out = published_copy(demo_build, tmp_path, cache=True)
    published = out / "demo-x86_64" / "demo-x86_64.qcow2"
    before = hashlib.sha256(published.read_bytes()).hexdigest()
    current_before = os.readlink(out / "demo-x86_64" / "current")

    staging = str(out / "demo-x86_64" / ".staging")
    build = Background(cfg, ["build-demo"])
    try:
        build.wait_for("Waiting for SSH", "Starting VM")  # packer is starting QEMU
        wait_until(lambda: [p for p in live_processes_mentioning(staging) if "qemu" in p], 120,
                   "packer's QEMU of this build", lambda: "\n".join(live_processes_mentioning(staging)))
        seen = live_pids_mentioning(staging)
        build.proc.send_signal(sig)
        code = build.finish(timeout=120)
        rest = build.output()
        assert code != 0, rest
        assert "interrupted" in rest or "terminated" in rest
        wait_gone(staging, timeout=30)  # packer, QEMU and their helpers all stopped
        assert [p for p in seen if not process_gone(p)] == []
    finally:
        if build.proc.poll() is None:
            os.killpg(build.proc.pid, signal.SIGKILL)
    assert not (out / "demo-x86_64" / ".staging").exists()
    assert os.readlink(out / "demo-x86_64" / "current") == current_before
    assert hashlib.sha256(published.read_bytes()).hexdigest() == before
