"""HTTP downloads that resume and verify: a `.part` file continued with a Range request, every
byte hashed as it arrives, progress (bytes, speed, ETA) for the build's view, and a sha256 index
so a large local file is hashed once. Nothing here knows what is downloaded (pipeline.iso does)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.base.errors import ChecksumMismatch, NotFound
from pipeline.base.fsutil import atomic_write
from pipeline.output.artifacts import sha256_file
from pipeline.progress import transfer_text

Report = Callable[[str], None]

TIMEOUT = 30.0
CHUNK = 1 << 20


def open_url(url: str | urllib.request.Request, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
    """urlopen that maps 404/410 to NotFound and leaves other errors to the caller."""
    _resolvable(urllib.parse.urlsplit(url.full_url if isinstance(url, urllib.request.Request) else url))
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise NotFound(getattr(url, "full_url", url)) from None
        raise


def _resolvable(parts: urllib.parse.SplitResult) -> None:
    """Look the host up before urlopen builds a TLS context (loading the CA bundle costs ~40 ms):
    an offline or air-gapped host fails here at once, as urlopen would (URLError). Skipped when a
    proxy resolves names instead of this host."""
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        return
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    try:
        socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise urllib.error.URLError(exc) from None


def reason(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection closed with {exc.expected} bytes still to come"
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def cached_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a local file, remembered by (size, mtime) so a 1 GB ISO is hashed once."""
    st = path.stat()
    index_path = cache_dir / "sha256-index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        index = {}
    key = str(path.resolve())
    hit = index.get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    digest = sha256_file(path)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(index_path, json.dumps(index, indent=1, sort_keys=True))
    return digest


def fetch_verified(url: str, dest: Path, sha256: str, report: Report | None = None) -> Path:
    """Fetch `url` to `dest` via dest.part, check sha256, then rename. Network errors propagate
    (the .part is kept for the next try); a mismatch removes the .part and raises ChecksumMismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    _fetch_into(url, part, h, dest.name, report)
    if h.hexdigest() != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(h.hexdigest())
    part.replace(dest)
    return dest


def _fetch_into(url: str, part: Path, h: Any, name: str, report: Report | None) -> None:
    """Download `url` into `part` (resuming what it holds), feeding every byte to `h`."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = open_url(request)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:  # 416: nothing left after `have`: the .part is complete
            raise
        _hash_file(part, h)
        return
    with resp:
        resumed = have and resp.status == 206 and _range_start(resp.headers.get("Content-Range")) == have
        if resumed:
            _hash_file(part, h)
        else:
            have = 0  # the server sent the whole file
        length = int(resp.headers.get("Content-Length") or 0)
        meter = _Meter(name, have + length if length else None, have, report)
        got = 0
        with open(part, "ab" if resumed else "wb") as out:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                meter.add(len(chunk))
        if length and got < length:  # read(n) ends quietly when the connection drops early
            raise http.client.IncompleteRead(b"", length - got)
        meter.finish()


def _range_start(content_range: str | None) -> int | None:
    """`bytes 100-999/1000` -> 100 (None when absent or not understood)."""
    m = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)$", (content_range or "").strip())
    return int(m.group(1)) if m else None


def _hash_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


class _Meter:
    """Bytes, speed and ETA of one download, reported through the build's progress view."""

    def __init__(self, name: str, total: int | None, start: int, report: Report | None) -> None:
        self.name, self.total, self.start, self.done = name, total, start, start
        self.report = report
        self.began = time.monotonic()
        self.shown = 0.0

    def rate(self) -> float:
        took = time.monotonic() - self.began
        return (self.done - self.start) / took if took > 0 else 0.0

    def add(self, n: int) -> None:
        self.done += n
        self._send(final=False)

    def finish(self) -> None:
        self._send(final=True)

    def _send(self, *, final: bool) -> None:
        if self.report is None:
            return
        transfer = getattr(self.report, "transfer", None)
        if transfer is not None:  # the progress view throttles and places it itself
            transfer(self.name, self.done, self.total, self.rate(), final=final, resumed_at=self.start)
            return
        now = time.monotonic()
        if final or now - self.shown >= 5.0:
            self.shown = now
            self.report(transfer_text(self.name, self.done, self.total, self.rate(), final=final,
                                      resumed_at=self.start))
