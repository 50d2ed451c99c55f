"""Fetch of a 1 GiB image from a builder vs plain rsync, and vs rsync followed by sha256.

Starts a real sshd on 127.0.0.1 (alias hal9000, as in the tests) with a published 1 GiB image on
the builder side, once dense (every cluster written) and once sparse (holes). For each, ROUNDS
rounds run, in rotating order:
  ours        `invoke remote-fetch-demo hal9000` into an empty output dir (manifest, rsync,
              sha256 verified, format check, atomic publish) - a whole CLI run;
  rsync       a plain `rsync -e "ssh -F cfg" hal9000:FILE DIR/`;
  rsync+sha   the same rsync, then the fastest sha256 tool here (sha256sum or openssl dgst,
              picked once) over the received file: the least any verified fetch must do;
  ssh|tee|sha one ssh (AES-GCM where the CPU has AES, as ours offers) running `cat FILE`, piped
              through `tee FILE` into that sha256 tool: the least a verified transfer can be
              made of, printed for reference (no goal).
Each side's whole-machine CPU-seconds are printed too: both ends of the loopback share the cores.
Figures: speed ratio rsync/ours (goal ≥ 0.95) and (rsync+sha)/ours (goal ≥ 1: ours must not
be slower than that), then a re-fetch of the unchanged image: bytes on the loopback link as a
share of the image size, least of 3 runs (goal ≤ 1 %).
Usage: python3 bench/fetch.py [ROUNDS] [--json]
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from _common import Figure, alternate, count, figure, finish, say, timed

from pipeline.builders import openssh, rsync
from tests.support.sshd import SshHost, dense_qcow2, fake_published, sparse_qcow2

LO = Path("/sys/class/net/lo/statistics")
TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu() -> float:
    """CPU-seconds every core has spent busy so far (both ends of the loopback run here)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def lo_bytes() -> int:
    """Bytes through the loopback interface so far (shared machine: other traffic adds noise)."""
    return int((LO / "rx_bytes").read_text())


def fastest_sha256(work: Path) -> list[str]:
    """argv prefix of the faster of `sha256sum` and `openssl dgst -sha256` on this machine."""
    sample = work / "sample"
    with open(sample, "wb") as f:
        f.write(b"\x5a" * (64 << 20))
    tools = [["sha256sum"], ["openssl", "dgst", "-sha256"]]
    best = min(tools, key=lambda t: min(timed([*t, str(sample)]) for _ in range(3)))
    sample.unlink()
    return best


def main() -> None:
    rounds = count(5, minimum=3)
    work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-fetch-"))
    host = SshHost(work / "sshd").start()
    figures = []
    try:
        known = work / "known_hosts"
        known.write_text(host.known_hosts_line())
        ssh_config = host.client_config(work / "ssh_config", known)
        sha = fastest_sha256(work)
        say(f"sha256 tool for the rsync+sha side: {shlex.join(sha)}")
        for kind, make in (("dense", dense_qcow2), ("sparse", sparse_qcow2)):
            figures += bench_kind(work, ssh_config, kind, make, sha, rounds)
    finally:
        host.stop()
        shutil.rmtree(work, ignore_errors=True)
    finish(figures)


def bench_kind(work: Path, ssh_config: Path, kind: str, make: Callable[[Path], Path], sha: list[str],
               rounds: int) -> list[Figure]:
    """The three sides alternated over one published image, then the unchanged re-fetch."""
    builder = work / f"builder-{kind}"
    fake_published(builder, f"20261123T000000Z-{kind}", make(work / f"{kind}.qcow2"))
    remote_file = (builder / "output/demo-x86_64/current/demo-x86_64.qcow2").resolve()
    size = remote_file.stat().st_size
    out, raw_dir = work / f"out-{kind}", work / "raw"
    cfg = work / f"{kind}.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"output_dir": str(out)}, "ssh_config_path": str(ssh_config),
                                   "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}}))
    ours_argv = [sys.executable, "-m", "invoke", "-f", str(cfg), "remote-fetch-demo", "hal9000"]
    raw_argv = ["rsync", "-e", shlex.join(rsync.ssh_argv(ssh_config)), f"hal9000:{remote_file}", f"{raw_dir}/"]

    def ours() -> float:
        shutil.rmtree(out, ignore_errors=True)
        return timed(ours_argv)

    def raw(verify: bool = False) -> float:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir()
        start = time.perf_counter()
        subprocess.run(raw_argv, check=True, stdout=subprocess.DEVNULL)
        if verify:
            subprocess.run([*sha, str(raw_dir / remote_file.name)], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    cpu: dict[str, list[float]] = {}
    # The least a verified transfer can be, from raw tools: one ssh (AES-GCM where this CPU has
    # AES, as ours offers) streaming the file through tee into the file and into sha256.
    bare_ssh = [*rsync.ssh_argv(ssh_config, ["-c", "aes128-gcm@openssh.com"] if openssh.cpu_has_aes() else []),
                "hal9000", "cat", "--", str(remote_file)]

    def bare() -> float:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir()
        start = time.perf_counter()
        src = subprocess.Popen(bare_ssh, stdout=subprocess.PIPE)
        tee = subprocess.Popen(["tee", str(raw_dir / remote_file.name)], stdin=src.stdout, stdout=subprocess.PIPE)
        assert src.stdout is not None and tee.stdout is not None
        src.stdout.close()
        hashed = subprocess.run(sha, stdin=tee.stdout, stdout=subprocess.PIPE, check=True)
        tee.stdout.close()
        if src.wait() or tee.wait() or len(hashed.stdout.split()) < 1:
            raise RuntimeError("ssh | tee | sha256 failed")
        return time.perf_counter() - start

    def with_cpu(name: str, side: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            before = busy_cpu()
            took = side()
            cpu.setdefault(name, []).append(busy_cpu() - before)
            return took
        return run

    t = alternate(rounds, {"ours": with_cpu("ours", ours), "rsync": with_cpu("rsync", raw),
                           "rsync+sha": with_cpu("rsync+sha", lambda: raw(True)),
                           "ssh|tee|sha": with_cpu("ssh|tee|sha", bare)}, f"{kind} ")
    med = {n: statistics.median(v) for n, v in cpu.items()}
    cores = os.cpu_count() or 1
    say(f"{kind} CPU-seconds, whole machine, median: " + ", ".join(f"{n} {v:.2f}" for n, v in med.items())
        + f"; with {cores} cores ours cannot take less than {med['ours'] / cores:.2f} s, "
        f"{statistics.median(t['rsync']) / (med['ours'] / cores):.2f}x rsync's median time at best")
    say(f"{kind} the bare verified stream (ssh | tee | sha256, no rsync, no CLI): median "
        f"{statistics.median(t['ssh|tee|sha']):.2f} s, rsync/that "
        f"{statistics.median(t['rsync']) / statistics.median(t['ssh|tee|sha']):.3f}")
    gib = f"{size / 2**30:.2f} GiB {kind}"
    figures = [figure(f"fetch {gib} vs rsync", t["ours"], t["rsync"], ratio_of="raw/ours", op=">=", limit=0.95),
               figure(f"fetch {gib} vs rsync+sha256", t["ours"], t["rsync+sha"], ratio_of="raw/ours",
                      op=">=", limit=1.0)]

    moved = []
    for _ in range(3):  # other traffic on the shared loopback only adds: the least of 3 runs
        before, start = lo_bytes(), time.perf_counter()
        timed(ours_argv)  # unchanged: the manifest says the local image already has that sha256
        moved.append(lo_bytes() - before)
        say(f"re-fetch unchanged {kind}: {moved[-1]} bytes on loopback in {time.perf_counter() - start:.2f}s")
    figures.append(figure(f"re-fetch unchanged {kind}: loopback bytes / image", 100 * min(moved) / size, unit="%",
                          ratio_of="", op="<=", limit=1.0))
    return figures


if __name__ == "__main__":
    main()
