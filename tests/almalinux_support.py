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
    clearsign(folder / "CHECKSUM")  # as AlmaLinux's are (tests trust the signer: trust_test_signer)
    return hashlib.sha256(payload).hexdigest()


@functools.cache
def mirror_signer() -> tuple[Path, Path]:
    """A signing key made for this test run (GnuPG home, public key file): the loopback mirror's
    CHECKSUM files are clear-signed with it, as AlmaLinux signs its own, and tests trust it
    through IMAGEPIPE_ALMA_KEY. Made once per process, in a private temporary folder."""
    import shutil
    import subprocess
    import tempfile

    gpg = shutil.which("gpg")
    assert gpg, "gpg not found: install it with `sudo apt-get install gnupg` (.ci/run does)"
    home = Path(tempfile.mkdtemp(prefix="imagepipe-test-gpg-"))
    home.chmod(0o700)
    subprocess.run([gpg, "--batch", "--homedir", str(home), "--passphrase", "", "--quick-gen-key",
                    "imagepipe test mirror <mirror@example.invalid>", "ed25519", "sign", "never"],
                   check=True, capture_output=True, timeout=120)
    public = home / "mirror-key.asc"
    subprocess.run([gpg, "--batch", "--homedir", str(home), "--armor", "--output", str(public), "--export"],
                   check=True, capture_output=True, timeout=60)
    return home, public


def clearsign(path: Path, home: Path | None = None) -> None:
    """Clear-sign the text file `path` in place with the test signer (or the GnuPG home given)."""
    import subprocess

    home = home or mirror_signer()[0]
    signed = path.with_name(path.name + ".asc")
    subprocess.run(["gpg", "--batch", "--homedir", str(home), "--yes", "--clearsign", "--output", str(signed), str(path)],
                   check=True, capture_output=True, timeout=60)
    signed.replace(path)


def trust_test_signer(monkeypatch) -> Path:  # type: ignore[no-untyped-def]
    """IMAGEPIPE_ALMA_KEY = the test signer's public key, for this test (and the invoke it runs)."""
    public = mirror_signer()[1]
    monkeypatch.setenv("IMAGEPIPE_ALMA_KEY", str(public))
    return public
