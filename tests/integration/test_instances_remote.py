"""An instance on the builder hal9000 (a real OpenSSH server: as root in a network namespace of its
own behind a veth pair, tests/support/sshd.builder_host), started and reached from here:
`run --on` makes it there from the build already published there (nothing copied here), `ssh`
goes through the builder to QEMU's forward on the builder's 127.0.0.1, and `instances`, `status`,
`stop` and `rm` work from here. A builder without QEMU is refused with the install hint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.base import procs
from pipeline.builders import rsync
from pipeline.output import artifacts
from tests.support import (
    invoke,
    live_pids_mentioning,
    live_processes_mentioning,
    published_copy,
    require_tool,
    wait_gone,
    write_config,
)
from tests.support.sshd import SshHost, builder_host

DEMO = "demo-x86_64"


def client_side(host: SshHost, base: Path) -> Path:
    """This machine's ssh_config for the builder (its host key known)."""
    known = base / "known_hosts"
    known.write_text(host.known_hosts_line())
    return host.client_config(base / "ssh_config", known)


@pytest.fixture(scope="module")
def hal9000(tmp_path_factory: pytest.TempPathFactory, demo_build):
    """The builder, with the session's demo build published in its output folder (as
    remote-sync-build leaves it), and this machine's config naming it."""
    for tool, pkg in (("rsync", "rsync"), ("ssh", "openssh-client"), ("qemu-img", "qemu-utils")):
        require_tool(tool, pkg)
    base = tmp_path_factory.mktemp("hal9000-instances")
    builder = base / "builder"
    builder.mkdir()
    (builder / rsync.BUILDER_MARKER).write_text("imagepipe builder folder\n")
    published_copy(demo_build, builder)
    with builder_host(base / "sshd", pip_offline=True) as host:
        print(f"hal9000: {host.where}")
        cfg = write_config(base / "client.yaml", base / "client-output", {
            "ssh_config_path": str(client_side(host, base)),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(builder), "arch": "x86_64"}},
        })
        try:
            yield {"config": cfg, "builder": builder, "client": base / "client-output", "base": base, "host": host}
        finally:
            invoke(["stop", "far", "--force"], cfg, timeout=120)
            for line in live_processes_mentioning(str(builder)):  # nothing of the builder's may outlive the test
                os.kill(int(line.split(":", 1)[0]), 9)


def listing(cfg: Path) -> dict[str, dict]:
    res = invoke(["instances", "--json"], cfg, timeout=120, check=True)
    return {i["name"]: i for i in json.loads(res.stdout)["instances"]}


@pytest.mark.slow
def test_an_instance_on_the_builder_reached_from_here(hal9000):
    cfg, builder, client = hal9000["config"], hal9000["builder"], hal9000["client"]
    build = artifacts.current_build(builder / "output" / DEMO)
    assert build is not None
    sha = artifacts.verify_published(builder / "output" / DEMO)

    res = invoke(["run", DEMO, "--name", "far", "--on", "hal9000", "--network", "isolated"], cfg, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[hal9000] far: new instance of demo-x86_64" in res.stderr and "far: running on hal9000" in res.stderr
    assert not (client / DEMO).exists()  # the build stays on the builder: nothing was fetched

    # QEMU runs on the builder, its forward bound to the builder's 127.0.0.1
    qemu = [procs.cmdline(pid) or "" for pid in live_pids_mentioning(str(builder / "output" / "instances" / "far"))]
    qemu = [cmd for cmd in qemu if "qemu-system" in cmd]
    assert len(qemu) == 1 and "hostfwd=tcp:127.0.0.1:" in qemu[0], qemu

    far = listing(cfg)["far"]
    assert far["where"] == "hal9000" and far["state"] == "running" and far["build_id"] == build.name
    # ssh through the builder, as the image's user, with this machine's key (the seed's)
    res = invoke(["ssh", "far", "--", "hostname; cat /root/.ssh/authorized_keys"], cfg, timeout=180)
    assert res.returncode == 0, res.stderr
    mine = (client / ".keys" / "imagepipe_ed25519.pub").read_text().split()[1]
    lines = res.stdout.splitlines()
    assert lines[0] == "far" and any(mine in line for line in lines[1:])
    assert (client / "instances" / "far" / "known_hosts").read_text().strip()  # the guest's key pinned here
    detail = invoke(["status", "far"], cfg, timeout=120, check=True).stdout
    assert "where        hal9000" in detail and "running" in detail

    res = invoke(["stop", "far"], cfg, timeout=180)
    assert res.returncode == 0 and "[hal9000] far: powered off" in res.stderr, res.stderr
    assert listing(cfg)["far"]["state"] == "stopped"
    wait_gone(str(builder / "output" / "instances" / "far" / "console.log"))

    res = invoke(["rm", "far"], cfg, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not (builder / "output" / "instances" / "far").exists() and not (client / "instances" / "far").exists()
    assert listing(cfg) == {}
    assert artifacts.verify_published(builder / "output" / DEMO) == sha  # the build was only read


@pytest.mark.slow
def test_a_builder_without_qemu_is_refused_with_the_hint(hal9000, tmp_path):
    """A builder whose PATH has no qemu-system-x86_64 (everything else of /usr/bin and /bin is
    there): refused before anything is synced or made, naming the package to install there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if not tool.name.startswith("qemu-system") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    try:
        with builder_host(tmp_path / "sshd", extra_config=(f"SetEnv PATH={bin_dir}",)) as host:
            bare = tmp_path / "bare"
            cfg = write_config(tmp_path / "c.yaml", tmp_path / "out", {
                "ssh_config_path": str(client_side(host, tmp_path)),
                "builders": {"hal9000": {"host": "hal9000", "dir": str(bare), "arch": "x86_64"}}})
            res = invoke(["run", DEMO, "--name", "far2", "--on", "hal9000"], cfg, timeout=300)
        assert res.returncode != 0 and "builder hal9000 has no qemu-system-x86_64" in res.stderr, res.stderr
        assert "apt-get install qemu-system-x86" in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "out" / "instances" / "far2").exists() and not bare.exists()
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)
