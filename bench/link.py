"""Fetch over a shaped link: a builder in a network namespace of its own behind a veth pair,
`tc tbf` at 100 Mbit/s and 1 Gbit/s, against plain `rsync -a` over the same ssh.

The builder (tests/support/sshd.builder_host) publishes two builds of a full OS image: the
Debian 13 image built here (debian13-x86_64) and a rebuild of it with one package added, or,
where this project has no Debian image, a stand-in: a qcow2 of an ext4 filesystem filled from
this machine's /usr, and a rebuild of it with /usr/lib/python3 added (bench/_standin.py).
Per case, ROUNDS rounds alternate (rotating who goes first):
  ours  `invoke remote-fetch hal9000 IMAGE` (compress: auto, the previous build as basis where
        the case has one, BLAKE3 verified as it lands, published) - a whole CLI run;
  raw   `rsync -a -e "ssh -F cfg" hal9000:FILE DIR/` into an empty folder: what a user's script
        does (for a rebuild: into a new build folder), unverified.
Cases and goals (raw/ours):
  first fetch, 100 Mbit/s            ≥ 2
  rebuilt image, 100 Mbit/s, the previous build here   ≥ 4
  first fetch, 1 Gbit/s              ≥ 1.2
Bytes on the link (both directions, the veth pair's counters) are printed beside each time and
named in the figure. Needs root (the namespace); the figures say which image was used.
Usage: python3 bench/link.py [ROUNDS] [--json]   (as root)
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
from _common import ROOT, Figure, alternate, count, figure, finish, say
from _standin import standin

from pipeline.builders import rsync
from tests.support import netns
from tests.support.sshd import SshHost, builder_host, fake_published

DEBIAN = "debian13-x86_64"
ADDED = "vim"          # the package the Debian rebuild adds
rounds = count(3)


def has_debian() -> bool:
    return DEBIAN in (yaml.safe_load((ROOT / "invoke.yaml").read_text()).get("images") or {})


class Bench:
    def __init__(self, work: Path, host: SshHost) -> None:
        self.work, self.host = work, host
        known = work / "known_hosts"
        known.write_text(host.known_hosts_line())
        self.ssh_config = host.client_config(work / "ssh_config", known)
        self.builder = work / "builder"
        self.image = DEBIAN if has_debian() else "demo-x86_64"
        self.cfg = work / "fetch.yaml"
        self.out = work / "out"
        self.cfg.write_text(yaml.safe_dump({
            "defaults": {"output_dir": str(self.out)}, "ssh_config_path": str(self.ssh_config),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(self.builder)}}}))
        self.builds: list[str] = []

    # ------------------------------------------------------------------ the builder's two builds

    def publish_two(self) -> str:
        """Build 1 and its rebuild, published on the builder; returns what they are."""
        if self.image == DEBIAN:
            for packages in ([], [ADDED]):
                cfg = self.work / "build.yaml"
                cfg.write_text(yaml.safe_dump({"defaults": {"output_dir": str(self.builder / "output")},
                                               "images": {DEBIAN: {"packages": packages}}}))
                res = subprocess.run([sys.executable, "-m", "invoke", "-f", str(cfg), "build", DEBIAN], cwd=ROOT,
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"the Debian build failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
                self.builds.append(os.readlink(self.builder / "output" / DEBIAN / "current").split("/")[-1])
            return f"{DEBIAN}, rebuilt with {ADDED} added"
        for n, extra in enumerate((False, True)):
            build_id = f"20261205T00000{n}Z-standin"
            fake_published(self.builder, build_id, standin(self.work / f"standin{n}.qcow2", extra=extra))
            self.builds.append(build_id)
        return "stand-in: ext4 from /usr in qcow2, rebuilt with /usr/lib/python3 added"

    def file(self, n: int) -> Path:
        return self.builder / "output" / self.image / "builds" / self.builds[n] / f"{self.image}.qcow2"

    def publish(self, n: int) -> None:
        """Make build n the builder's published one (as its own publish does)."""
        image_dir = self.builder / "output" / self.image
        tmp = image_dir / "current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(f"builds/{self.builds[n]}")
        os.replace(tmp, image_dir / "current")

    # ------------------------------------------------------------------ the sides

    def wire(self) -> int:
        assert self.host.netns is not None
        return self.host.netns.bytes_to_host() + self.host.netns.bytes_to_builder()

    def ours(self, before: Path | None, bytes_seen: list[int]) -> Callable[[], float]:
        argv = [sys.executable, "-m", "invoke", "-f", str(self.cfg), "remote-fetch", "hal9000", self.image]

        def run() -> float:
            shutil.rmtree(self.out, ignore_errors=True)
            if before is not None:  # the previous build published here, as after its own fetch
                subprocess.run(["cp", "-al", str(before), str(self.out)], check=True)
            start, wire = time.perf_counter(), self.wire()
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            took = time.perf_counter() - start
            bytes_seen.append(self.wire() - wire)
            if res.returncode != 0:
                sys.exit(f"ours failed:\n{res.stdout}{res.stderr}")
            say("  ours: " + " | ".join(line.split(": ", 1)[-1] for line in res.stderr.splitlines()[:2]))
            return took

        return run

    def raw(self, n: int, bytes_seen: list[int]) -> Callable[[], float]:
        argv = ["rsync", "-a", "-e", shlex.join(rsync.ssh_argv(self.ssh_config)), f"hal9000:{self.file(n)}"]
        dest = self.work / "raw"

        def run() -> float:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            start, wire = time.perf_counter(), self.wire()
            subprocess.run([*argv, f"{dest}/"], check=True)
            took = time.perf_counter() - start
            bytes_seen.append(self.wire() - wire)
            return took

        return run

    def case(self, name: str, rate: str, n: int, before: Path | None, limit: float) -> Figure:
        assert self.host.netns is not None
        self.host.netns.shape(rate)
        self.publish(n)
        ours_b: list[int] = []
        raw_b: list[int] = []
        t = alternate(rounds, {"ours": self.ours(before, ours_b), "rsync -a": self.raw(n, raw_b)}, f"{name}: ")
        mb = {k: statistics.median(v) / 1e6 for k, v in (("ours", ours_b), ("raw", raw_b))}
        say(f"{name}: bytes on the link, median: ours {mb['ours']:.1f} MB, rsync -a {mb['raw']:.1f} MB")
        size = self.file(n).stat().st_size / 2**20
        label = (f"{name} ({size:.0f} MiB; link bytes ours {mb['ours']:.0f} MB, rsync -a {mb['raw']:.0f} MB)")
        return figure(label, t["ours"], t["rsync -a"], ratio_of="raw/ours", op=">=", limit=limit)


def main() -> None:
    why = netns.unavailable()
    if why:
        sys.exit(f"link: {why} (run as root)")
    work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-link-"))
    try:
        with builder_host(work / "sshd", link="netns") as host:
            b = Bench(work, host)
            what = b.publish_two()
            say(f"image: {what}; builds {', '.join(b.builds)}")
            # build 1 fetched once (unshaped): the "previous build here" of the rebuilt case
            host.netns.shape(None)
            b.publish(0)
            subprocess.run([sys.executable, "-m", "invoke", "-f", str(b.cfg), "remote-fetch", "hal9000", b.image],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = work / "out-before"
            shutil.move(str(b.out), before)
            figures = [
                b.case("first fetch over 100 Mbit/s", "100mbit", 0, None, 2.0),
                b.case("rebuilt image over 100 Mbit/s, previous build here", "100mbit", 1, before, 4.0),
                b.case("first fetch over 1 Gbit/s", "1gbit", 0, None, 1.2),
            ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"image used: {what}")
    finish(figures)


if __name__ == "__main__":
    main()
