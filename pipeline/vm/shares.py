"""Shared folders (`invoke run IMAGE --share HOST_DIR[:TAG]`): a host folder mounted in the guest
at /mnt/TAG, through virtiofs (virtiofsd serves it) or 9p (QEMU serves it itself).

Which one is a pure decision from what each side has (`choose_method`):

    host    virtiofsd (found by `find_virtiofsd`), and QEMU's devices (`-device help`):
            vhost-user-fs-pci (Linux; QEMU on macOS has no vhost-user) and virtio-9p-pci
    guest   the file systems the image's kernel mounts (the profile's `guest_filesystems`:
            the Debian cloud kernels and AlmaLinux have virtiofs and no 9p; NixOS has both)

virtiofs is preferred; 9p is used where virtiofs cannot work and both sides have 9p (QEMU on
macOS with a NixOS guest). When neither works, the error says which side lacks what.

virtiofsd comes in two kinds with different options: the Rust one (Debian 13's `virtiofsd`
package, Fedora, the newest QEMU setups; `--shared-dir`) and the C one that QEMU up to 7.2 shipped
(Debian 12's qemu-system-common: /usr/lib/qemu/virtiofsd; `-o source=`). Each share gets one
daemon, started before QEMU in its own session (it outlives this command, as the detached QEMU
does) and ending by itself when QEMU disconnects; `stop_daemons` ends any that did not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.base import procs
from pipeline.base.errors import HostUnsuitable, UsageError
from pipeline.base.numbers import int_or_none
from pipeline.base.run import run
from pipeline.vm.argv import ShareDevice
from pipeline.vm.state import StatePaths, read_value, write_value

TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,36}")  # virtiofs tags are at most 36 bytes
METHODS = ("virtiofs", "9p")
KNOWN_VIRTIOFSD = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
VHOST_USER_DIRS = ("/etc/qemu/vhost-user", "/usr/share/qemu/vhost-user")
SOCKET_WAIT = 15.0


@dataclass(frozen=True)
class Share:
    """A shared folder of an instance: the host folder (its real path) and its tag."""

    path: str
    tag: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "tag": self.tag}


@dataclass(frozen=True)
class HostShares:
    """What this host offers for shared folders."""

    virtiofsd: Path | None
    vhost_user_fs: bool   # QEMU has vhost-user-fs-pci
    virtio_9p: bool       # QEMU has virtio-9p-pci
    os: str = "linux"


# ------------------------------------------------------------------------------- parsing


def default_tag(path: str) -> str:
    """A tag from a folder's name: characters outside [A-Za-z0-9_-] become '-', at most 36."""
    tag = re.sub(r"[^A-Za-z0-9_-]", "-", os.path.basename(os.path.normpath(path)))[:36].strip("-")
    return tag or "share"


def split_spec(spec: str) -> tuple[str, str | None]:
    """`HOST_DIR[:TAG]` → (dir, tag or None); a ':' followed by a valid tag ends the dir."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and TAG_RE.fullmatch(tail):
        return head, tail
    return spec, None


def check_folder(raw: str, base: Path | None = None) -> str:
    """The real path of a folder to share; refused: missing, not a folder, or a symbolic link
    (it leads out of where the user pointed: the folder it leads to is named instead)."""
    given = Path(os.path.expanduser(raw))
    path = given if given.is_absolute() else (base or Path.cwd()) / given
    if path.is_symlink():
        target = os.path.realpath(path)
        raise UsageError(f"--share {raw}: {path} is a symbolic link to {target}",
                         f"imagepipe shares the folder you name, never where a link leads: share {target} "
                         "itself if that is the folder you mean")
    if not path.exists():
        raise UsageError(f"--share {raw}: {path} does not exist", "create the folder first, or check the path")
    if not path.is_dir():
        raise UsageError(f"--share {raw}: {path} is not a folder", "share a folder (its files appear under /mnt/TAG)")
    return os.path.realpath(path)


def parse_shares(specs: Iterable[str], base: Path | None = None) -> tuple[Share, ...]:
    """--share values → shares (paths checked, tags unique); `none` alone means no shares."""
    specs = [s for s in specs if s]
    if specs == ["none"]:
        return ()
    out: list[Share] = []
    for spec in specs:
        raw, tag = split_spec(spec)
        real = check_folder(raw, base)
        tag = tag or default_tag(real)
        if not TAG_RE.fullmatch(tag):
            raise UsageError(f"--share {spec}: tag {tag!r} is not valid", "a tag is 1-36 letters, digits, '_' or '-'")
        if any(s.tag == tag for s in out):
            raise UsageError(f"--share {spec}: the tag {tag!r} is given twice",
                             "give each folder its own tag: --share DIR:TAG")
        out.append(Share(real, tag))
    return tuple(out)


# ------------------------------------------------------------------------------- deciding


def parse_devices(help_text: str) -> tuple[bool, bool]:
    """`qemu-system-* -device help` → (has vhost-user-fs-pci, has virtio-9p-pci)."""
    names = set(re.findall(r'name "([^"]+)"', help_text))
    return "vhost-user-fs-pci" in names, "virtio-9p-pci" in names


def choose_method(host: HostShares, guest: frozenset[str], image: str) -> str:
    """virtiofs when both sides can, else 9p when both sides can, else HostUnsuitable saying
    which side lacks what."""
    if "virtiofs" in guest and host.virtiofsd is not None and host.vhost_user_fs:
        return "virtiofs"
    if "9p" in guest and host.virtio_9p:
        return "9p"
    guest_has = " and ".join(m for m in METHODS if m in guest) or "neither virtiofs nor 9p"
    lacks = []
    if "virtiofs" in guest:
        if not host.vhost_user_fs:
            lacks.append("this host's QEMU has no vhost-user-fs device (QEMU on macOS has no vhost-user), "
                         "so no virtiofs")
        elif host.virtiofsd is None:
            lacks.append("this host has no virtiofsd")
    if "9p" in guest and not host.virtio_9p:
        lacks.append("this host's QEMU has no 9p device (virtio-9p-pci)")
    if "9p" not in guest:
        lacks.append(f"the guest ({image}) has no 9p in its kernel")
    hint = ("install virtiofsd (Debian 13 and later: apt-get install virtiofsd; Debian 12: qemu-system-common "
            "has /usr/lib/qemu/virtiofsd; Fedora: dnf install virtiofsd), or point defaults.virtiofsd at one"
            if "virtiofs" in guest and host.vhost_user_fs and host.virtiofsd is None else
            "run this image on a Linux host with virtiofsd, or use an image whose kernel has 9p (the project's NixOS)")
    raise HostUnsuitable(f"{image}: a shared folder cannot work on this host with this guest: the guest mounts "
                         f"{guest_has}; " + "; ".join(lacks), hint)


def find_virtiofsd(configured: str | None = None, *, which: Callable[[str], str | None] = shutil.which,
                   exists: Callable[[str], bool] = os.path.exists,
                   descriptors: Callable[[], list[str]] | None = None) -> Path | None:
    """virtiofsd: defaults.virtiofsd (it must exist), else on PATH, else a known place, else
    QEMU's vhost-user descriptors (*.json of type "fs", the way libvirt finds it)."""
    if configured:
        path = os.path.expanduser(configured)
        if not exists(path):
            raise UsageError(f"defaults.virtiofsd: {path} does not exist", "point it at a virtiofsd binary, or remove it")
        return Path(path)
    found = which("virtiofsd")
    if found:
        return Path(found)
    for path in [*KNOWN_VIRTIOFSD, *(descriptors or vhost_user_binaries)()]:
        if exists(path):
            return Path(path)
    return None


def vhost_user_binaries(dirs: Sequence[str] = VHOST_USER_DIRS) -> list[str]:
    """The binaries QEMU's vhost-user descriptors of type "fs" name (first folder first)."""
    out = []
    for folder in dirs:
        for desc in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(desc.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("type") == "fs" and isinstance(data.get("binary"), str):
                    out.append(data["binary"])
    return out


def probe_host(qemu_binary: str, configured: str | None, os_name: str = "linux") -> HostShares:
    """This host's side: virtiofsd and the QEMU devices (one `-device help`)."""
    res = run([qemu_binary, "-device", "help"], check=False, timeout=30)
    vhost, ninep = parse_devices(res.stdout + res.stderr)
    return HostShares(find_virtiofsd(configured), vhost, ninep, os_name)


# ------------------------------------------------------------------------------- virtiofsd


def is_rust(help_text: str) -> bool:
    """The Rust virtiofsd names its folder with --shared-dir; the C one with -o source=."""
    return "--shared-dir" in help_text


def virtiofsd_argv(binary: Path, rust: bool, socket: Path, folder: str) -> list[str]:
    """One virtiofsd serving `folder` on `socket` (pure)."""
    if rust:
        return [os.fspath(binary), f"--socket-path={socket}", f"--shared-dir={folder}", "--cache=auto"]
    return [os.fspath(binary), f"--socket-path={socket}", "-o", f"source={folder}", "-o", "cache=auto"]


def pid_file(state: StatePaths, tag: str) -> Path:
    return state.root / f"virtiofsd-{tag}.pid"


def log_file(state: StatePaths, tag: str) -> Path:
    return state.root / f"virtiofsd-{tag}.log"


def devices(state: StatePaths, shares: Sequence[Share], method: str) -> tuple[ShareDevice, ...]:
    """The shares as QEMU's devices (virtiofs: the sockets `start_daemons` serves)."""
    if method == "virtiofs":
        return tuple(ShareDevice(s.tag, "virtiofs", socket=state.socket(f"vfs-{s.tag}")) for s in shares)
    return tuple(ShareDevice(s.tag, "9p", path=Path(s.path)) for s in shares)


def start_daemons(state: StatePaths, shares: Sequence[Share], binary: Path, say: Callable[[str], None]) -> None:
    """One virtiofsd per share, each in its own session, up once its socket exists; on any
    failure the ones started are stopped again and the log's tail is in the error."""
    help_res = run([binary, "--help"], check=False, timeout=30)
    rust = is_rust(help_res.stdout + help_res.stderr)
    try:
        for share in shares:
            _start_one(state, share, binary, rust)
    except BaseException:
        stop_daemons(state)
        raise
    say(f"shared folders: {', '.join(f'{s.path} at /mnt/{s.tag}' for s in shares)} (virtiofs, {binary})")


def _start_one(state: StatePaths, share: Share, binary: Path, rust: bool) -> None:
    sock = state.socket(f"vfs-{share.tag}")
    sock.unlink(missing_ok=True)
    argv = virtiofsd_argv(binary, rust, sock, share.path)
    log = log_file(state, share.tag)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    write_value(pid_file(state, share.tag), str(proc.pid))
    deadline = time.monotonic() + SOCKET_WAIT
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            tail = log.read_text(errors="replace").strip()[-600:] if log.exists() else ""
            raise HostUnsuitable(f"virtiofsd for {share.path} did not start (exit {proc.returncode}): {tail or 'no output'}",
                                 f"its log: {log}; virtiofsd needs root here (or unprivileged user namespaces)")
        time.sleep(0.05)


def _ours(pid: int, state: StatePaths, tag: str) -> bool:
    """A live process is this share's virtiofsd when its command line names its socket."""
    cmd = procs.cmdline(pid)
    return cmd is not None and os.fspath(state.socket(f"vfs-{tag}")) in cmd


def stop_daemons(state: StatePaths, grace: float = 5.0) -> None:
    """End this instance's virtiofsd daemons that are still running (after QEMU: they end
    with it) and remove their pid files; never a process that is not one of ours."""
    for pid_path in sorted(state.root.glob("virtiofsd-*.pid")):
        tag = pid_path.name[len("virtiofsd-"):-len(".pid")]
        pid = int_or_none(read_value(pid_path), lo=1, hi=2**31)
        if pid is not None and _ours(pid, state, tag):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while _ours(pid, state, tag) and time.monotonic() < end:
                time.sleep(0.05)
            if _ours(pid, state, tag):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        pid_path.unlink(missing_ok=True)
        state.socket(f"vfs-{tag}").unlink(missing_ok=True)
