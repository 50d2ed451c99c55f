"""wait_for_banner against real loopback sockets: a port that holds connections (QEMU's user
network before the guest is up), one the guest closes at once (no sshd yet), then a banner."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from pipeline.base.errors import VerifyFailed
from pipeline.vm.ssh import wait_for_banner
from pipeline.vm.state import state_paths


class Guest:
    """A listener whose answer to each accepted connection is `behaviour(elapsed)`: "hold"
    (keep it open, say nothing), "close" (drop it at once), "banner", or "slow" (the banner a
    second later). Unlike QEMU it never
    completes a held connection later: the banner comes on a new one."""

    def __init__(self, behaviour: Callable[[float], str]) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open: set[socket.socket] = set()
        self.most_open = 0
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _sweep(self) -> None:
        """Forget the connections the client has closed (their EOF is queued by now)."""
        for conn in list(self.open):
            conn.setblocking(False)
            try:
                if conn.recv(16) == b"":
                    self.open.discard(conn)
                    conn.close()
            except BlockingIOError:
                pass
            except OSError:
                self.open.discard(conn)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._sweep()  # the client closes an old connection before it opens a new one
            self.accepted += 1
            what = self.behaviour(time.monotonic() - self.started)
            if what == "close":
                conn.close()
                continue
            if what == "banner":
                conn.sendall(b"SSH-2.0-test\r\n")
            if what == "slow":  # an sshd that takes a second to answer each connection
                threading.Timer(1.0, self._late_banner, (conn,)).start()
            self.open.add(conn)
            self.most_open = max(self.most_open, len(self.open))

    def _late_banner(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client may have given up on this one
            conn.sendall(b"SSH-2.0-slow\r\n")

    @contextmanager
    def running(self) -> Iterator[Guest]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            self.thread.join()
            for conn in self.open:
                conn.close()
            self.sock.close()


def test_held_connections_stay_few_and_the_banner_is_found(tmp_path):
    state = state_paths(tmp_path, "demo")
    guest = Guest(lambda t: "hold" if t < 1.5 else "banner")
    with guest.running():
        start = time.monotonic()
        wait_for_banner("demo", state, guest.port, deadline=20).close()
        took = time.monotonic() - start
    assert guest.most_open == 1  # one at a time (the slow one joins after 10 s): held ones reach sshd later
    assert 1.4 < took < 5


def test_a_guest_that_closes_at_once_is_tried_again(tmp_path):
    state = state_paths(tmp_path, "demo")
    guest = Guest(lambda t: "close" if t < 1.2 else "banner")
    with guest.running():
        wait_for_banner("demo", state, guest.port, deadline=20).close()
    # closed by the guest: the next try follows 0.1 s later (a slow machine makes fewer)
    assert guest.accepted >= 5 and guest.most_open == 1


def test_no_banner_within_the_deadline_names_the_port(tmp_path):
    state = state_paths(tmp_path, "demo")
    guest = Guest(lambda _t: "hold")
    with guest.running(), pytest.raises(VerifyFailed, match=f"no SSH answer on 127.0.0.1:{guest.port} within 1s"):
        wait_for_banner("demo", state, guest.port, deadline=1)
    assert guest.most_open == 1


def test_a_slow_sshd_is_waited_for(tmp_path):
    state = state_paths(tmp_path, "demo")
    guest = Guest(lambda _t: "slow")  # every banner comes after 1 s: the quick tries give up first
    with guest.running():
        start = time.monotonic()
        conn = wait_for_banner("demo", state, guest.port, deadline=20, slow_after=1.0)
        took = time.monotonic() - start
    assert conn is not None and conn.recv(64, socket.MSG_PEEK).startswith(b"SSH-2.0-slow")  # still unread
    conn.close()
    assert took < 5
