"""The hashes of a build's files: sha256 (SHA256SUMS, what users check with `sha256sum -c`) and
BLAKE3, the fast one a fetch verifies with.

sha256 runs at 0.4 GB/s on a CPU without SHA instructions (1.6 GB/s with them); BLAKE3 (PyPI
`blake3`, SIMD) at several GB/s on one core of either. A build takes both in one read of each
file at publish; a fetch then needs only BLAKE3 to know it holds the bytes the builder hashed,
which makes their sha256 in SHA256SUMS true here as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

SHA256 = "sha256"
FAST = "blake3"
CHUNK = 4 << 20  # bytes per read; both hashes release the GIL on buffers this large


class Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


def has_fast() -> bool:
    """Whether this Python has BLAKE3 (a dependency of the project; a builder whose venv predates
    it records sha256 only, and its fetches verify sha256)."""
    try:
        import blake3  # noqa: F401, PLC0415 (3.7 ms: loaded when a file is hashed, not on no-op runs)
    except ImportError:
        return False
    return True


def new(algorithm: str) -> Hasher:
    """A fresh hasher for "sha256" or "blake3"."""
    if algorithm == FAST:
        import blake3  # noqa: PLC0415 (3.7 ms: loaded when a file is hashed, not on no-op runs)

        return blake3.blake3()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown hash {algorithm!r}")


def of_file(path: Path, algorithms: Sequence[str] = (SHA256,)) -> dict[str, str]:
    """Each named hash of the file at `path`, in one read."""
    hashers = {a: new(a) for a in algorithms}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for h in hashers.values():
                h.update(view[:n])
    return {a: h.hexdigest() for a, h in hashers.items()}
