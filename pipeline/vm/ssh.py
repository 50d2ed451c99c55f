"""SSH into a running VM: wait for a real key exchange, pin the guest's host keys in its state
folder, and ssh with strict checking against that file only (~/.ssh/known_hosts is never used)."""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline import keys
from pipeline.base.errors import StorageError, UsageError, VerifyFailed
from pipeline.base.fsutil import atomic_write, private_dir
from pipeline.base.run import interactive, run
from pipeline.model import Accel, Config, Image
from pipeline.vm.qmp import disk_full
from pipeline.vm.state import (
    StatePaths,
    alive,
    console_tail,
    read_status,
    read_value,
    write_value,
)

# How long a guest may take to answer SSH on its first boot. A full systemd guest under KVM/HVF:
# fresh UEFI variables (shim's fallback loader adds a boot entry), a generic initramfs, host keys
# generated: well under a minute on an idle host, more on a loaded one, so 180 s. TCG runs the
# same boot several times slower (a Debian 13 guest: 59 s to SSH here, against ~10 s under KVM).
KVM_SSH_DEADLINE = 180.0
TCG_SLOWDOWN = 4
SSH_DEADLINE = {Accel.TCG: KVM_SSH_DEADLINE * TCG_SLOWDOWN, Accel.KVM: KVM_SSH_DEADLINE, Accel.HVF: KVM_SSH_DEADLINE}


def ssh_deadline(accel: Accel, configured: float | None = None) -> float:
    """The wait for SSH: `configured` (test-image --timeout, defaults.boot_timeout) when set,
    else by accelerator."""
    return float(configured) if configured else SSH_DEADLINE[accel]
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
        raise_if_disk_full(image, state)
        if pid is not None and not alive(pid, state):
            raise VerifyFailed(f"{image}: QEMU exited before SSH came up\n{tail_block(state)}",
                               f"serial console: {state.console}")
        if time.monotonic() >= end:
            raise VerifyFailed(f"{image}: no SSH answer on 127.0.0.1:{port} within {deadline:.0f}s\n{tail_block(state)}",
                               f"serial console: {state.console}")
        time.sleep(interval)


def raise_if_disk_full(image: str, state: StatePaths) -> None:
    """StorageError when the VM paused because a write found the host's disk full (QEMU's
    werror=enospc): waiting on would only wait out the deadline."""
    device = disk_full(state.qmp, timeout=2.0)
    if device is not None:
        raise StorageError(f"{image}: the VM ran out of disk space: a write to {device} found the host's disk "
                           "full and QEMU paused the guest",
                           "free some space where it writes (the instance's folder; a -snapshot overlay, as the boot "
                           "test's, is in $TMPDIR, /var/tmp by default), then `invoke stop` and start it again")


def wait_for_banner(image: str, state: StatePaths, port: int, deadline: float, pid: int | None = None,
                    quick: float = 0.5, slow: float = 3.0, slow_after: float = 10.0,
                    retry: float = 0.1) -> socket.socket:
    """Wait until the guest's sshd sends its banner (`SSH-...`) on 127.0.0.1:`port`, in-process;
    returns the connection that brought it, open, the banner still unread (only peeked at), for
    the login to use (`hand_over`): sshd accepts no further connection for it.

    QEMU's user network accepts a forwarded connection at once and holds it while the guest
    cannot answer (no address yet); it completes a held connection only when it next retries
    it, and then every held one at once, and sshd accepts each of them. A connection the guest
    closes (network up, sshd not listening yet) ends at once. So connections are tried one at a
    time: each is given up after `quick` s of silence and the next starts `retry` s after, so
    sshd is seen within about `quick` s of starting, and sshd gets no queue of held connections
    when the guest comes up (measured on the demo guest: more, a new one every 0.5 s or every
    0.1 s with two or three open, made boot-to-SSH slower and had dropbear refuse a login on a
    new connection: 5 unauthenticated per client). After `slow_after` s one more, slow
    connection runs beside them, given `slow` s: an sshd that is up but slow to send its banner
    (OpenSSH starts a process per connection; under TCG that can take longer than `quick`)
    is still waited for. VerifyFailed with the console tail on timeout or when QEMU dies
    meanwhile."""
    end = time.monotonic() + deadline
    patience = {"quick": quick, "slow": slow}
    due = {"quick": 0.0, "slow": time.monotonic() + slow_after}  # when the next one of each kind may start
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float]] = {}  # kind, since
    try:
        while True:
            now = time.monotonic()
            if pid is not None and not alive(pid, state):
                raise VerifyFailed(f"{image}: QEMU exited before SSH came up\n{tail_block(state)}",
                                   f"serial console: {state.console}")
            if now >= end:
                raise VerifyFailed(f"{image}: no SSH answer on 127.0.0.1:{port} within {deadline:.0f}s\n"
                                   f"{tail_block(state)}", f"serial console: {state.console}")
            running = {kind for kind, _since in opened.values()}
            for kind in patience:
                if kind not in running and now >= due[kind]:
                    opened[_connect(sel, port)] = (kind, now)
            wake = [since + patience[kind] for kind, since in opened.values()]
            wake += [t for kind, t in due.items() if kind not in running and t > now]
            for key, _events in sel.select(timeout=max(0.0, min([*wake, end]) - time.monotonic())):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                answer = _banner(conn)
                if answer is True:
                    sel.unregister(conn)
                    del opened[conn]
                    conn.setblocking(True)
                    return conn
                if answer is False:
                    due[opened.pop(conn)[0]] = time.monotonic() + retry
                    sel.unregister(conn)
                    conn.close()
            for conn, (kind, since) in list(opened.items()):
                if time.monotonic() - since >= patience[kind]:
                    due[kind] = time.monotonic() + retry
                    del opened[conn]
                    sel.unregister(conn)
                    conn.close()
    finally:
        for conn in opened:
            sel.unregister(conn)
            conn.close()
        sel.close()


def _connect(sel: selectors.BaseSelector, port: int) -> socket.socket:
    """Start one non-blocking connection to the forwarded port (watched for its first bytes)."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setblocking(False)
    conn.connect_ex(("127.0.0.1", port))  # in progress, refused or done: the selector tells
    sel.register(conn, selectors.EVENT_READ)
    return conn


def _banner(conn: socket.socket) -> bool | None:
    """True: an SSH banner arrived; False: this connection is over (closed, refused, not SSH);
    None: not enough bytes yet. The bytes are only peeked at: they stay in the socket for the ssh
    that logs in over it."""
    try:
        data = conn.recv(256, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False
    if not data:
        return False
    if len(data) < 4:
        if not b"SSH-".startswith(data):
            return False
        time.sleep(0.01)  # peeked bytes stay readable: wait for the rest without spinning
        return None
    return data.startswith(b"SSH-")


def tail_block(state: StatePaths) -> str:
    """The console tail as an indented block for an error message."""
    tail = console_tail(state)
    if not tail:
        return "console log is empty"
    return "console log (last lines):\n" + "\n".join(f"  | {line}" for line in tail.splitlines())


def pin_host_keys(state: StatePaths, found: Sequence[str]) -> None:
    """First contact with this boot: pin the keys (accept-new, for this file only)."""
    current = read_value(state.known_hosts)
    if not current:
        write_value(state.known_hosts, "\n".join(found))


def ssh_argv(image: str, state: StatePaths, key: Path, user: str, port: int,
             command: Sequence[str] = (), *, batch: bool = False, first_contact: bool = False,
             extra: Sequence[str] = ()) -> list[str]:
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
    return argv + [*extra, f"{user}@127.0.0.1", *command]


def login_key(cfg: Config) -> Path:
    """defaults.ssh_key, else the project key (created on first use)."""
    return keys.project_key(cfg.output_dir, cfg.defaults.ssh_key)


def ensure_reachable(image: Image, state: StatePaths, deadline: float | None = None) -> int:
    """The running VM's port, once sshd answers and its keys are pinned."""
    st = read_status(image.name, state)
    if st.state != "running" or st.ssh_port is None:
        raise UsageError(f"{image.name} is not running", f"start it: invoke run {image.name}")
    raise_if_disk_full(image.name, state)
    wait = deadline if deadline is not None else SSH_DEADLINE.get(Accel(st.accelerator or "tcg"), SSH_DEADLINE[Accel.TCG])
    pin_host_keys(state, wait_for_ssh(image.name, state, st.ssh_port, wait, st.pid))
    return st.ssh_port


# ssh's ProxyCommand under ProxyUseFdpass: fetch the open connection from `hand_over`'s socket
# (argv[1]) and pass it on to ssh over stdout, ssh's end of a socket pair. One line: ssh takes
# the option's value up to the end of the line.
RECEIVE_FD = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
              "fds=socket.recv_fds(s,1,1)[1];socket.send_fds(socket.socket(fileno=1),[bytes(1)],fds)")


@contextlib.contextmanager
def hand_over(conn: socket.socket) -> Iterator[list[str]]:
    """ssh options that make ssh log in over `conn`, the connection that brought sshd's banner
    (still unread): its ProxyCommand fetches it from a unix socket in a new 0700 folder, served
    once by a thread here. sshd then accepts no second connection for the login (under TCG a
    new one costs the guest a fork and a banner, behind whatever else QEMU delivers then)."""
    folder = private_dir()
    path = folder / "fd"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    listener.listen(1)
    listener.settimeout(60)

    def serve() -> None:
        try:
            peer, _ = listener.accept()
            with peer:
                socket.send_fds(peer, [bytes(1)], [conn.fileno()])
        except OSError:
            pass  # ssh never asked (it failed first): it says why itself
        finally:
            conn.close()

    thread = threading.Thread(target=serve, name="ssh-hand-over", daemon=True)
    thread.start()
    command = shlex.join([sys.executable, "-I", "-S", "-c", RECEIVE_FD, os.fspath(path)]).replace("%", "%%")
    try:
        yield ["-o", "ProxyUseFdpass=yes", "-o", f"ProxyCommand={command}"]
    finally:
        with contextlib.suppress(OSError):  # wakes a serve() still waiting in accept (close alone does not)
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=5)
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)


def ssh_session(cfg: Config, name: str, state: StatePaths, image: Image, command: Sequence[str],
                deadline: float | None = None) -> int:
    """`invoke ssh NAME`: wait for sshd's banner, then ssh attached to this terminal, over the
    connection that brought the banner; returns ssh's exit code. On the first contact with this
    boot (nothing pinned yet) that ssh pins the guest's key itself (the same trust-on-first-use
    as a keyscan, without a second key exchange: under TCG each one costs the guest about half a
    second). It logs in as the image's ssh_user with this machine's key (defaults.ssh_key or the
    project key), which the image's build or the instance's seed authorized. `state`: the
    instance's state folder (pipeline.vm.instances.login_target); `image`: its image."""
    st = read_status(name, state)
    if st.state != "running" or st.ssh_port is None:
        raise UsageError(f"{name} is not running", f"start it: invoke run {image.name}"
                         + (f" --name {name}" if name != image.name else ""))
    wait = deadline if deadline is not None else SSH_DEADLINE.get(Accel(st.accelerator or "tcg"), SSH_DEADLINE[Accel.TCG])
    key = login_key(cfg)
    raise_if_disk_full(name, state)
    conn = wait_for_banner(name, state, st.ssh_port, wait, st.pid)
    with hand_over(conn) as via:
        first = fresh_known_hosts(state)
        # ssh runs ProxyCommand with $SHELL: the POSIX shell, whatever the user's login shell is
        return interactive(ssh_argv(name, state, key, image.ssh_user, st.ssh_port, command,
                                    first_contact=first, extra=via), env={"SHELL": "/bin/sh"})


def fresh_known_hosts(state: StatePaths) -> bool:
    """True when nothing is pinned for this boot yet; the file is then made a real, empty file
    (ssh appends the key there, never to a link's target)."""
    first = not read_value(state.known_hosts)
    if first and (state.known_hosts.is_symlink() or not state.known_hosts.is_file()):
        atomic_write(state.known_hosts, "")
    return first
