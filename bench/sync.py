"""Sync of an unchanged project tree to a builder: wall time and bytes (rsync --stats).

Starts a real sshd on 127.0.0.1 (alias hal9000), syncs a copy of the project once, then syncs
the unchanged tree RUNS times through pipeline.remote.sync over one open connection, and prints
the median wall time, the file data sent (goal: 0) and the bytes on the wire per sync.
Usage: python3 bench/sync.py [RUNS]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

from pipeline import remote
from tests.sshd_host import SshHost

runs = max(3, int(sys.argv[1]) if len(sys.argv) > 1 else 5)
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-sync-"))
host = SshHost(work / "sshd").start()
try:
    known = work / "known_hosts"
    known.write_text(host.known_hosts_line())
    ssh_config = host.client_config(work / "ssh_config", known)
    tree = work / "project"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "output", "__pycache__", ".pytest_cache", ".venv"))
    target = remote.Target("hal9000", "hal9000", str(work / "builder"), None, ssh_config)
    conn = remote.connect(target)
    try:
        first = remote.sync(conn, target, tree)
        print(f"first sync: {first.transferred} files, {first.literal} bytes file data, "
              f"{first.wire} bytes on the wire", flush=True)
        times, stats = [], []
        for _ in range(runs):
            start = time.perf_counter()
            stats.append(remote.sync(conn, target, tree))
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    wire = statistics.median(s.wire for s in stats)
    literal = max(s.literal for s in stats)
    print(f"unchanged sync: median {statistics.median(times):.3f}s over {runs} runs; file data sent "
          f"{literal} bytes (goal: 0); {wire:.0f} bytes on the wire ({100 * wire / first.total_size:.2f}% "
          f"of the {first.total_size} byte tree)")
finally:
    host.stop()
    shutil.rmtree(work, ignore_errors=True)
