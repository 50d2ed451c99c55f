"""NixOS on a builder: nix's ssh-ng route vs the project-sync route, for a build and a no-op.

Starts a real sshd on 127.0.0.1 (alias hal9000) whose sessions read a builder nix.conf
(NIX_CONF_DIR: kvm, no sandbox), copies the project with nixos-x86_64 built from the fixture
flake (tests/fixtures/nixflake, its kvm-image output), and gives this side's nix a chroot store
of its own, so what crosses between the two stores really crosses (this machine's /nix/store
is the builder's). Each route publishes into its own output folder.

  build   ours: `invoke build-nixos-x86 --builder hal9000` (evaluate here, build in the
          builder's store over ssh-ng, rsync the image back, verify, publish);
          raw:  `invoke remote-build-nixos-x86 hal9000 --sync` then `invoke remote-fetch-nixos-x86
          hal9000` (rsync the project, check the builder's venv, run imagepipe there, fetch).
          Every run first writes a new nonce into the flake: a new derivation, really built.
  no-op   nothing changed: ours `build-nixos-x86 --builder hal9000 --if-changed` (the input hash
          is decided here, nothing connects); raw `rebuild --remote hal9000 --image nixos-x86_64`
          (sync, `build --if-changed` there, fetch skipped).

Goals: the ssh-ng route no slower than the project-sync route for a build (ours/raw ≤ 1), and a
no-op at most a quarter of the sync route's (ours/raw ≤ 0.25: no sync, no remote Python).
Usage: python3 bench/nix_route.py [PAIRS] [--json]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import yaml
from _common import ROOT, alternate, count, figure, finish, say, timed

from tests.support import checkout_copy
from tests.support.sshd import SshHost

BASE_NIX = ["build-users-group =", "sandbox = false", "substituters =", "experimental-features = nix-command flakes"]

pairs = count(3)
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-nix-"))
try:
    builder_nix = work / "builder-nix"
    builder_nix.mkdir()
    (builder_nix / "nix.conf").write_text("\n".join([*BASE_NIX, "system-features = kvm big-parallel", ""]))
    host = SshHost(work / "sshd", extra_config=(f"SetEnv NIX_CONF_DIR={builder_nix}",)).start()
    try:
        known = work / "known_hosts"
        known.write_text(host.known_hosts_line())
        ssh_config = host.client_config(work / "ssh_config", known)
        project = work / "project"
        checkout_copy(project)
        shutil.copytree(ROOT / "tests" / "fixtures" / "nixflake", project / "fixture")
        settings = yaml.safe_load((project / "invoke.yaml").read_text())
        settings["images"]["nixos-x86_64"].update({"flake": "fixture", "attribute": "packages.x86_64-linux.kvm-image"})
        (project / "invoke.yaml").write_text(yaml.safe_dump(settings))

        def config(name: str) -> list[str]:
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump({
                "defaults": {"output_dir": str(work / f"out-{name}")}, "ssh_config_path": str(ssh_config),
                "builders": {"hal9000": {"host": "hal9000", "dir": str(work / "builder"), "arch": "x86_64"}}}))
            return [sys.executable, "-m", "invoke", "-f", str(path)]

        ours, raw = config("ssh-ng"), config("sync")
        env = {"NIX_CONFIG": "\n".join([*BASE_NIX, "system-features =", f"store = {work / 'local-store'}"])}

        def run(argv: list[str]) -> float:
            return timed(argv, cwd=project, env=env)

        def new_nonce() -> None:
            (project / "fixture" / "nonce").write_text(uuid.uuid4().hex)

        def ssh_ng_build() -> float:
            new_nonce()
            return run(ours + ["build-nixos-x86", "--builder", "hal9000"])

        def sync_build() -> float:
            new_nonce()
            return run(raw + ["remote-build-nixos-x86", "hal9000", "--sync"]) + run(raw + ["remote-fetch-nixos-x86", "hal9000"])

        say("warm-up: the builder's venv (project-sync route) and a first build on each route")
        say(f"  sync route: {sync_build():.1f}s, ssh-ng route: {ssh_ng_build():.1f}s")
        builds = alternate(pairs, {"ssh-ng": ssh_ng_build, "sync": sync_build}, "build ")
        # nothing changes from here on: both routes publish the same inputs once, then repeat
        new_nonce()
        run(ours + ["build-nixos-x86", "--builder", "hal9000"])
        run(raw + ["rebuild", "--remote", "hal9000", "--image", "nixos-x86_64"])
        noops = alternate(pairs, {
            "ssh-ng": lambda: run(ours + ["build-nixos-x86", "--builder", "hal9000", "--if-changed"]),
            "sync": lambda: run(raw + ["rebuild", "--remote", "hal9000", "--image", "nixos-x86_64"]),
        }, "no-op ")
    finally:
        host.stop()
finally:
    shutil.rmtree(work, ignore_errors=True)
finish([figure("fixture build: ssh-ng route vs project-sync route", builds["ssh-ng"], builds["sync"], op="<=", limit=1.0),
        figure("nothing changed: ssh-ng route vs project-sync route", noops["ssh-ng"], noops["sync"], op="<=", limit=0.25)])
