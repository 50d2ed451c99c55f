"""Shared helpers for the AlmaLinux tests: a project copy, running invoke, a loopback mirror."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

BOOT_ISO = "AlmaLinux-{v}-{a}-boot.iso"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def log_message(self, fmt: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 serving `directory`; yields (base URL, requested paths)."""
    hits: list[str] = []
    handler = type("Handler", (_Quiet,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (a connection is refused, as offline)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_release(base: Path, version: str, arch: str, payload: bytes, extra: dict[str, bytes] | None = None) -> str:
    """<base>/<version>/isos/<arch>/ with a boot ISO and a CHECKSUM in AlmaLinux's format; its sha256."""
    import hashlib

    folder = base / version / "isos" / arch
    folder.mkdir(parents=True, exist_ok=True)
    files = {BOOT_ISO.format(v=version, a=arch): payload, **(extra or {})}
    lines = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        lines += [f"# {name}: {len(data)} bytes", f"SHA256 ({name}) = {hashlib.sha256(data).hexdigest()}"]
    (folder / "CHECKSUM").write_text("\n".join(lines) + "\n")
    return hashlib.sha256(payload).hexdigest()
