"""Debian 13's virtiofsd (the Rust one, 1.13) on this host, for the shared-folder tests.

Its binary needs glibc 2.39, newer than Debian 12's, so it runs from a Debian 13 root (made once
by tests/lanes/roots.py and cached by content) through that root's own dynamic loader and
libraries: a small wrapper script, which imagepipe is given as `defaults.virtiofsd`, exactly as a
user points it at a virtiofsd of their own. It is the real daemon; only its libraries come from
the root.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

from tests.lanes import roots

SUITE = "trixie"
LIBS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")


def from_debian13(dest: Path) -> Path:
    """A wrapper at dest/virtiofsd that runs the Debian 13 root's virtiofsd here (root needed to
    make the root; the tarball is cached, so later sessions only unpack what virtiofsd needs)."""
    roots.require_root_and_tools()
    tar = roots.ensure_root(SUITE, ["virtiofsd"])
    root = dest / "debian13-root"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as archive:
        wanted = [m for m in archive.getmembers()
                  if m.name.lstrip("./").startswith(("usr/libexec/virtiofsd", "usr/lib64/", "lib64", "usr/lib/x86_64",
                                                     "lib/x86_64"))]
        archive.extractall(root, members=wanted, filter="tar")
    loader = root / "usr/lib64/ld-linux-x86-64.so.2"
    library_path = ":".join(str(root / lib) for lib in LIBS)
    wrapper = dest / "virtiofsd"
    wrapper.write_text(f'#!/bin/sh\nexec {loader} --library-path {library_path} {root}/usr/libexec/virtiofsd "$@"\n')
    wrapper.chmod(0o755)
    version = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "virtiofsd" in version.stdout, version.stdout + version.stderr
    return wrapper
