"""`invoke console NAME`: the serial console of a running instance, on this terminal.

QEMU serves the guest's serial port on a unix socket in the state folder (serial.sock) and logs
everything the guest writes to console.log, whether anyone is attached or not. On a terminal,
the console is attached in raw mode until Ctrl-] (the guest keeps running; attach again any
time). Fed from a pipe (`printf 'uname -a\\n' | invoke console NAME`), what comes in is typed
into the console and what the guest answers is printed until it has been quiet for --quiet
seconds after the input ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path

from pipeline.base.errors import UsageError

DETACH = b"\x1d"  # Ctrl-]


def connect(sock: Path, name: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.fspath(sock))
    except OSError as exc:
        conn.close()
        raise UsageError(f"{name}: cannot attach to its serial console ({sock}: {exc.strerror or exc})",
                         "is it running? invoke status " + name) from None
    return conn


def attach(sock: Path, name: str, *, quiet: float = 2.0, say: Callable[[str], None] = print) -> int:
    """Relay this terminal (or pipe) and the guest's serial console; returns 0."""
    conn = connect(sock, name)
    try:
        if os.isatty(sys.stdin.fileno()):
            say(f"{name}: serial console attached (Ctrl-] detaches; the guest keeps running)")
            return _interactive(conn)
        return _piped(conn, quiet)
    finally:
        conn.close()


def _interactive(conn: socket.socket) -> int:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        while True:
            ready, _, _ = select.select([fd, conn], [], [])
            if fd in ready:
                data = os.read(fd, 1024)
                if not data or DETACH in data:
                    conn.sendall(data.split(DETACH, 1)[0])
                    return 0
                conn.sendall(data)
            if conn in ready:
                data = conn.recv(4096)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        os.write(sys.stdout.fileno(), b"\r\n")


def _piped(conn: socket.socket, quiet: float) -> int:
    """Type the input into the console; print the output until `quiet` seconds of silence after
    the input ended."""
    fd = sys.stdin.fileno()
    watching = [fd, conn]
    last = time.monotonic()
    while True:
        timeout = None if fd in watching else max(0.0, last + quiet - time.monotonic())
        ready, _, _ = select.select(watching, [], [], timeout)
        if not ready and fd not in watching:
            return 0
        if fd in ready:
            data = os.read(fd, 1024)
            if data:
                conn.sendall(data)
            else:
                watching.remove(fd)
            last = time.monotonic()
        if conn in ready:
            data = conn.recv(4096)
            if not data:
                return 0
            with contextlib.suppress(BrokenPipeError):
                os.write(sys.stdout.fileno(), data)
            last = time.monotonic()
