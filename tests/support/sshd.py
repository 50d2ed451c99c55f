"""A real OpenSSH server on 127.0.0.1 in a temp folder, reached as host alias `hal9000`.

Used by the remote-builder tests and benchmarks. The client side is an ssh_config file that both
Fabric (`ssh_config_path`) and OpenSSH (`ssh -F`, rsync) read.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.output import artifacts
from pipeline.vm.state import free_port
from tests.support import keygen

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    """sshd -D on a free loopback port; `client_config()` writes a matching ssh_config."""

    base: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_config: tuple[str, ...] = ()   # more sshd_config lines (e.g. `SetEnv NIX_CONF_DIR=...`)

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
        self.port = free_port()
        cfg = self.base / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}", f"PidFile {self.base / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "MaxStartups 50", "MaxSessions 50",
            "Subsystem sftp internal-sftp", *self.extra_config, "",
        ]))
        if os.geteuid() == 0:  # sshd started by root checks its privilege separation dir
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(cfg), "-E", str(self.log)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
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
        return f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n"

    def client_config(self, path: Path, known_hosts: Path, alias: str = "hal9000") -> Path:
        """An ssh_config where `alias` is this sshd (HostName, Port, IdentityFile, UserKnownHostsFile)."""
        path.write_text("\n".join([
            f"Host {alias}", "  HostName 127.0.0.1", f"  Port {self.port}", f"  User {self.user}",
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


def fake_published(builder: Path, build_id: str, image: Path, sha: str | None = None) -> None:
    """A builder-side published layout for demo-x86_64 (as `invoke build` leaves it)."""
    image_dir = builder / "output" / "demo-x86_64"
    build = image_dir / "builds" / build_id
    build.mkdir(parents=True)
    dest = build / "demo-x86_64.qcow2"
    shutil.move(str(image), dest)
    digest = sha or artifacts.sha256_file(dest)
    manifest = {"image": "demo-x86_64", "build_id": build_id, "distro": "demo", "arch": "x86_64",
                "host": {"name": "hal9000", "os": "linux", "machine": "x86_64", "where": "local"},
                "artifact": {"file": dest.name, "format": "qcow2", "size": dest.stat().st_size,
                             "virtual_size": 1 << 30, "sha256": digest}}
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
