"""Fetch of a 1 GiB image from a builder vs plain rsync over the same ssh; re-fetch bytes.

Starts a real sshd on 127.0.0.1 (alias hal9000, as in the tests) with a published 1 GiB image on
the builder side, once dense (every cluster written) and once sparse (holes). For each, it
alternates `invoke remote-fetch-demo hal9000` (rsync + sha256 + qemu-img check + atomic publish,
into an empty output dir) with a plain `rsync -e "ssh -F cfg" hal9000:FILE DIR/` (PAIRS times),
and prints the medians and speed ratio raw/ours (goal >= 0.95). Then a re-fetch of the unchanged
image: bytes on the loopback link as a share of the image size (goal <= 1%).
Usage: python3 bench/fetch.py [PAIRS]
"""

from __future__ import annotations

import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import timed

from pipeline import rsync
from tests.sshd_host import SshHost, dense_qcow2, fake_published, sparse_qcow2

pairs = max(3, int(sys.argv[1]) if len(sys.argv) > 1 else 3)
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-fetch-"))
LO = Path("/sys/class/net/lo/statistics")


def lo_bytes() -> int:
    """Bytes through the loopback interface so far (shared machine: other traffic adds noise)."""
    return int((LO / "rx_bytes").read_text())


host = SshHost(work / "sshd").start()
try:
    known = work / "known_hosts"
    known.write_text(host.known_hosts_line())
    ssh_config = host.client_config(work / "ssh_config", known)
    for kind, make in (("dense", dense_qcow2), ("sparse", sparse_qcow2)):
        builder = work / f"builder-{kind}"
        fake_published(builder, f"20261123T000000Z-{kind}", make(work / f"{kind}.qcow2"))
        remote_file = builder / "output/demo-x86_64/current/demo-x86_64.qcow2"
        size = remote_file.stat().st_size
        out = work / f"out-{kind}"
        cfg = work / f"{kind}.yaml"
        cfg.write_text(yaml.safe_dump({"defaults": {"output_dir": str(out)}, "ssh_config_path": str(ssh_config),
                                       "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}}))
        ours_argv = [sys.executable, "-m", "invoke", "-f", str(cfg), "remote-fetch-demo", "hal9000"]
        raw_dir = work / "raw"
        raw_argv = ["rsync", "-e", shlex.join(rsync.ssh_argv(ssh_config)), f"hal9000:{remote_file.resolve()}",
                    f"{raw_dir}/"]
        ours, raw = [], []
        for i in range(pairs):
            shutil.rmtree(out, ignore_errors=True)
            ours.append(timed(ours_argv))
            shutil.rmtree(raw_dir, ignore_errors=True)
            raw_dir.mkdir()
            raw.append(timed(raw_argv))
            print(f"{kind} pair {i + 1}: ours {ours[-1]:.2f}s, raw rsync {raw[-1]:.2f}s", flush=True)
        m_ours, m_raw = statistics.median(ours), statistics.median(raw)
        print(f"fetch {size / 2**30:.2f} GiB {kind}: ours median {m_ours:.2f}s, raw rsync median {m_raw:.2f}s, "
              f"speed ratio raw/ours {m_raw / m_ours:.3f}  (goal: >= 0.95)", flush=True)

        before, start = lo_bytes(), time.perf_counter()
        timed(ours_argv)  # unchanged: the manifest says the local image already has that sha256
        moved, took = lo_bytes() - before, time.perf_counter() - start
        print(f"re-fetch unchanged {kind}: {moved} bytes on loopback = {100 * moved / size:.4f}% of the image, "
              f"{took:.2f}s  (goal: <= 1%)", flush=True)
finally:
    host.stop()
    shutil.rmtree(work, ignore_errors=True)
