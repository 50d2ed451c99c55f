"""One OpenSSH connection to a builder, shared by short commands and rsync (ControlMaster).

A fetch needs the builder's manifest and then an rsync: through Fabric that was a Python SSH
stack to import and a second handshake for rsync's own ssh. Here the first command opens the
connection as a master (`ControlMaster=auto`) on a socket in a private temporary folder; later
commands and rsync's ssh ride on it (`ControlMaster=no`), and `close()` ends it. If we die
before that, the master ends itself once idle (`ControlPersist`).

Host keys are checked by OpenSSH against the ssh_config's known_hosts with
StrictHostKeyChecking=yes (or accept-new when the user asked to trust a new key; a changed
key is refused either way), BatchMode never prompts, and remote commands are argv lists
joined with `shlex.join` at the last moment.

Cipher: OpenSSH's default order puts chacha20-poly1305 first. On a CPU with AES instructions,
AES-GCM moves the same bytes for much less CPU (a 1 GiB loopback rsync: 3.3 s instead of 5.3 s
here), and an image fetch is bulk data. So when the ssh config in use leaves `Ciphers` at
OpenSSH's default (the same list `ssh -G` gives with no config at all) and this CPU has AES
instructions, the master (and rsync's own ssh when a fetch reads the manifest over Fabric)
offers the same ciphers with AES-GCM first. A `Ciphers` line the user or the system (crypto
policies, FIPS) wrote is left alone. The set offered is the default set, only reordered; SSH uses
the first of ours that the server also supports.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from pipeline.base.errors import BuilderUnreachable, HostKeyChanged, HostKeyUnknown, ImagepipeError
from pipeline.base.fsutil import private_dir
from pipeline.base.run import Result, run
from pipeline.builders.remote import Target
from pipeline.host import parse_cpu_features

PERSIST = "30"          # seconds an orphaned master stays up with no client before it exits
CONNECT_TIMEOUT = "20"
# A unix socket path must fit in sun_path (108 bytes on Linux, 104 on macOS).
MAX_SOCKET_PATH = 100


AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def cpu_has_aes(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when this CPU has AES instructions (x86 `aes` flag, arm64 `aes` feature; every Mac
    that runs a current macOS has them)."""
    if sys.platform == "darwin":
        return True
    try:
        return "aes" in parse_cpu_features(cpuinfo.read_text(errors="replace"))
    except OSError:
        return False


def _ciphers(argv: list[str]) -> list[str] | None:
    """The `ciphers` line of `ssh -G` (argv), or None where ssh could not say."""
    try:
        res = run(argv, check=False, timeout=10)
    except ImagepipeError:  # ssh missing or stuck: the connection itself will say so
        return None
    for line in res.stdout.splitlines() if res.ok else ():
        key, _, rest = line.partition(" ")
        if key == "ciphers":
            return rest.strip().split(",")
    return None


def cipher_options(target: Target, has_aes: bool | None = None) -> list[str]:
    """`-o Ciphers=…` with AES-GCM first, or [] (see the module docstring for when)."""
    if not (cpu_has_aes() if has_aes is None else has_aes):
        return []
    config = ["-F", str(target.ssh_config)] if target.ssh_config is not None else []
    used = _ciphers(["ssh", *config, "-G", "--", target.host])
    if used is None or used != _ciphers(["ssh", "-F", os.devnull, "-G", "--", target.host]):
        return []
    first = [c for c in AES_GCM if c in used]
    if not first:
        return []
    return ["-o", "Ciphers=" + ",".join(first + [c for c in used if c not in first])]


def connection_error(target: Target, stderr: str) -> ImagepipeError:
    """ssh's exit-255 complaint → the same typed errors the Fabric connection raises."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else "ssh exited 255 without a message"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or ("Host key for" in text and "has changed" in text):
        return HostKeyChanged(
            f"builder {target.name}: the host key of {target.host} CHANGED; refusing to connect",
            hint="if the builder was reinstalled, remove its old line from known_hosts (ssh-keygen -R) "
                 "after checking the new fingerprint; otherwise someone may be intercepting")
    if "Host key verification failed" in text or re.search(r"No \S+ host key is known", text):
        return HostKeyUnknown(
            f"builder {target.name}: the host key of {target.host} is not in known_hosts ({last})",
            hint="check the fingerprint with the builder's admin, then re-run with --accept-new-host-key "
                 f"(or connect once with ssh {target.host})")
    if "Permission denied" in text:
        return BuilderUnreachable(f"builder {target.name}: authentication to {target.host} failed: {last}",
                                  hint="check IdentityFile/User in your ssh config or load the key into ssh-agent")
    return BuilderUnreachable(f"builder {target.name}: cannot connect to {target.host}: {last}",
                              hint=f"check that `ssh {target.host}` works (HostName, Port, ProxyJump)")


class Connection:
    """OpenSSH to `target`, opened by the first `run()`; use as a context manager."""

    def __init__(self, target: Target, *, accept_new_host_key: bool = False, timeout: float = 60) -> None:
        self.target = target
        self.accept_new = accept_new_host_key
        self.timeout = timeout
        self.dir = private_dir()
        self.socket = self.dir / "cm"
        self._ciphers: list[str] | None = None
        if len(str(self.socket)) > MAX_SOCKET_PATH:  # pragma: no cover - /tmp is short
            raise ImagepipeError(f"temporary folder path too long for an ssh control socket: {self.dir}")

    def _base(self, *options: str) -> list[str]:
        argv = ["ssh"]
        if self.target.ssh_config is not None:
            argv += ["-F", str(self.target.ssh_config)]
        return argv + ["-o", "BatchMode=yes", "-o", f"ControlPath={self.socket}", *options]

    def run(self, argv: Sequence[str]) -> Result:
        """Run argv on the builder (a pipeline.host.Runner). Exit 255 = ssh failed: raised typed."""
        checking = "accept-new" if self.accept_new else "yes"
        ssh = self._base("-o", f"StrictHostKeyChecking={checking}", "-o", "ControlMaster=auto",
                         "-o", f"ControlPersist={PERSIST}", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}")
        if self._ciphers is None:  # only the command that opens the master needs it
            self._ciphers = [] if self.socket.exists() else cipher_options(self.target)
        res = run([*ssh, *self._ciphers, "--", self.target.host, shlex.join(argv)], check=False,
                  timeout=self.timeout)
        if res.returncode == 255:
            raise connection_error(self.target, res.stderr)
        return res

    def link_rate(self, enough: float, *, nbytes: int = 64 << 20, window: float = 0.5,
                  span: float = 0.05) -> float | None:
        """The link's rate from the builder to here in bytes/s: zeros (nothing to make on the
        builder) streamed over this connection, timed from the first byte (the handshake and the
        session's start do not count); the best rate over any `span` seconds of it, so a moment
        when this machine was busy elsewhere does not count as a slow link. It stops as soon as
        a span reaches `enough`, else after `window` seconds: a fresh connection ramps up over
        its first 0.1-0.3 s, so only that long a look can tell a slow link from a young one.
        None when it could not be measured. (Where the user's ssh config turns on ssh's own
        compression the zeros shrink and the link looks fast, which it then is for anything
        compressible.)"""
        ssh = self._base("-o", f"StrictHostKeyChecking={'accept-new' if self.accept_new else 'yes'}",
                         "-o", "ControlMaster=auto", "-o", f"ControlPersist={PERSIST}",
                         "-o", f"ConnectTimeout={CONNECT_TIMEOUT}")
        if self._ciphers is None:
            self._ciphers = [] if self.socket.exists() else cipher_options(self.target)
        argv = [*ssh, *self._ciphers, "--", self.target.host, shlex.join(["head", "-c", str(nbytes), "/dev/zero"])]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        out = proc.stdout.fileno()
        best = None
        try:
            if not os.read(out, 1 << 16):
                return None
            samples = [(time.monotonic(), 0)]
            first = 0  # the newest sample at least `span` before the last one
            while samples[-1][0] - samples[0][0] < window and (chunk := os.read(out, 1 << 20)):
                samples.append((time.monotonic(), samples[-1][1] + len(chunk)))
                now, got = samples[-1]
                while first + 1 < len(samples) and now - samples[first + 1][0] >= span:
                    first += 1
                if now - samples[first][0] >= span:
                    rate = (got - samples[first][1]) / (now - samples[first][0])
                    best = rate if best is None else max(best, rate)
                    if best >= enough:
                        break
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        if best is None and len(samples) > 1 and samples[-1][0] > samples[0][0]:  # all of it in less than a span
            best = samples[-1][1] / (samples[-1][0] - samples[0][0])
        return best

    def rsync_ssh_options(self) -> list[str]:
        """`-o` options that make rsync's ssh (pipeline.builders.rsync.ssh_argv) reuse this connection."""
        return ["-o", f"ControlPath={self.socket}", "-o", "ControlMaster=no"]

    def close(self) -> None:
        """End the master (if one was started) and remove the socket folder."""
        if self.socket.exists():
            run([*self._base(), "-O", "exit", "--", self.target.host], check=False, timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

