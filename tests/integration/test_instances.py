"""Instances of the demo image under QEMU (TCG), for real: overlays that never touch the build,
a disk kept across stop and start, two instances at once, the seed (hostname, the user's own
key, a shared folder mounted by the guest through virtiofs with this host's virtiofsd), the
serial console, idle stop, retention keeping backing builds, rebase, rm, and bad input that
leaves nothing behind. The seed ISO itself is checked with xorriso.

Every instance here runs with `--network isolated` (QEMU's restrict=on): the guests reach
nothing but their forwarded SSH port.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.output import artifacts
from pipeline.vm import instances, lifecycle, seed
from tests.support import invoke, keygen, published_copy, require_tool, wait_until

DEMO = "demo-x86_64"
ISOLATED = ["--network", "isolated"]


def listing(cfg: Path) -> dict[str, dict]:
    res = invoke(["instances", "--json"], cfg, timeout=120, check=True)
    return {i["name"]: i for i in json.loads(res.stdout)["instances"]}


def ssh(cfg: Path, name: str, command: str, timeout: float = 180) -> str:
    res = invoke(["ssh", name, "--", command], cfg, timeout=timeout)
    assert res.returncode == 0, f"ssh {name} -- {command}: {res.returncode}\n{res.stderr}"
    return res.stdout


@pytest.fixture
def own(demo_build, tmp_path):
    """A private copy of the published demo and a config whose login key is the user's own (a
    key the image was not built with: only an instance's seed can authorize it); every instance
    is stopped afterwards."""
    user_key = keygen(tmp_path / "me_ed25519", "me@laptop")
    cfg, out = published_copy(demo_build, tmp_path, extra={
        "defaults": {"ssh_key": str(user_key)}, "images": {DEMO: {"retention": 1}}})
    yield cfg, out, user_key
    for rec in instances.records(out):
        lifecycle.stop(rec.name, instances.paths(out, rec.name), force=True, say=lambda _m: None)
        from pipeline.vm import idle, shares

        shares.stop_daemons(instances.paths(out, rec.name))
        idle.stop_watcher(instances.paths(out, rec.name))


def publish_newer_build(out: Path) -> str:
    """A newer build of the demo, published as a build does (a copy of the current one under a
    new id): what a nightly rebuild leaves."""
    image_dir = out / DEMO
    current = artifacts.current_build(image_dir)
    assert current is not None
    new_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + 60)) + "-beef"
    stage = image_dir / ".staging" / new_id
    shutil.copytree(current, stage)
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["build_id"] = new_id
    (stage / "manifest.json").write_text(json.dumps(manifest))
    artifacts.publish(stage, image_dir, new_id)
    return new_id


@pytest.mark.slow
def test_instances_of_the_demo(own, tmp_path):
    require_tool("qemu-img", "qemu-utils")
    require_tool("xorriso", "xorriso")
    cfg, out, user_key = own
    image_dir = out / DEMO
    sha = artifacts.verify_published(image_dir)
    first_build = artifacts.current_build(image_dir).name  # type: ignore[union-attr]
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from-host\n")

    # plain `run IMAGE`: the instance named after the image; the seed gives its hostname and
    # authorizes the user's own key (the image was built with another one)
    res = invoke(["run", DEMO, *ISOLATED], cfg, timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"{DEMO}: new instance of {DEMO}, backed by build {first_build}" in res.stderr
    assert ssh(cfg, DEMO, "hostname").strip() == "demo-x86-64"
    mine = user_key.with_suffix(".pub").read_text().split()[1]
    assert mine in ssh(cfg, DEMO, "cat /root/.ssh/authorized_keys")
    ssh(cfg, DEMO, "echo kept-on-the-disk | dd of=/dev/vda bs=512 seek=4096 conv=notrunc 2>/dev/null; sync")
    state = instances.paths(out, DEMO)
    assert json.loads(state.record.read_text())["build_id"] == first_build
    assert state.seed.is_file() and state.disk.is_file()

    # a second instance at the same time: its own port and hostname, a shared folder both ways,
    # an idle stop
    res = invoke(["run", DEMO, "--name", "web1", *ISOLATED, "--share", f"{share}:proj", "--idle-stop", "0.15"],
                 cfg, timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"shared folders: {share} at /mnt/proj (virtiofs" in res.stderr
    both = listing(cfg)
    assert both[DEMO]["state"] == both["web1"]["state"] == "running"
    assert both[DEMO]["ssh_port"] != both["web1"]["ssh_port"]
    assert ssh(cfg, "web1", "hostname").strip() == "web1"
    assert ssh(cfg, "web1", "cat /mnt/proj/hello.txt; echo from-guest > /mnt/proj/back.txt") == "from-host\n"
    assert (share / "back.txt").read_text() == "from-guest\n"

    # the serial console, fed from a pipe
    typed = subprocess.run([*_invoke_argv(cfg), "console", "web1"], input="echo console-$((6*7))\n", text=True,
                           capture_output=True, timeout=60, cwd=_root())
    assert typed.returncode == 0 and "console-42" in typed.stdout, typed.stdout + typed.stderr

    # idle stop: an open SSH session keeps it up past its limit (9 s); once it ends, it stops
    assert ssh(cfg, "web1", "sleep 14; echo still-up", timeout=120).strip() == "still-up"
    wait_until(lambda: listing(cfg)["web1"]["state"] == "stopped", 120, "web1 stopped by its idle watcher",
               lambda: listing(cfg)["web1"])
    web1 = listing(cfg)["web1"]
    assert web1["stopped_by"].startswith("idle-stop: no SSH session and an idle guest for 0.15 min")
    events = [json.loads(line) for line in invoke(["history", "--instances", "--json"], cfg, check=True).stdout.splitlines()]
    assert [e["event"] for e in events if e["instance"] == "web1"] == ["idle-stop", "started", "created"]
    table = invoke(["instances"], cfg, check=True).stdout
    assert "idle-stop: no SSH session" in table and "shares proj" in table

    # the disk survives stop and start
    assert invoke(["stop", DEMO], cfg, timeout=120).returncode == 0
    assert listing(cfg)[DEMO]["state"] == "stopped"
    assert invoke(["run", DEMO], cfg, timeout=180).returncode == 0
    assert ssh(cfg, DEMO, "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 16") == "kept-on-the-disk"
    rm_running = invoke(["rm", DEMO], cfg, timeout=60)
    assert rm_running.returncode == 2 and "is running" in rm_running.stderr and f"invoke stop {DEMO}" in rm_running.stderr
    assert invoke(["stop", DEMO], cfg, timeout=120).returncode == 0

    # no VM wrote into the build
    assert artifacts.verify_published(image_dir) == sha

    # a new build changes no instance, and retention keeps the builds instances are backed by
    newest = publish_newer_build(out)
    assert {i["build_id"] for i in listing(cfg).values()} == {first_build}
    gc = invoke(["gc", "--image", DEMO], cfg, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert f"kept {first_build}: the disk of instances {DEMO}, web1 is an overlay on it" in gc.stderr
    assert (image_dir / "builds" / first_build).is_dir()

    # --rebase says what it loses, then starts over from the newest build
    res = invoke(["run", DEMO, "--rebase"], cfg, timeout=180)
    assert res.returncode == 0, res.stderr
    assert f"moving from build {first_build} to {newest}" in res.stderr and "This loses everything written" in res.stderr
    assert ssh(cfg, DEMO, "dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 16") != "kept-on-the-disk"
    assert listing(cfg)[DEMO]["build_id"] == newest
    assert invoke(["stop", DEMO], cfg, timeout=120).returncode == 0

    # rm: the instance goes, the build stays; then retention lets the old build go
    for name in (DEMO, "web1"):
        res = invoke(["rm", name], cfg, timeout=60)
        assert res.returncode == 0 and f"{name}: removed" in res.stderr, res.stderr
    assert listing(cfg) == {}
    assert sorted(p.name for p in (out / "instances").iterdir()) == [".lock"]
    gc = invoke(["gc", "--image", DEMO], cfg, timeout=120)
    assert gc.returncode == 0 and f"removed build {first_build}" in gc.stderr, gc.stderr


def _invoke_argv(cfg: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "invoke", "-f", str(cfg)]


def _root() -> Path:
    from tests.support import ROOT

    return ROOT


def _folders(out: Path) -> list[str]:
    folder = out / "instances"
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.is_dir() else []


@pytest.mark.slow
def test_bad_input_is_refused_and_leaves_nothing(own, tmp_path):
    cfg, out, _key = own
    # an instance record of another image, and one whose build was removed by hand
    other = instances.paths(out, "taken")
    other.root.mkdir(parents=True)
    (other.record).write_text(json.dumps({"name": "taken", "image": "nixos-x86_64", "build_id": "b0", "backing": "x",
                                          "backing_format": "qcow2", "created": 1.0, "ssh_port": 2299,
                                          "instance_id": "iid-x"}))
    current = artifacts.current_build(out / DEMO)
    assert current is not None
    gone = out / DEMO / "builds" / "20200101T000000Z-dead"
    shutil.copytree(current, gone)
    orphan = instances.paths(out, "orphan")
    orphan.root.mkdir()
    instances.make_overlay(orphan.disk, f"../../{DEMO}/builds/{gone.name}/{DEMO}.qcow2", "qcow2")
    (orphan.record).write_text(json.dumps({"name": "orphan", "image": DEMO, "build_id": gone.name,
                                           "backing": f"../../{DEMO}/builds/{gone.name}/{DEMO}.qcow2",
                                           "backing_format": "qcow2", "created": 1.0, "ssh_port": 2298,
                                           "instance_id": "iid-y"}))
    shutil.rmtree(gone)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "alink").symlink_to(tmp_path.parent)
    before = _folders(out)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [
        (["run", DEMO, "--name", "taken"], "the name taken is in use by an instance of nixos-x86_64"),
        (["run", DEMO, "--name", "orphan"], "whose image file is gone"),
        (["run", DEMO, "--name", "n1", "--share", str(tmp_path / "nope")], "does not exist"),
        (["run", DEMO, "--name", "n1", "--share", str(tmp_path / "afile")], "is not a folder"),
        (["run", DEMO, "--name", "n1", "--share", str(tmp_path / "alink")], "is a symbolic link to"),
        (["run", DEMO, "--name", "n1", "--port", "2299"], "port 2299 is the SSH port of instance taken"),
        (["run", DEMO, "--name", "n1", "--port", str(busy.getsockname()[1])], "is taken by another program"),
        (["run", DEMO, "--name", "n1", "--user-data", str(tmp_path / "afile")], "has no cloud-init"),
        (["run", DEMO, "--name", "../x"], "instance name '../x' refused"),
        (["rm", "n1"], "no instance called n1"),
        (["ssh", "orphan", "--", "true"], "orphan is not running"),
    ]
    try:
        for args, want in cases:
            res = invoke(args, cfg, timeout=120)
            assert res.returncode == 2 and want in res.stderr, f"{args}: {res.returncode}\n{res.stderr}"
            assert "Traceback" not in res.stderr
            assert _folders(out) == before, args
    finally:
        busy.close()
    hint = invoke(["run", DEMO, "--name", "orphan"], cfg, timeout=60).stderr
    assert f"invoke run {DEMO} --name orphan --rebase" in hint and "invoke rm orphan" in hint


def test_the_seed_iso_is_what_nocloud_reads(tmp_path):
    """xorriso makes it; read back: volume id cidata, the three files as rendered."""
    require_tool("xorriso", "xorriso")
    data = seed.Seed("iid-imagepipe-1", "web1", "admin", ("ssh-ed25519 AAAA me",), "#cloud-config\npackages: [git]\n",
                     (seed.SeedShare("src", "virtiofs"),))
    iso = tmp_path / "seed.iso"
    seed.write_seed(data, "web1", iso)
    info = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], capture_output=True, text=True, timeout=60)
    assert "Volume Id    : cidata" in info.stdout + info.stderr
    dest = tmp_path / "x"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(dest)],
                   capture_output=True, check=True, timeout=60)
    assert (dest / "meta-data").read_text() == seed.meta_data(data)
    assert (dest / "user-data").read_text() == seed.user_data(data)
    assert (dest / "imagepipe" / "boot.sh").read_text() == seed.boot_script("web1", data.shares)
