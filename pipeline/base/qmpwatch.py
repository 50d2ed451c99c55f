"""Watching the QMP socket of a QEMU that another program runs (Packer's build VM) for a write
that found the host's disk full. Stdlib only (a socket and json), so the drivers can use it
without the VM layer."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Self


class DiskFullWatch:
    """Reads the QMP events of the QEMU behind `path` (connecting when the socket appears) and
    calls `on_full(device)`, from the watching thread, on the first BLOCK_IO_ERROR that says
    the host's disk is full: QEMU raises it whatever the drive's werror says. QEMU gone, or a
    socket that never appears, is not an error."""

    def __init__(self, path: Path, on_full: Callable[[str], None]) -> None:
        self.path, self.on_full = path, on_full
        self.full: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qmp-disk-full", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set() and self.full is None:
            if self.path.exists():
                with contextlib.suppress(OSError, ValueError):
                    self._watch()
            self._stop.wait(0.5)

    def _watch(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(os.fspath(self.path))
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')  # events flow once negotiated
            sock.settimeout(0.5)
            buffer = b""
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return  # QEMU is gone
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    device = nospace_device(line)
                    if device is not None:
                        self.full = device
                        self.on_full(device)
                        return


def nospace_device(line: bytes) -> str | None:
    """The device of a BLOCK_IO_ERROR event for a full disk (one line of QMP), else None."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("event") != "BLOCK_IO_ERROR":
        return None
    data = message.get("data")
    if not isinstance(data, dict):
        return None
    if not (data.get("nospace") or "No space left" in str(data.get("reason", ""))):
        return None
    return str(data.get("device") or data.get("node-name") or "a disk")


def short_socket_dir(prefix: str = "imagepipe-qmp-") -> Path:
    """A new 0700 folder for a unix socket (sun_path holds ~100 bytes: a short base)."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
