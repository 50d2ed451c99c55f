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
    """A file server that also answers `Range: bytes=N-` (206 + Content-Range, or 416 past the
    end), as real mirrors do; SimpleHTTPRequestHandler alone ignores Range. `cut_once` maps a path
    to a byte count: its first download stops after that many bytes (a dropped connection)."""

    hits: list[str]
    ranges: list[str | None]
    cut_once: dict[str, int]

    def log_message(self, fmt: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.ranges.append(self.headers.get("Range"))
        path = Path(self.translate_path(self.path))
        wanted = self.headers.get("Range")
        if not path.is_file() or (wanted is None and self.path not in self.cut_once):
            super().do_GET()
            return
        data = path.read_bytes()
        start = int(wanted.split("=", 1)[1].split("-", 1)[0]) if wanted else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = self.cut_once.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True


@contextlib.contextmanager
def serve(directory: Path, *, ranges: list[str | None] | None = None,
          cut_once: dict[str, int] | None = None) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 serving `directory` (with Range); yields (base URL,
    requested paths). `ranges` collects each request's Range header; see _Quiet for `cut_once`."""
    hits: list[str] = []
    attrs = {"hits": hits, "ranges": ranges if ranges is not None else [], "cut_once": cut_once or {}}
    handler = type("Handler", (_Quiet,), attrs)
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
