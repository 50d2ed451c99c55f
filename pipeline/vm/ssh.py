"""SSH into a running VM: wait for a real key exchange, pin the guest's host keys in its state
folder, and ssh with strict checking against that file only (~/.ssh/known_hosts is never used)."""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import keys
from pipeline.errors import UsageError, VerifyFailed
from pipeline.fsutil import atomic_write
from pipeline.model import Accel, Config, Image
from pipeline.run import interactive, run
from pipeline.vm.state import (
    StatePaths,
    alive,
    console_tail,
    read_status,
    read_value,
    state_paths,
    write_value,
)

SSH_DEADLINE = {Accel.TCG: 120.0, Accel.KVM: 60.0, Accel.HVF: 60.0}
KEYSCAN_TYPES = "ed25519,ecdsa"  # every current sshd has one; RSA keygen in a TCG guest is slow


def host_key_alias(image: str) -> str:
    """known_hosts entries are keyed by image, not by port: a changed port keeps the pin."""
    return f"imagepipe-{image}"


def parse_keyscan(out: str, alias: str) -> list[str]:
    """ssh-keyscan output → known_hosts lines under `alias` (comments dropped)."""
    lines = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            lines.append(" ".join([alias, parts[1], parts[2]]))
    return lines


def keyscan(port: int, timeout: int = 5) -> str:
    """ssh-keyscan of 127.0.0.1:`port` (empty when sshd does not answer yet)."""
    res = run(["ssh-keyscan", "-T", str(timeout), "-t", KEYSCAN_TYPES, "-p", str(port), "127.0.0.1"],
              check=False, timeout=timeout * 3 + 5)
    return res.stdout


def wait_for_ssh(image: str, state: StatePaths, port: int, deadline: float,
                 pid: int | None = None, interval: float = 1.0) -> list[str]:
    """Wait until the guest's sshd completes a key exchange (a forward accepts TCP long before).

    Returns the host keys as known_hosts lines; VerifyFailed with the console tail on timeout
    or when QEMU dies meanwhile.
    """
    end = time.monotonic() + deadline
    alias = host_key_alias(image)
    while True:
        found = parse_keyscan(keyscan(port), alias)
        if found:
            return found
        if pid is not None and not alive(pid, state):
            raise VerifyFailed(f"{image}: QEMU exited before SSH came up\n{tail_block(state)}",
                               f"serial console: {state.console}")
        if time.monotonic() >= end:
            raise VerifyFailed(f"{image}: no SSH answer on 127.0.0.1:{port} within {deadline:.0f}s\n{tail_block(state)}",
                               f"serial console: {state.console}")
        time.sleep(interval)


def wait_for_banner(image: str, state: StatePaths, port: int, deadline: float,
                    pid: int | None = None, interval: float = 0.5, patience: float = 1.0) -> None:
    """Wait until the guest's sshd sends its banner (`SSH-...`) on 127.0.0.1:`port`, in-process.

    QEMU's user network accepts a forwarded connection at once and then holds it while the
    guest cannot answer yet (no address, no sshd); it completes a held connection only when it
    next retries it, seconds after sshd is up. So a new connection is opened every `interval` s
    and each one waits up to `patience` s for the banner (a slow guest still answers one); a
    connection the guest closes (nothing listening yet) is dropped at once. At most
    patience/interval + 1 are open at once: QEMU delivers every held connection, even one
    closed here, when the guest comes up, and sshd refuses a client's connections beyond a few
    unauthenticated ones (dropbear: 5), so the login that follows must not be one too many.
    Measured on the demo guest: polling faster (0.1 s) let those late connections fill dropbear's
    slots (the login refused in 2 of 4 boots) and made boot-to-SSH slower, not faster. VerifyFailed with the console tail on timeout
    or when QEMU dies meanwhile."""
    end = time.monotonic() + deadline
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[float, bytearray]] = {}
    try:
        next_try = 0.0
        while True:
            now = time.monotonic()
            if now >= next_try:
                if pid is not None and not alive(pid, state):
                    raise VerifyFailed(f"{image}: QEMU exited before SSH came up\n{tail_block(state)}",
                                       f"serial console: {state.console}")
                if now >= end:
                    raise VerifyFailed(f"{image}: no SSH answer on 127.0.0.1:{port} within {deadline:.0f}s\n"
                                       f"{tail_block(state)}", f"serial console: {state.console}")
                _connect(sel, opened, port, now)
                next_try = now + interval
            for key, _events in sel.select(timeout=max(0.0, next_try - time.monotonic())):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                answer = _banner(conn, opened[conn][1])
                if answer is True:
                    return
                if answer is False:
                    _close(sel, opened, conn)
            for conn, (since, _got) in list(opened.items()):
                if time.monotonic() - since > patience:
                    _close(sel, opened, conn)
    finally:
        for conn in list(opened):
            _close(sel, opened, conn)
        sel.close()


def _connect(sel: selectors.BaseSelector, opened: dict[socket.socket, tuple[float, bytearray]], port: int,
             now: float) -> None:
    """Start one non-blocking connection to the forwarded port (watched for its first bytes)."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setblocking(False)
    conn.connect_ex(("127.0.0.1", port))  # in progress, refused or done: the selector tells
    sel.register(conn, selectors.EVENT_READ)
    opened[conn] = (now, bytearray())


def _banner(conn: socket.socket, got: bytearray) -> bool | None:
    """True: an SSH banner arrived; False: this connection is over (closed, refused, not SSH);
    None: not enough bytes yet (`got` keeps what came so far)."""
    try:
        data = conn.recv(256)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False
    if not data:
        return False
    got += data
    if len(got) < 4:
        return None
    return got.startswith(b"SSH-")


def _close(sel: selectors.BaseSelector, opened: dict[socket.socket, tuple[float, bytearray]],
           conn: socket.socket) -> None:
    sel.unregister(conn)
    opened.pop(conn, None)
    conn.close()


def tail_block(state: StatePaths) -> str:
    """The console tail as an indented block for an error message."""
    tail = console_tail(state)
    return "console log (last lines):\n" + "\n".join(f"  | {line}" for line in tail.splitlines()) if tail else "console log is empty"


def pin_host_keys(state: StatePaths, found: Sequence[str]) -> None:
    """First contact with this boot: pin the keys (accept-new, for this file only)."""
    current = read_value(state.known_hosts)
    if not current:
        write_value(state.known_hosts, "\n".join(found))


def ssh_argv(image: str, state: StatePaths, key: Path, user: str, port: int,
             command: Sequence[str] = (), *, batch: bool = False, first_contact: bool = False) -> list[str]:
    """ssh with this VM's own known_hosts, strict checking and only the given key (pure).
    `first_contact` (nothing pinned for this boot yet): ssh pins the key the guest presents
    into that file (accept-new), and checks strictly against it from then on."""
    argv = [
        "ssh", "-F", "none",  # the user's ~/.ssh/config must not redirect or multiplex this
        "-o", f"UserKnownHostsFile={state.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"StrictHostKeyChecking={'accept-new' if first_contact else 'yes'}",
        "-o", f"HostKeyAlias={host_key_alias(image)}",
        "-o", "IdentitiesOnly=yes",
        "-o", "ConnectTimeout=10",
        "-o", "LogLevel=ERROR",
        "-i", os.fspath(key), "-p", str(port),
    ]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    return argv + [f"{user}@127.0.0.1", *command]


def login_key(cfg: Config) -> Path:
    """defaults.ssh_key, else the project key (created on first use)."""
    return keys.project_key(cfg.output_dir, cfg.defaults.ssh_key)


def ensure_reachable(image: Image, state: StatePaths, deadline: float | None = None) -> int:
    """The running VM's port, once sshd answers and its keys are pinned."""
    st = read_status(image.name, state)
    if st.state != "running" or st.ssh_port is None:
        raise UsageError(f"{image.name} is not running", f"start it: invoke run {image.name}")
    wait = deadline if deadline is not None else SSH_DEADLINE.get(Accel(st.accelerator or "tcg"), 120.0)
    pin_host_keys(state, wait_for_ssh(image.name, state, st.ssh_port, wait, st.pid))
    return st.ssh_port


def ssh_session(cfg: Config, image: Image, command: Sequence[str], deadline: float | None = None) -> int:
    """`invoke ssh`: wait for sshd's banner, then ssh attached to this terminal; returns ssh's
    exit code. On the first contact with this boot (nothing pinned yet) that ssh pins the
    guest's key itself (the same trust-on-first-use as a keyscan, without a second key
    exchange: under TCG each one costs the guest about half a second)."""
    state = state_paths(cfg.output_dir, image.name)
    st = read_status(image.name, state)
    if st.state != "running" or st.ssh_port is None:
        raise UsageError(f"{image.name} is not running", f"start it: invoke run {image.name}")
    wait = deadline if deadline is not None else SSH_DEADLINE.get(Accel(st.accelerator or "tcg"), 120.0)
    key = login_key(cfg)
    wait_for_banner(image.name, state, st.ssh_port, wait, st.pid)
    first = not read_value(state.known_hosts)
    if first and (state.known_hosts.is_symlink() or not state.known_hosts.is_file()):
        atomic_write(state.known_hosts, "")  # ssh appends the key here: a real file, never a link's target
    return interactive(ssh_argv(image.name, state, key, image.ssh_user, st.ssh_port, command, first_contact=first))
