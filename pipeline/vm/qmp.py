"""A tiny QMP client over a VM's unix socket (stdlib socket + json): how imagepipe asks QEMU
for its status, an ACPI power-off or `quit`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Self

from pipeline.base.errors import QmpError


class Qmp:
    """A tiny QMP client over the VM's unix socket (stdlib socket + json)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"cannot connect to QMP socket {path}: {exc.strerror or exc}") from None
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"{path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP socket closed")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one command; return its "return" value (events on the way are skipped)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")

    def quit(self) -> None:
        """`quit`: QEMU may close the socket before or after answering."""
        with contextlib.suppress(EOFError, OSError):
            self.execute("quit")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_full(path: Path, timeout: float = 5.0) -> str | None:
    """Whether the VM behind this QMP socket stopped because a write found the host's disk full
    (QEMU's default for a disk: werror=enospc pauses the guest, status io-error): the device
    that said so, else None (running, another stop, or no answer)."""
    try:
        with Qmp(path, timeout=timeout) as qmp:
            if qmp.execute("query-status").get("status") != "io-error":
                return None
            full = [b.get("device") or b.get("qdev") or "a disk" for b in qmp.execute("query-block")
                    if b.get("io-status") == "nospace"]
    except (QmpError, OSError, EOFError, ValueError):
        return None
    return full[0] if full else None
