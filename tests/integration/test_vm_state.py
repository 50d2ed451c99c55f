"""State folders without a VM: stale pidfiles (of a VM an earlier imagepipe started from
output/<image>/run), `status`/`stop` on nothing, unbuilt images, ssh remainder."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.vm.state import StatePaths, state_paths
from tests.support import invoke, write_config

DEMO = "demo-x86_64"


def seed_state(out, pid: int) -> StatePaths:
    """A state folder as a VM leaves it, claiming `pid`."""
    state = state_paths(out, DEMO)
    state.root.mkdir(parents=True)
    for name, value in (("pid", str(pid)), ("ssh_port", "2224"), ("accel", "tcg\nwhy"),
                        ("started_at", "1"), ("build_id", "b1")):
        (state.root / name).write_text(value + "\n")
    state.console.write_text("boot messages\n")
    state.known_hosts.write_text("imagepipe-demo-x86_64 ssh-ed25519 AAAA\n")
    return state


def test_stale_pidfile_of_a_dead_process(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = seed_state(out, dead.pid)
    res = invoke(["status", "--json"], cfg, timeout=60, check=True)
    demo = next(i for i in json.loads(res.stdout)["images"] if i["image"] == DEMO)
    assert demo["state"] == "stopped" and demo["pid"] is None
    assert not state.pid.exists() and not state.ssh_port.exists()
    # what helps after a crash stays: the console log, the pinned key, the build id
    assert state.console.read_text() == "boot messages\n" and state.known_hosts.exists() and state.build_id.exists()


def test_stale_pidfile_of_a_live_process_that_is_not_qemu(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = seed_state(out, other.pid)  # a reused pid: alive, but not this VM's QEMU
        res = invoke(["stop", DEMO], cfg, timeout=60)
        assert res.returncode == 0 and "not running (removed a stale pidfile)" in res.stderr
        assert other.poll() is None, "stop must never signal a process that is not its QEMU"
        assert not state.pid.exists()
    finally:
        other.kill()
        other.wait()


def test_status_table_and_unbuilt_image(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out)
    table = invoke(["status"], cfg, timeout=60, check=True).stdout.splitlines()
    assert table[0].split()[:5] == ["IMAGE", "BUILT", "(UTC)", "SIZE", "STATE"]
    assert any(line.split()[:5] == [DEMO, "not", "built", "-", "stopped"] for line in table)
    run = invoke(["run-demo"], cfg, timeout=60)
    assert run.returncode == 2 and "has not been built yet" in run.stderr and "invoke build demo-x86_64" in run.stderr
    ssh = invoke(["ssh-demo", "--", "true"], cfg, timeout=60)
    assert ssh.returncode == 2 and "demo-x86_64 is not running" in ssh.stderr
    unknown = invoke(["stop", "nope"], cfg, timeout=60)
    assert unknown.returncode == 2 and "no instance called nope" in unknown.stderr
    nothing = invoke(["test-all"], cfg, timeout=60)
    assert nothing.returncode == 2 and "no image has been built yet" in nothing.stderr
    assert "not built" in nothing.stdout
