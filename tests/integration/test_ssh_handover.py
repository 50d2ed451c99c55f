"""`invoke ssh` logs in over the connection that brought sshd's banner: a real sshd, the real
OpenSSH client with ProxyUseFdpass, and sshd's own log counting the connections it accepted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pipeline.vm.ssh import hand_over, wait_for_banner
from pipeline.vm.state import state_paths
from tests.support.sshd import SshHost


def accepted(host: SshHost) -> int:
    return host.log.read_text().count("Connection from 127.0.0.1")


def test_the_login_rides_the_banner_connection(tmp_path: Path) -> None:
    host = SshHost(tmp_path / "sshd", extra_config=("LogLevel VERBOSE",)).start()
    try:
        known = tmp_path / "known_hosts"
        known.write_text(host.known_hosts_line())
        cfg = host.client_config(tmp_path / "ssh_config", known)
        state = state_paths(tmp_path / "out", "demo")
        time.sleep(0.3)  # the start-up check's connection is logged by now
        before = accepted(host)
        wait_for_banner("demo", state, host.port, deadline=20).close()  # what the wait alone costs sshd
        time.sleep(0.3)
        waiting = accepted(host) - before
        assert waiting >= 1
        before = accepted(host)
        conn = wait_for_banner("demo", state, host.port, deadline=20)
        assert conn is not None
        with hand_over(conn) as via:
            assert via[:2] == ["-o", "ProxyUseFdpass=yes"]
            res = subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", *via, "hal9000", "echo", "handed", "over"],
                                 capture_output=True, text=True, timeout=60, check=False, env={"SHELL": "/bin/sh",
                                                                                                "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "handed over"
        time.sleep(0.3)
        assert accepted(host) - before == waiting  # the login rode the banner's connection: none more
        assert not list(Path(via[3].split()[-1].strip("'")).parent.glob("*"))  # the socket folder is gone
    finally:
        host.stop()


def test_a_connection_ssh_never_asks_for_is_closed(tmp_path: Path) -> None:
    host = SshHost(tmp_path / "sshd").start()
    try:
        conn = wait_for_banner("demo", state_paths(tmp_path / "out", "demo"), host.port, deadline=20)
        assert conn is not None
        with hand_over(conn) as via:
            folder = Path(via[3].split()[-1].strip("'")).parent
            assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
            left = time.monotonic()
        assert time.monotonic() - left < 2  # the serving thread is woken, not waited out
        assert conn.fileno() == -1 and not folder.exists()
    finally:
        host.stop()
