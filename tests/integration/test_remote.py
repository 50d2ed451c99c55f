"""Remote builders against a real OpenSSH sshd reached as the alias `hal9000`: as root, in a network
namespace of its own behind a veth pair (another machine on a link); otherwise on loopback.

The full cycle runs for real: rsync of the project, a venv with the project on the builder,
the demo image built there by packer, fetched back, verified and published here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.builders import follow, remote, rsync
from pipeline.builders.transfer import one_pass
from pipeline.output import artifacts
from tests.support import (
    NEEDS_PTY,
    ROOT,
    Background,
    checkout_copy,
    hold_image_lock,
    invoke,
    live_processes_mentioning,
    require_tool,
    wait_until,
    write_config,
)
from tests.support.sshd import SshHost, builder_host, dense_qcow2, fake_published, sparse_qcow2


@pytest.fixture(scope="module")
def hal9000(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """The builder hal9000 (sshd, alias hal9000, known host key) + test invoke config. As root it
    is another machine: its own network namespace behind a veth pair (tests/support/netns.py),
    whose pip installs from a wheelhouse and whose demo guest takes its .debs from the session
    build's cache (seeded into its output/.cache), since it reaches nothing else. A user who is not root
    cannot make one, so there it is sshd on loopback, and the report says so (test_where_hal9000_is)."""
    for tool, pkg in (("rsync", "rsync"), ("ssh", "openssh-client"), ("sshd", "openssh-server")):
        if tool == "sshd":
            if not Path("/usr/sbin/sshd").exists():
                pytest.fail("sshd not found: install it with `sudo apt-get install openssh-server` (.ci/run does)")
        else:
            require_tool(tool, pkg)
    base = tmp_path_factory.mktemp("hal9000")
    with builder_host(base / "sshd", pip_offline=True) as host:
        if host.netns is not None:  # the builders' (hal9000's dirs) package cache, as a mirror would serve it
            debs = request.getfixturevalue("demo_build")[1] / ".cache" / "debs"
            for builder in ("builder", "builder2"):
                shutil.copytree(debs, base / builder / "output" / ".cache" / "debs", copy_function=os.link)
                (base / builder / rsync.BUILDER_MARKER).write_text("imagepipe builder folder\n")  # not foreign
        known = base / "known_hosts"
        known.write_text(host.known_hosts_line())
        ssh_config = host.client_config(base / "ssh_config", known)
        cfg = write_config(base / "test.yaml", base / "output", {
            "ssh_config_path": str(ssh_config),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(base / "builder"), "arch": "x86_64"}},
        })
        yield {"host": host, "base": base, "config": cfg, "ssh_config": ssh_config, "known_hosts": known}


def test_where_hal9000_is(hal9000):
    """Says in the report where the builder runs, and holds it to what this user can have: as root
    another machine in a namespace of its own, reached through the veth pair only; else loopback."""
    host: SshHost = hal9000["host"]
    print(f"hal9000: {host.where}")
    if os.geteuid() != 0:
        assert host.netns is None and "root" in host.loopback_why, host.where
        return
    assert host.netns is not None, host.where
    assert ipaddress.ip_address(host.address) in ipaddress.ip_network("198.18.0.0/15")
    before = host.netns.bytes_to_host()
    res = subprocess.run(["ssh", "-F", str(hal9000["ssh_config"]), "-o", "BatchMode=yes", "hal9000",
                          "ip -o -4 route; head -c 1000000 /dev/zero"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert host.netns.bytes_to_host() - before > 1_000_000  # it came through the veth pair
    routes = res.stdout[:res.stdout.index(b"\0")].decode().splitlines()
    assert len(routes) == 1 and "default" not in routes[0], routes  # its /30 only: no way out


def _out(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


@pytest.mark.slow
@NEEDS_PTY
def test_full_cycle_sync_build_fetch_publish(hal9000):
    """sync → remote demo build in the builder's own venv → fetch → BLAKE3 verified → published here."""
    for tool, pkg in (("packer", "packer"), ("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        require_tool(tool, pkg)
    builder = hal9000["base"] / "builder"
    res = invoke(["remote-sync-build", "hal9000", "--image", "demo-x86_64"], hal9000["config"], timeout=1500)
    out = _out(res)
    assert res.returncode == 0, out
    assert "[hal9000] synced" in out and "[hal9000] venv created" in out
    assert "[hal9000]" in out and "==> [2/5] packer build" in out and "published" in out  # the builder's N/M
    assert (builder / ".venv" / "bin" / "invoke").exists()
    assert (builder / "tasks.py").exists() and not (builder / ".git").exists()
    remote_manifest = json.loads((builder / "output" / "demo-x86_64" / "manifest.json").read_text())

    res = invoke(["remote-fetch-demo", "hal9000"], hal9000["config"], timeout=300)
    assert res.returncode == 0, _out(res)
    assert "blake3 verified while receiving" in _out(res), _out(res)  # the builder recorded BLAKE3 at publish
    image_dir = hal9000["base"] / "output" / "demo-x86_64"
    manifest = artifacts.read_manifest(image_dir)
    assert manifest is not None
    assert manifest["build_id"] == remote_manifest["build_id"]
    assert manifest["host"]["where"] == "hal9000" and manifest["fetched"]["from"] == "hal9000"
    assert manifest["fetched"]["verified"] == {"hash": "blake3", "files": len(remote_manifest["blake3"]),
                                               "how": "while receiving"}
    assert set(remote_manifest["blake3"]) == {line.split("  ")[1] for line in
                                              (builder / "output/demo-x86_64/SHA256SUMS").read_text().splitlines()}
    assert artifacts.verify_published(image_dir) == remote_manifest["artifact"]["sha256"]
    current = artifacts.current_build(image_dir)
    assert current is not None
    sums = dict(line.split("  ")[::-1] for line in (current / "SHA256SUMS").read_text().splitlines())
    for boot_file in ("vmlinuz", "initrd.img"):
        assert artifacts.sha256_file(current / boot_file) == sums[boot_file]

    # The builder baked this machine's key in too (remote-sync-build passed it): the fetched image
    # boots here and this machine's own key logs in (the builder's key stays on the builder).
    mine = (hal9000["base"] / "output" / ".keys" / "imagepipe_ed25519.pub").read_text().split()[:2]
    theirs = (builder / "output" / ".keys" / "imagepipe_ed25519.pub").read_text().split()[:2]
    assert mine != theirs
    booted = invoke(["test-image", "demo-x86_64"], hal9000["config"], timeout=600)
    assert booted.returncode == 0, _out(booted)

    again = invoke(["remote-fetch-demo", "hal9000"], hal9000["config"], timeout=120)
    assert again.returncode == 0 and "nothing to fetch" in _out(again), _out(again)
    assert artifacts.current_build(image_dir) == current

    # A second build in the same builder dir reuses the venv (pyproject unchanged).
    res = invoke(["remote-sync-build", "hal9000", "--image", "demo-x86_64"], hal9000["config"], timeout=900)
    assert res.returncode == 0 and "[hal9000] venv up to date" in _out(res), _out(res)


@pytest.mark.slow
@NEEDS_PTY
def test_rebuild_remote_builds_what_changed_there_and_publishes_here(hal9000):
    """The timer job with --remote: sync, `build --if-changed` on the builder, fetch, publish here."""
    base = hal9000["base"]
    cfg = write_config(base / "rebuild.yaml", base / "output-rebuild", {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(base / "builder"), "arch": "x86_64"}},
    })
    res = invoke(["rebuild", "--remote", "hal9000", "--image", "demo-x86_64", "--json"], cfg, timeout=1500)
    assert res.returncode == 0, _out(res)
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    finals = [e for e in events if e.get("image") == "demo-x86_64" and e.get("kind") in ("built", "up-to-date", "failed")]
    assert finals and finals[-1]["kind"] == "built", events
    image_dir = base / "output-rebuild" / "demo-x86_64"
    manifest = artifacts.read_manifest(image_dir)
    assert manifest is not None and manifest["host"]["where"] == "hal9000"
    remote_manifest = json.loads((base / "builder" / "output" / "demo-x86_64" / "manifest.json").read_text())
    assert manifest["build_id"] == remote_manifest["build_id"]
    assert artifacts.verify_published(image_dir) == remote_manifest["artifact"]["sha256"]
    # nothing changed: the builder skips, the fetch skips, the outcome says so
    again = invoke(["rebuild", "--remote", "hal9000", "--image", "demo-x86_64", "--json"], cfg, timeout=900)
    assert again.returncode == 0, _out(again)
    kinds = [json.loads(line).get("kind") for line in again.stdout.splitlines() if line.startswith("{")]
    assert "up-to-date" in kinds and "built" not in kinds, again.stdout


def _build_processes(builder: Path) -> list[str]:
    """packer and QEMU processes working in the builder's folder."""
    return [p for p in live_processes_mentioning(str(builder)) if "packer" in p or "qemu-system" in p]


@pytest.mark.slow
@NEEDS_PTY
def test_ctrl_c_stops_the_remote_build_and_keeps_the_published_image(hal9000):
    """^C during a remote build: the builder's packer and qemu stop, its staging is removed, exit 130."""
    builder = hal9000["base"] / "builder"
    image_dir = builder / "output" / "demo-x86_64"
    before = artifacts.current_build(image_dir)
    assert before is not None, "runs after the full-cycle test, which publishes on the builder"
    build = Background(hal9000["config"], ["remote-sync-build", "hal9000", "--image", "demo-x86_64"])
    try:
        build.wait_for("] packer build", timeout=600)
        # packer on the builder has started its VM (QEMU of the builder's staging)
        wait_until(lambda: [p for p in _build_processes(builder) if "qemu-system" in p], 180,
                   "the builder's QEMU", lambda: "\n".join(_build_processes(builder)))
        build.proc.send_signal(signal.SIGINT)
        code = build.finish(timeout=180)
    finally:
        if build.proc.poll() is None:
            os.killpg(build.proc.pid, signal.SIGKILL)
    out = build.output()
    assert code == 130, out
    wait_until(lambda: not _build_processes(builder), 30, "no packer/QEMU left on the builder",
               lambda: "\n".join(_build_processes(builder)))
    staging = image_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    assert artifacts.current_build(image_dir) == before
    assert artifacts.verify_published(image_dir)


def _project_copy(dest: Path) -> Path:
    return checkout_copy(dest)


def test_second_sync_sends_nothing_and_a_change_sends_one_file(hal9000, tmp_path):
    """The upload of remote-sync-build: compressed where hal9000 is another machine, a delta
    against what the builder holds (a changed file sends only its changed blocks)."""
    target = remote.Target("hal9000", "hal9000", str(hal9000["base"] / "sync-builder"), None, hal9000["ssh_config"])
    tree = _project_copy(tmp_path / "project")
    conn = remote.connect(target)
    try:
        first = remote.sync(conn, target, tree)
        second = remote.sync(conn, target, tree)
        changed = tree / "pipeline" / "builders" / "remote.py"
        changed.write_text(changed.read_text() + "# touched\n")
        third = remote.sync(conn, target, tree)
    finally:
        conn.close()
    assert first.transferred > 20 and first.literal > 100_000
    assert second.transferred == 0 and second.literal == 0
    assert second.sent < 20_000, second  # the file list only
    assert third.transferred == 1 and 0 < third.literal < 4096 < third.matched, third  # the changed blocks only
    if hal9000["host"].netns is not None:  # another machine: compressed (the project is small: not measured)
        assert first.how == "zstd level 3 (link not measured)", first
        assert first.sent < first.literal // 2, first
    else:
        assert first.how == "uncompressed (hal9000 is this machine)", first
    synced = Path(target.dir) / "pipeline" / "builders" / "remote.py"
    assert synced.read_text().endswith("# touched\n")
    assert not (Path(target.dir) / ".git").exists()


def _children(pid: int) -> list[int]:
    """Every descendant pid of `pid` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            kids += [child, *_children(child)]
    return kids


def _fetch_cut_at(cfg: Path, staged: Path, at: int) -> str:
    """Start `remote-fetch-demo hal9000`, SIGKILL its rsync once `staged` holds `at` bytes (a
    dropped link: no chance to clean up); the fetch must fail saying how to resume. Its output."""
    argv = [sys.executable, "-m", "invoke", "-f", str(cfg), "remote-fetch-demo", "hal9000"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if staged.exists() and staged.stat().st_size > at:
            rsyncs = [p for p in _children(proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "rsync"]
            for p in rsyncs:
                os.kill(p, 9)
            killed = bool(rsyncs)
            break
        time.sleep(0.01)
    text = proc.communicate(timeout=120)[0]
    assert killed, f"could not interrupt the transfer mid-way:\n{text}"
    assert proc.returncode != 0 and "resume" in text, text
    return text


@pytest.mark.slow
def test_interrupted_fetch_resumes_and_corrupted_remote_is_refused(hal9000, tmp_path):
    require_tool("qemu-io", "qemu-utils")
    builder = hal9000["base"] / "big-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "big.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]),
        # uncompressed: one repeated byte would cross any link at once, and the kill needs time
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder), "compress": "off"}},
    })
    fake_published(builder, "20261123T000000Z-big1", dense_qcow2(tmp_path / "big.qcow2"))
    size = (builder / "output/demo-x86_64/builds/20261123T000000Z-big1/demo-x86_64.qcow2").stat().st_size
    staged = out / "demo-x86_64" / ".staging" / "fetch-20261123T000000Z-big1" / "demo-x86_64.qcow2"

    _fetch_cut_at(cfg, staged, 64 << 20)
    assert 0 < staged.stat().st_size < size
    assert artifacts.read_manifest(out / "demo-x86_64") is None  # nothing half-published

    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=600)
    assert res.returncode == 0, _out(res)
    received = int(_out(res).split("received ")[1].split(" bytes")[0])
    assert received < size * 0.97, f"did not resume: received {received} of {size}"
    # the kept part and the rest were hashed as they were read/arrived: no second read
    assert "blake3 verified while receiving" in _out(res), _out(res)
    assert artifacts.verify_published(out / "demo-x86_64") == artifacts.sha256_file(
        builder / "output/demo-x86_64/current/demo-x86_64.qcow2")
    good = artifacts.current_build(out / "demo-x86_64")

    # The builder's new image does not match its manifest: refused, the good local image stays.
    bad = dense_qcow2(tmp_path / "bad.qcow2", "64M")
    fake_published(builder, "20261123T010000Z-bad1", bad, sha="0" * 64)
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=600)
    assert res.returncode != 0 and "does not match" in _out(res), _out(res)
    assert artifacts.current_build(out / "demo-x86_64") == good
    assert not (out / "demo-x86_64" / ".staging" / "fetch-20261123T010000Z-bad1").exists()
    assert artifacts.verify_published(out / "demo-x86_64")


@pytest.mark.slow
def test_a_fetch_holds_the_image_lock_and_applies_retention(hal9000, tmp_path):
    """While a fetch writes the image's folder, `gc` (like a build) leaves it alone instead of
    removing its staging folder under rsync; once published, retention keeps the last N."""
    builder = hal9000["base"] / "lock-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "lock.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}},
        "images": {"demo-x86_64": {"retention": 1}},
    })
    image_dir = out / "demo-x86_64"
    fake_published(builder, "20261125T000000Z-old1", dense_qcow2(tmp_path / "old.qcow2", "64M"))
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode == 0, _out(res)
    gone = image_dir / ".staging" / "fetch-20261120T000000Z-gone"  # an older fetch, never resumed
    gone.mkdir(parents=True)
    fake_published(builder, "20261125T010000Z-new1", dense_qcow2(tmp_path / "new.qcow2"))
    staged = image_dir / ".staging" / "fetch-20261125T010000Z-new1" / "demo-x86_64.qcow2"

    argv = [sys.executable, "-m", "invoke", "-f", str(cfg), "remote-fetch-demo", "hal9000"]
    fetch = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: staged.exists() or fetch.poll() is not None, 120, "the fetch's staging file")
        assert fetch.poll() is None, "the fetch ended before gc could meet it"
        gc = invoke(["gc"], cfg, timeout=120)
        text = fetch.communicate(timeout=300)[0]
    finally:
        if fetch.poll() is None:
            fetch.kill()
    assert gc.returncode == 0, _out(gc)
    assert f"demo-x86_64: left alone (demo-x86_64 is being fetched from hal9000 by pid {fetch.pid}" in _out(gc)
    assert fetch.returncode == 0, text
    assert "removing fetch-20261120T000000Z-gone left by an interrupted fetch" in text and not gone.exists()
    assert "retention removed 1 old build(s)" in text, text
    assert sorted(os.listdir(image_dir / "builds")) == ["20261125T010000Z-new1"]
    assert artifacts.verify_published(image_dir)


def test_a_fetch_that_waited_for_the_lock_fetches_what_the_builder_has_now(hal9000, tmp_path):
    """While a fetch waits for the image's lock, the builder publishes anew and its retention
    removes the build the fetch first read: once it has the lock, the fetch reads the manifest
    again and brings the new build (it would otherwise ask rsync for a folder that is gone)."""
    builder = hal9000["base"] / "wait-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "wait.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}},
    })
    fake_published(builder, "20261126T000000Z-old1", dense_qcow2(tmp_path / "old.qcow2", "16M"))
    image_dir = out / "demo-x86_64"
    holder = hold_image_lock(image_dir, build_id="20261126T000000Z-here")
    fetch = None
    try:
        fetch = Background(cfg, ["remote-fetch-demo", "hal9000"])
        fetch.wait_for(f"waiting for the build held by pid {holder.pid}", timeout=120)
        fake_published(builder, "20261126T010000Z-new1", dense_qcow2(tmp_path / "new.qcow2", "16M"))
        shutil.rmtree(builder / "output/demo-x86_64/builds/20261126T000000Z-old1")
        holder.communicate("", timeout=30)  # releases the lock
        code = fetch.finish(timeout=300)
    finally:
        for proc in (holder, fetch.proc if fetch else None):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert code == 0, fetch.output()
    assert artifacts.read_manifest(image_dir)["build_id"] == "20261126T010000Z-new1", fetch.output()
    assert artifacts.verify_published(image_dir)


def _fetch_setup(hal9000: dict, tmp_path: Path, name: str, image: Path) -> tuple[Path, Path, Path]:
    """`image` published on a builder of its own; returns (config, output dir, builder's file)."""
    builder = hal9000["base"] / f"{name}-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / f"{name}.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}},
    })
    fake_published(builder, f"20261124T000000Z-{name}", image)
    return cfg, out, (builder / "output/demo-x86_64/current/demo-x86_64.qcow2").resolve()


def _ssh_gone(text: str, within: float = 10) -> bool:
    """No ssh process with `text` in its command line, polled until `within` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"ssh") and text.encode() in b" ".join(args):
                alive.append(args)
        if not alive:
            return True
        if time.monotonic() > deadline:
            print("still running:", alive)
            return False
        time.sleep(0.1)


def _short_tmpdir() -> Path:
    """A short private TMPDIR (the ssh control socket path must stay short), to watch what is left."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ipt-", dir="/tmp"))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_fetch_hashes_while_receiving_one_connection_nothing_left(hal9000, tmp_path, kind):
    """Dense and holey images: the digest taken as the bytes arrived is the file's sha256, the holes
    stay holes here, one SSH connection carries manifest + rsync, and nothing of it outlives the fetch."""
    require_tool("qemu-io", "qemu-utils")
    qcow2 = tmp_path / f"{kind}.qcow2"
    if kind == "dense":
        dense_qcow2(qcow2, "48M")
    else:  # data at the start, one cluster run in the middle, then a long run of zeros to the end
        sparse_qcow2(qcow2, "160M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 64M 1M", str(qcow2)], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
    cfg, out, remote_file = _fetch_setup(hal9000, tmp_path, f"follow-{kind}", qcow2)
    sshd_log = hal9000["host"].log
    logins_before = sshd_log.read_text().count("Accepted publickey")
    tmpdir = _short_tmpdir()
    try:
        res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=600, env={"TMPDIR": str(tmpdir)})
        assert res.returncode == 0, _out(res)
        assert "blake3 verified while receiving" in _out(res), _out(res)
        assert list(tmpdir.iterdir()) == [], "the control socket folder was left behind"
        assert _ssh_gone(str(tmpdir)), "an ssh master outlived the fetch"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert sshd_log.read_text().count("Accepted publickey") - logins_before == 1
    image_dir = out / "demo-x86_64"
    assert artifacts.verify_published(image_dir) == artifacts.sha256_file(remote_file)
    fetched = artifacts.published_image(image_dir)
    assert fetched is not None and fetched.stat().st_size == remote_file.stat().st_size
    if kind == "sparse":  # the zero runs were punched out again: far less on disk than the size
        assert fetched.stat().st_blocks * 512 < 8 << 20, fetched.stat()


def _qcow2_of(path: Path, data: bytes) -> Path:
    """A qcow2 holding `data` (its clusters laid out as a converted disk's are)."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(data)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True, timeout=120)
    raw.unlink()
    return path


def _fetched(res: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The numbers of a fetch's 'received N bytes (M bytes file data[, K matched ...])' line."""
    m = re.search(r"received (\d+) bytes \((\d+) bytes file data(?:, (\d+) matched)?", _out(res))
    assert m, _out(res)
    return {"received": int(m.group(1)), "literal": int(m.group(2)), "matched": int(m.group(3) or 0)}


def test_a_rebuilt_image_moves_only_what_changed(hal9000, tmp_path):
    """The build published here is the basis of the next: of a 24 MiB image with 1 MiB changed,
    about 1 MiB crosses the link; verified by BLAKE3 as it lands; the old build stays intact."""
    require_tool("qemu-img", "qemu-utils")
    rng = random.Random(26)
    old = rng.randbytes(24 << 20)
    new = old[:8 << 20] + rng.randbytes(1 << 20) + old[9 << 20:]
    builder = hal9000["base"] / "delta-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "delta.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder), "compress": "off"}}})
    fake_published(builder, "20261205T000000Z-one", _qcow2_of(tmp_path / "one.qcow2", old))
    first = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert first.returncode == 0 and "no earlier build here" in _out(first), _out(first)
    one = artifacts.current_build(out / "demo-x86_64")
    before = artifacts.sha256_file(one / "demo-x86_64.qcow2")

    fake_published(builder, "20261205T010000Z-two", _qcow2_of(tmp_path / "two.qcow2", new))
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode == 0, _out(res)
    assert "delta against build 20261205T000000Z-one" in _out(res), _out(res)
    assert "blake3 verified while receiving" in _out(res), _out(res)
    got = _fetched(res)
    assert got["literal"] < 2 << 20 and got["matched"] > 20 << 20, (got, _out(res))
    assert got["received"] < 3 << 20, got
    remote = builder / "output/demo-x86_64/current/demo-x86_64.qcow2"
    assert artifacts.verify_published(out / "demo-x86_64") == artifacts.sha256_file(remote)
    assert artifacts.sha256_file(one / "demo-x86_64.qcow2") == before  # the basis is only read
    assert not any((out / "demo-x86_64" / ".staging").glob("*/.basis"))


def test_compression_is_negotiated_per_builder(hal9000, tmp_path):
    """compress: zstd sends a compressible image in a fraction of its size; auto decides by the
    link: off where the builder is this machine, else by the measured rate (said either way)."""
    require_tool("qemu-io", "qemu-utils")
    size = None
    for setting in ("zstd", "auto"):
        builder = hal9000["base"] / f"zc-{setting}-builder"
        out = tmp_path / f"out-{setting}"
        cfg = write_config(tmp_path / f"zc-{setting}.yaml", out, {
            "ssh_config_path": str(hal9000["ssh_config"]),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(builder), "compress": setting}}})
        fake_published(builder, "20261205T000000Z-zc", dense_qcow2(tmp_path / f"{setting}.qcow2", "16M"))
        size = (builder / "output/demo-x86_64/current/demo-x86_64.qcow2").stat().st_size
        res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
        assert res.returncode == 0, _out(res)
        if setting == "zstd":
            assert "transfer zstd (compress: zstd)" in _out(res), _out(res)
            assert _fetched(res)["received"] < size // 20, _out(res)
        elif hal9000["host"].netns is None:
            assert "transfer uncompressed (hal9000 is this machine)" in _out(res), _out(res)
        else:
            assert re.search(r"transfer (lz4|zstd level 3) \(link measured at [0-9.]+ [MG]bit/s", _out(res)), _out(res)
        assert artifacts.verify_published(out / "demo-x86_64")


def test_an_older_builders_manifest_without_blake3_is_verified_by_sha256(hal9000, tmp_path):
    require_tool("qemu-io", "qemu-utils")
    builder = hal9000["base"] / "old-builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "old.yaml", out, {
        "ssh_config_path": str(hal9000["ssh_config"]), "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}})
    fake_published(builder, "20261205T000000Z-old", dense_qcow2(tmp_path / "old.qcow2", "8M"), fast=False)
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode == 0 and "sha256 verified while receiving" in _out(res), _out(res)
    assert artifacts.read_manifest(out / "demo-x86_64")["fetched"]["verified"]["hash"] == "sha256"

    # a BLAKE3 that does not match is refused like a sha256 that does not
    fake_published(builder, "20261205T010000Z-bad", dense_qcow2(tmp_path / "bad.qcow2", "12M"))
    manifest = builder / "output/demo-x86_64/builds/20261205T010000Z-bad/manifest.json"
    data = json.loads(manifest.read_text())
    data["blake3"]["demo-x86_64.qcow2"] = "0" * 64
    manifest.write_text(json.dumps(data))
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode != 0 and "blake3" in _out(res) and "does not match" in _out(res), _out(res)
    assert artifacts.read_manifest(out / "demo-x86_64")["build_id"] == "20261205T000000Z-old"


@pytest.fixture(scope="module")
def slow_link(tmp_path_factory: pytest.TempPathFactory):
    """A second builder behind a 100 Mbit/s link (tc tbf both ways): root only (a namespace)."""
    base = tmp_path_factory.mktemp("slow-link")
    with builder_host(base / "sshd", link="netns", rate="100mbit") as host:
        known = base / "known_hosts"
        known.write_text(host.known_hosts_line())
        yield {"host": host, "base": base, "ssh_config": host.client_config(base / "ssh_config", known)}


NEEDS_NETNS = pytest.mark.needs_root("a shaped link is a network namespace and a veth pair in this machine's "
                                     "namespace, which only root can make")


@NEEDS_NETNS
def test_auto_compresses_over_a_slow_link_and_a_dropped_delta_resumes(slow_link, tmp_path):
    """Over 100 Mbit/s, auto measures the link and picks zstd. A delta transfer cut mid-way (rsync
    killed: the link dropped) resumes: neither what arrived nor what the previous build holds
    crosses again, and the result is verified as it lands."""
    require_tool("qemu-img", "qemu-utils")
    rng = random.Random(14)
    old = rng.randbytes(16 << 20)
    new = old[:4 << 20] + rng.randbytes(24 << 20) + old[4 << 20:]  # 24 MiB new: ~2 s at 100 Mbit/s
    builder = slow_link["base"] / "builder"
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "slow.yaml", out, {
        "ssh_config_path": str(slow_link["ssh_config"]), "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}})
    fake_published(builder, "20261205T000000Z-one", _qcow2_of(tmp_path / "one.qcow2", old))
    first = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert first.returncode == 0, _out(first)
    m = re.search(r"transfer zstd level 3 \(link measured at ([0-9.]+) Mbit/s\)", _out(first))
    assert m and 50 <= float(m.group(1)) <= 130, _out(first)

    fake_published(builder, "20261205T010000Z-two", _qcow2_of(tmp_path / "two.qcow2", new))
    staged = out / "demo-x86_64" / ".staging" / "fetch-20261205T010000Z-two" / "demo-x86_64.qcow2"
    _fetch_cut_at(cfg, staged, 12 << 20)  # inside the new data
    kept = staged.stat().st_size
    assert kept > 12 << 20

    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode == 0, _out(res)
    assert "delta against build 20261205T000000Z-one" in _out(res), _out(res)
    assert "blake3 verified while receiving" in _out(res), _out(res)
    got = _fetched(res)
    # the new data minus what was kept: the old build's 16 MiB and the kept part matched
    assert got["literal"] < (24 << 20) - (kept - (4 << 20)) + (2 << 20), (got, kept)
    assert got["matched"] >= (16 << 20), got
    remote = builder / "output/demo-x86_64/current/demo-x86_64.qcow2"
    assert artifacts.verify_published(out / "demo-x86_64") == artifacts.sha256_file(remote)


def test_a_corrupt_kept_part_is_repaired_and_read_again(hal9000, tmp_path):
    """A partial file whose kept bytes are wrong: rsync's second pass mends it in place, which the
    follower cannot vouch for, so the final file is read again before it is trusted."""
    require_tool("qemu-io", "qemu-utils")
    cfg, out, remote_file = _fetch_setup(hal9000, tmp_path, "mend", dense_qcow2(tmp_path / "m.qcow2", "32M"))
    stage = out / "demo-x86_64" / ".staging" / "fetch-20261124T000000Z-mend"
    stage.mkdir(parents=True)
    kept = remote_file.read_bytes()[: 12 << 20]
    (stage / "demo-x86_64.qcow2").write_bytes(kept[: 1 << 20] + b"CORRUPT!" + kept[(1 << 20) + 8:])
    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
    assert res.returncode == 0, _out(res)
    assert "re-read after the transfer" in _out(res), _out(res)
    assert artifacts.verify_published(out / "demo-x86_64") == artifacts.sha256_file(remote_file)


def _local_rsync(src: Path, dest_dir: Path, *, resume: bool, bwlimit: str = "") -> rsync.Stats:
    """pipeline.builders.rsync.pull_argv's transfer modes, run between two local folders."""
    argv = rsync.pull_argv("unused", [], dest_dir, None, resume=resume)
    argv = [a for a in argv if a not in ("-e", argv[argv.index("-e") + 1])][:-1]  # local: no ssh
    extra = [f"--bwlimit={bwlimit}"] if bwlimit else []
    res = subprocess.run([*argv, *extra, str(src), f"{dest_dir}/"], check=True, capture_output=True, text=True,
                         timeout=300)
    return rsync.parse_stats(res.stdout)


def _holey_file(path: Path) -> Path:
    """Random data, a 6 MiB run of zeros, data again, then 5 MiB of zeros up to the end."""
    with open(path, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.seek(9 << 20)
        f.write(os.urandom((2 << 20) + 123))
        f.truncate((16 << 20) + 123)
    return path


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_follower_digest_is_the_sha256_of_the_final_file(tmp_path, resume):
    """Against real rsync (rate-limited so it writes while the follower reads): fresh and resumed,
    the digest equals sha256 of the final file, covers it, and the zero runs became holes."""
    require_tool("rsync", "rsync")
    src = _holey_file(tmp_path / "src.img")
    dest = tmp_path / "dest"
    dest.mkdir()
    kept = 0
    if resume:  # an interrupted earlier transfer left the first 5 MiB
        kept = 5 << 20
        (dest / "src.img").write_bytes(src.read_bytes()[:kept])
    follower = follow.Follower(dest / "src.img").start()
    stats = _local_rsync(src, dest, resume=resume, bwlimit="8m")
    seen = follower.finish()
    final = dest / "src.img"
    assert seen is not None and seen.digest == artifacts.sha256_file(final) == artifacts.sha256_file(src)
    assert seen.covers(final) and seen.length == final.stat().st_size
    assert seen.caught_up > 0, "the follower never waited for rsync: it did not hash while receiving"
    assert one_pass(stats, {"src.img": kept}, {"src.img": final.stat().st_size})
    assert seen.punched >= 10 << 20  # 6 MiB inside + 5 MiB at the end, in whole 64 KiB segments
    assert final.stat().st_blocks * 512 <= (6 << 20), final.stat()


def test_rsync_redo_is_not_one_pass_and_a_replaced_file_is_not_covered(tmp_path):
    """What makes fetch distrust a follower: rsync's second pass over a file (a kept part that did
    not verify) shows as extra data in --stats; a file replaced or cut short is not `covered`."""
    require_tool("rsync", "rsync")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(6 << 20))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "src.img").write_bytes(b"X" * 100 + src.read_bytes()[100:3 << 20])  # kept part, corrupt
    follower = follow.Follower(dest / "src.img").start()
    stats = _local_rsync(src, dest, resume=True)
    seen = follower.finish()
    final = dest / "src.img"
    assert artifacts.sha256_file(final) == artifacts.sha256_file(src)  # rsync mended it
    assert not one_pass(stats, {"src.img": 3 << 20}, {"src.img": 6 << 20}), stats
    assert seen is not None and seen.covers(final)  # same file, same length: only the stats tell

    final.rename(tmp_path / "old.img")  # kept, so its inode number is not reused at once
    final.write_bytes(src.read_bytes())  # same bytes, another file: the digest does not cover it
    assert not seen.covers(final)
    with open(final, "r+b") as f:
        f.truncate(1 << 20)
    assert not seen.covers(final)


def test_fetch_checks_host_keys_through_openssh(hal9000, tmp_path):
    """The fetch's own OpenSSH connection: unknown key refused, --accept-new-host-key records it,
    a changed key is refused even then, and the published image stays as it was."""
    require_tool("qemu-io", "qemu-utils")
    host: SshHost = hal9000["host"]
    known = tmp_path / "known_hosts"
    ssh_config = host.client_config(tmp_path / "ssh_config", known)
    builder = hal9000["base"] / "hostkey-builder"
    fake_published(builder, "20261124T000000Z-keys", dense_qcow2(tmp_path / "k.qcow2", "8M"))
    out = tmp_path / "output"
    cfg = write_config(tmp_path / "k.yaml", out, {
        "ssh_config_path": str(ssh_config), "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}})

    res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=120)
    assert res.returncode == 4, _out(res)
    assert "not in known_hosts" in res.stderr and "--accept-new-host-key" in res.stderr, res.stderr
    assert not known.exists() or known.read_text() == ""
    assert not (out / "demo-x86_64").exists()

    res = invoke(["remote-fetch-demo", "hal9000", "--accept-new-host-key"], cfg, timeout=120)
    assert res.returncode == 0, _out(res)
    assert host.known_hosts_line().split()[2] in known.read_text()
    good = artifacts.current_build(out / "demo-x86_64")
    assert good is not None

    from tests.support.sshd import keygen

    known.write_text(host.known_hosts_line(keygen(tmp_path / "other_host_key", "impostor")))
    before = known.read_text()
    res = invoke(["remote-fetch-demo", "hal9000", "--accept-new-host-key"], cfg, timeout=120)
    assert res.returncode == 4 and "CHANGED" in res.stderr, _out(res)
    assert known.read_text() == before
    assert artifacts.current_build(out / "demo-x86_64") == good


def test_unknown_host_key_refused_then_accepted_changed_key_refused(hal9000, tmp_path):
    host: SshHost = hal9000["host"]
    known = tmp_path / "known_hosts"
    ssh_config = host.client_config(tmp_path / "ssh_config", known)
    cfg = write_config(tmp_path / "k.yaml", tmp_path / "out", {"ssh_config_path": str(ssh_config)})

    res = invoke(["doctor", "--builder", "hal9000"], cfg, timeout=120)
    assert res.returncode == 4, _out(res)
    assert "not in" in res.stderr and "--accept-new-host-key" in res.stderr and "SHA256:" in res.stderr
    assert not known.exists() or known.read_text() == ""

    res = invoke(["doctor", "--builder", "hal9000", "--accept-new-host-key"], cfg, timeout=120)
    assert res.returncode == 0, _out(res)
    assert "builder hal9000 (linux x86_64)" in res.stdout
    assert host.known_hosts_line().split()[2] in known.read_text()
    # OpenSSH (what rsync uses) accepts the recorded line under strict checking.
    subprocess.run(["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                    "hal9000", "true"], check=True, timeout=60)

    from tests.support.sshd import keygen

    other = keygen(tmp_path / "other_host_key", "impostor")
    known.write_text(host.known_hosts_line(other))
    before = known.read_text()
    res = invoke(["doctor", "--builder", "hal9000", "--accept-new-host-key"], cfg, timeout=120)
    assert res.returncode == 4 and "CHANGED" in res.stderr, _out(res)
    assert known.read_text() == before


HOSTILE_HOSTS = [
    "-oProxyCommand=touch CANARY",
    "hal 9000",
    "hal9000;touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "hal9000\ntouch CANARY",
    "'hal9000'",
    '"hal9000"',
    "hal9000|touch CANARY",
    "hal9000&&touch CANARY",
    "hal9000>CANARY",
    "hal9000:/etc",
    "root@-oProxyCommand=x",
]
HOSTILE_DIRS = [
    "../escape",
    "/srv/imagepipe/../../etc",
    "~/imagepipe/../../root",
    "a/../../b",
    "-rf",
    "~root/imagepipe",
    "x/..",
]


@pytest.fixture
def listener():
    """A TCP port that counts connection attempts (every alias points here in the hostile tests)."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    hits: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                hits.append(conn)
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield sock.getsockname()[1], hits
    stop.set()
    t.join()
    sock.close()


@pytest.mark.parametrize("kind,value", [("host", h) for h in HOSTILE_HOSTS] + [("dir", d) for d in HOSTILE_DIRS])
def test_hostile_input_is_refused_before_any_connection(kind, value, tmp_path, listener):
    port, hits = listener
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host *\n  HostName 127.0.0.1\n  Port {port}\n")
    canary = tmp_path / "CANARY"
    value = value.replace("CANARY", str(canary))
    builders = {"evil": {"host": "hal9000", "dir": value}} if kind == "dir" else {}
    cfg = write_config(tmp_path / "h.yaml", tmp_path / "out", {"ssh_config_path": str(ssh_config),
                                                              "builders": builders})
    name = "evil" if kind == "dir" else value
    for args in (["doctor", f"--builder={name}"], ["remote-fetch-demo", f"--host={name}"],
                 ["remote-sync-build", f"--host={name}", "--image", "demo-x86_64"]):
        res = invoke(args, cfg, timeout=60)
        assert res.returncode == 2, f"{args}: {_out(res)}"
        assert "refused" in res.stderr and f"builder {kind}" in res.stderr, res.stderr
    assert hits == [], "a connection was attempted"
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_config_rejects_a_hostile_builder_host(tmp_path):
    cfg = write_config(tmp_path / "h.yaml", tmp_path / "out",
                       {"builders": {"evil": {"host": "-oProxyCommand=touch x", "dir": "~/x"}}})
    res = invoke(["doctor", "--builder", "evil"], cfg, timeout=60)
    assert res.returncode == 2 and "builders.evil.host" in res.stderr, _out(res)
    raw = yaml.safe_load(cfg.read_text())
    assert raw["builders"]["evil"]["host"].startswith("-")


@pytest.mark.slow
@NEEDS_PTY
def test_remote_build_spreads_images_over_builders_in_parallel(hal9000):
    """Two x86_64 builders (same sshd, separate dirs) build at once; an unreachable arm builder fails alone."""
    base = hal9000["base"]
    cfg = write_config(base / "multi.yaml", base / "multi-output", {
        "ssh_config_path": str(hal9000["ssh_config"]),
        "builders": {
            "b1": {"host": "hal9000", "dir": str(base / "builder"), "arch": "x86_64"},
            "b2": {"host": "hal9000", "dir": str(base / "builder2"), "arch": "x86_64"},
            "arm": {"host": "arm-builder.invalid", "dir": "~/imagepipe", "arch": "aarch64"},
        },
    })
    started = time.monotonic()
    res = invoke(["remote-build", "--image", "demo-x86_64", "--image", "demo-x86_64", "--image", "nixos-aarch64"],
                 cfg, timeout=1800)
    took = time.monotonic() - started
    out = _out(res)
    assert res.returncode == 4, out  # the unreachable builder's exit code
    assert "[b1] will build: demo-x86_64" in out and "[b2] will build: demo-x86_64" in out
    assert "[arm] will build: nixos-aarch64" in out and "[arm] error: builder arm: cannot connect" in out
    rows = {tuple(line.split()[:3]) for line in res.stdout.splitlines()}
    assert {("demo-x86_64", "b1", "ok"), ("demo-x86_64", "b2", "ok"), ("nixos-aarch64", "arm", "not")} <= rows
    for b in ("builder", "builder2"):
        assert (base / b / "output" / "demo-x86_64" / "manifest.json").exists()
    # The builders worked at the same time: b2 was already busy (sync, venv) before b1 published.
    lines = out.splitlines()
    b1_done = next(i for i, line in enumerate(lines) if line.startswith("[b1]") and re.search(r"✔ +published", line))
    b2_synced = next(i for i, line in enumerate(lines) if line.startswith("[b2] synced"))
    assert b2_synced < b1_done, f"builders did not work in parallel ({took:.0f}s):\n{out}"


def test_proxyjump_alias_is_honoured_with_host_keys_checked_on_both_hops(hal9000, tmp_path):
    """An alias reached through ProxyJump (here: through hal9000 itself) works for Fabric and for rsync."""
    host: SshHost = hal9000["host"]
    ssh_config = host.client_config(tmp_path / "ssh_config", hal9000["known_hosts"])
    with ssh_config.open("a") as f:
        f.write(f"Host inner\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n  ProxyJump hal9000\n"
                f"  IdentityFile {host.client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {hal9000['known_hosts']}\n")
    cfg = write_config(tmp_path / "j.yaml", tmp_path / "out", {
        "ssh_config_path": str(ssh_config), "builders": {"inner": {"dir": str(tmp_path / "jump-builder")}}})
    res = invoke(["doctor", "--builder", "inner", "--json"], cfg, timeout=120)
    assert res.returncode == 0, _out(res)
    assert json.loads(res.stdout)["host"].startswith("builder inner (linux")
    target = remote.Target("inner", "inner", str(tmp_path / "jump-builder"), None, ssh_config)
    conn = remote.connect(target)
    try:
        assert conn.gateway is not None  # Fabric really went through the jump host
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "hello.txt").write_text("over the jump host\n")
        stats = remote.sync(conn, target, tree)
    finally:
        conn.close()
    assert stats.transferred == 1
    assert (tmp_path / "jump-builder" / "hello.txt").read_text() == "over the jump host\n"
