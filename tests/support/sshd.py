"""A real OpenSSH server in a temp folder, reached as host alias `hal9000`.

Used by the remote-builder tests and benchmarks. The server listens on 127.0.0.1 (a free port),
or, given a `Netns` (tests/support/netns.py), on port 22 of its own address in that network
namespace: another machine behind a link of its own, which can be shaped. The client side is an
ssh_config file that both Fabric (`ssh_config_path`) and OpenSSH (`ssh -F`, rsync) read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.output import artifacts
from pipeline.vm.state import free_port
from tests.support import ROOT, keygen
from tests.support import netns as netns_mod
from tests.support.netns import Netns

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    """sshd -D on a free loopback port; `client_config()` writes a matching ssh_config."""

    base: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_config: tuple[str, ...] = ()   # more sshd_config lines (e.g. `SetEnv NIX_CONF_DIR=...`)
    netns: Netns | None = None           # run in this network namespace (created) instead of on loopback
    loopback_why: str = ""               # builder_host(): why loopback, where it is on loopback

    @property
    def address(self) -> str:
        """Where the client connects: the namespace's end of the link, or loopback."""
        return self.netns.peer_ip if self.netns is not None else "127.0.0.1"

    @property
    def where(self) -> str:
        """One line for the test report: what kind of host this is."""
        if self.netns is None:
            why = f" ({self.loopback_why})" if self.loopback_why else ""
            return f"sshd on loopback 127.0.0.1:{self.port}{why}"
        return (f"sshd in network namespace {self.netns.name} at {self.address}:{self.port} "
                f"({self.netns.rate or 'unshaped'} link)")

    @property
    def host_key(self) -> Path:
        return self.base / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.base / "id_ed25519"

    @property
    def log(self) -> Path:
        return self.base / "sshd.log"

    def start(self) -> SshHost:
        """Generate keys, write sshd_config, start sshd and wait until it accepts connections."""
        missing = [t for t in (SSHD, shutil.which("ssh"), shutil.which("rsync")) if not t or not os.path.exists(t)]
        if missing or not shutil.which("rsync"):
            raise RuntimeError("sshd/ssh/rsync missing: install with `sudo apt-get install openssh-server "
                               "openssh-client rsync` (.ci/run does)")
        self.base.mkdir(parents=True, exist_ok=True)
        keygen(self.host_key, "hal9000-host")
        keygen(self.client_key)
        (self.base / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.port = free_port() if self.netns is None else 22  # the namespace's ports are all free
        cfg = self.base / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {self.address}", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}", f"PidFile {self.base / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "MaxStartups 50", "MaxSessions 50",
            "Subsystem sftp internal-sftp", *self.extra_config, "",
        ]))
        if os.geteuid() == 0:  # sshd started by root checks its privilege separation dir
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        argv = [SSHD, "-D", "-f", str(cfg), "-E", str(self.log)]
        self.proc = subprocess.Popen(self.netns.exec_argv(argv) if self.netns is not None else argv)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.address, self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {self.log.read_text() if self.log.exists() else ''}")

    @property
    def user(self) -> str:
        """Who logs in: the user running the tests (an sshd started by anyone else than root
        can only log that same user in)."""
        return pwd.getpwuid(os.geteuid()).pw_name

    def known_hosts_line(self, key: Path | None = None) -> str:
        pub = (key or self.host_key).with_suffix(".pub").read_text().split()
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {pub[0]} {pub[1]}\n"

    def client_config(self, path: Path, known_hosts: Path, alias: str = "hal9000") -> Path:
        """An ssh_config where `alias` is this sshd (HostName, Port, IdentityFile, UserKnownHostsFile)."""
        path.write_text("\n".join([
            f"Host {alias}", f"  HostName {self.address}", f"  Port {self.port}", f"  User {self.user}",
            f"  IdentityFile {self.client_key}", "  IdentitiesOnly yes", f"  UserKnownHostsFile {known_hosts}", "",
        ]))
        return path

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def builder_host(base: Path, *, link: str = "auto", rate: str | None = None, pip_offline: bool = False,
                 extra_config: tuple[str, ...] = ()) -> Iterator[SshHost]:
    """The test builder: sshd in a network namespace of its own behind a veth pair (`link`
    "netns"; `rate` shapes it: None, "1gbit", "100mbit"), or on loopback ("loopback"). "auto":
    the namespace where this user may make one (root), else loopback, and `host.where` says
    which and why. `pip_offline`: the builder reaches nothing, so its pip installs from a
    wheelhouse of the project's requirements downloaded here (for tests that make its venv)."""
    why = netns_mod.unavailable() if link in ("auto", "netns") else None
    if link == "netns" and why:
        raise RuntimeError(f"a builder in a network namespace: {why}")
    ns = Netns(rate=rate) if link != "loopback" and not why else None
    env = extra_config
    if ns is not None and pip_offline:
        env = (*extra_config, f"SetEnv PIP_NO_INDEX=1 PIP_FIND_LINKS={wheelhouse()}")
    host = SshHost(base, extra_config=env, netns=ns)
    try:
        if ns is not None:
            ns.create()
        host.start()
        host.loopback_why = why or ("asked for loopback" if link == "loopback" else "")
        yield host
    finally:
        host.stop()
        if ns is not None:
            ns.close()


def wheelhouse() -> Path:
    """The project's requirements (and its build backend's) as files pip installs without an
    index, downloaded once per requirement list and Python (content-addressed under
    ~/.cache/imagepipe/wheelhouse, written atomically)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    reqs = sorted([*meta["project"]["dependencies"], *meta["build-system"]["requires"], "wheel"])
    key = hashlib.sha256("\n".join([sys.version.split()[0], sys.platform, *reqs]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagepipe" / "wheelhouse"
    dest = cache / key
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--dest", str(tmp), *reqs], check=True, timeout=900)
        os.chmod(tmp, 0o755)
        with contextlib.suppress(OSError):  # another run got there first: theirs is as good
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fake_published(builder: Path, build_id: str, image: Path, sha: str | None = None, *, fast: bool = True,
                   name: str = "demo-x86_64") -> None:
    """A builder-side published layout for image `name` (as `invoke build` leaves it), its file
    moved from `image`. `sha`: the sha256 (and BLAKE3) to claim instead of the real one; `fast`:
    the manifest has the BLAKE3 map a current builder records (without it, as an older
    builder's: sha256 only)."""
    image_dir = builder / "output" / name
    build = image_dir / "builds" / build_id
    build.mkdir(parents=True)
    dest = build / f"{name}.qcow2"
    shutil.move(str(image), dest)
    hashes = artifacts.hash_file(dest)
    digest = sha or hashes["sha256"]
    manifest = {"image": name, "build_id": build_id, "distro": name.split("-")[0], "arch": "x86_64",
                "host": {"name": "hal9000", "os": "linux", "machine": "x86_64", "where": "local"},
                "artifact": {"file": dest.name, "format": "qcow2", "size": dest.stat().st_size,
                             "virtual_size": 1 << 30, "sha256": digest}}
    if fast:
        manifest["blake3"] = {dest.name: sha or hashes["blake3"]}
    artifacts.write_build_files(build, manifest, {dest.name: digest})
    (image_dir / "current").unlink(missing_ok=True)  # replaced like a publish does
    (image_dir / "current").symlink_to(f"builds/{build_id}")
    for name in ("manifest.json", "SHA256SUMS"):
        if not (image_dir / name).is_symlink():
            (image_dir / name).symlink_to(f"current/{name}")


def dense_qcow2(path: Path, size: str = "1G") -> Path:
    """A qcow2 whose every cluster is allocated (1 GiB of data on disk, rsync must send it all)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True, timeout=60)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(path)], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    return path


def sparse_qcow2(path: Path, size: str = "1G") -> Path:
    """A qcow2 of `size` bytes on paper whose data clusters are holes (metadata preallocation)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), size],
                   check=True, timeout=60)
    return path
