"""The probe against the real rsync on PATH, and the refusal of macOS's rsync through the CLI."""

import os
import subprocess
from pathlib import Path

from pipeline.builders import rsync
from tests.support import invoke, require_tool, write_config


def test_the_rsync_on_path_is_read_as_what_it_says_it_is():
    """Debian 12 (with its updates) has 3.5.0, the current lane 3.5.1: both pass the probe."""
    path = require_tool("rsync", "rsync")
    first = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    found = rsync.require_capable()
    assert found.flavor == "rsync" and ".".join(map(str, found.version)) in first.splitlines()[0]


def fake_rsync(folder: Path, output: str) -> str:
    """A stand-in `rsync` that prints a recorded `--version` (macOS's rsyncs cannot run here) and
    fails anything else; a PATH with it first, then the rest of this PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "version.txt").write_text(output)
    script = folder / "rsync"
    script.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec cat {folder / "version.txt"}\n'
                      'echo "rsync: unrecognized option" >&2\nexit 1\n')
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_macos_rsyncs_are_refused_before_a_fetch_connects(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out",
                       {"builders": {"nowhere": {"host": "nowhere.invalid", "dir": "/srv/imagepipe"}}})
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "rsync"
    for recorded, says in (("openrsync.txt", "openrsync"), ("rsync-2.6.9.txt", "rsync 2.6.9")):
        path = fake_rsync(tmp_path / recorded, (fixtures / recorded).read_text())
        res = invoke(["remote-fetch", "nowhere", "demo-x86_64"], cfg, env={"PATH": path}, timeout=120)
        assert res.returncode != 0 and says in res.stderr and "--append-verify" in res.stderr, res.stderr
        assert "hint:" in res.stderr and "Traceback" not in res.stderr
        assert "nowhere.invalid" not in res.stderr  # refused before any connection was tried
        assert not (tmp_path / "out" / "demo-x86_64").exists()
