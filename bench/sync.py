"""Sync of an unchanged project tree to a builder: file data sent, and time vs plain rsync.

Starts a real sshd on 127.0.0.1 (alias hal9000), syncs a copy of the project once, then
alternates, RUNS times, a sync of the unchanged tree through pipeline.builders.remote.sync over one open
connection with the plain rsync command line it runs (same options, same ssh). Goals: no file
data sent (0 bytes, issue 14's figure), and the sync within 1.5× of that rsync - this script's
own bound: its only extra is one `mkdir -p` over the open connection, a fixed round trip that
weighs on a sub-second run, while a second handshake or per-file work would break it.
Usage: python3 bench/sync.py [RUNS] [--json]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import alternate, count, figure, finish, say, timed

from pipeline.builders import remote, rsync
from tests.support import checkout_copy
from tests.support.sshd import SshHost

runs = count(5, minimum=3)
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-sync-"))
host = SshHost(work / "sshd").start()
try:
    known = work / "known_hosts"
    known.write_text(host.known_hosts_line())
    ssh_config = host.client_config(work / "ssh_config", known)
    tree = work / "project"
    checkout_copy(tree)
    target = remote.Target("hal9000", "hal9000", str(work / "builder"), None, ssh_config)
    conn = remote.connect(target)
    try:
        first = remote.sync(conn, target, tree)
        say(f"first sync: {first.transferred} files, {first.literal} bytes file data, {first.wire} bytes on the wire")
        stats: list[rsync.Stats] = []

        def ours() -> float:
            start = time.perf_counter()
            stats.append(remote.sync(conn, target, tree))
            return time.perf_counter() - start

        raw_argv = rsync.push_argv(tree, target.host, target.dir, ssh_config)
        t = alternate(runs, {"sync": ours, "rsync": lambda: timed(raw_argv)}, "unchanged ")
    finally:
        conn.close()
finally:
    host.stop()
    shutil.rmtree(work, ignore_errors=True)
wire = statistics.median(s.wire for s in stats)
say(f"unchanged sync: {wire:.0f} bytes on the wire ({100 * wire / first.total_size:.2f}% of the "
    f"{first.total_size} byte tree)")
finish([figure("unchanged sync: file data sent", max(s.literal for s in stats), unit="B", ratio_of="",
               op="<=", limit=0),
        figure("unchanged sync vs plain rsync", t["sync"], t["rsync"], op="<=", limit=1.5)])
