"""The only way imagepipe starts a subprocess.

argv lists in, `shlex.join` in the log, a pinned environment, a typed failure out. Long-running
tools (packer, nix, qemu) go through `stream()`, which puts them in their own process group so
that an interrupt can stop them *and everything they started* (packer's qemu) before cleanup.

When imagepipe itself dies (kill -9, the OOM killer, a closed terminal) what it started dies too:

- `stream()` starts the tool under a tiny leash process (LEASH below: a few lines of Python,
  stdlib only) that leads the tool's process group. The leash asks the kernel for a signal when
  its parent dies (Linux: prctl PR_SET_PDEATHSIG; elsewhere it polls getppid) and then SIGKILLs
  the whole group — the tool and everything it started, such as packer's QEMU, which the
  tool's own parent-death signal would not reach (the setting is not inherited over fork).
  Otherwise the leash only waits: signals meant for the tool (Ctrl-C, SIGTERM) reach it through
  the group, and the leash exits with the tool's status.
- `run()` children get PR_SET_PDEATHSIG=SIGKILL set between fork and exec (Linux).
- `tie_to_us(pid)` watches a process that is not our child (the boot test's daemonized QEMU)
  the same way, for as long as the block runs.

The kernel sends the parent-death signal when the *thread* that started the child ends, not the
process: every caller here blocks in the thread that started the child until the child is done
(`tie_to_us` is used from the main thread), so the two coincide.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.errors import CommandFailed, Interrupted, ToolMissing

log = logging.getLogger("imagepipe.run")

# How to install each tool, per package manager (apt: Debian/Ubuntu, dnf: Fedora/EL, brew:
# macOS, nix: any host with Nix). `install_hint` picks the host's manager; "*" is for any.
HASHICORP = "https://developer.hashicorp.com/packer/install"
NIX_INSTALLER = "install Nix with the installer from https://nixos.org/download"
INSTALL_HINTS: dict[str, dict[str, str]] = {
    "packer": {"apt": "sudo apt-get install packer   (Debian 12; where the distribution has none, as Debian 13,"
                      f" the project's ./setup.sh adds HashiCorp's apt repository; or {HASHICORP})",
               "dnf": f"sudo dnf install packer   (from HashiCorp's repository: {HASHICORP})",
               "brew": "brew install hashicorp/tap/packer", "nix": "nix profile install nixpkgs#packer"},
    "qemu-system-x86_64": {"apt": "sudo apt-get install qemu-system-x86", "dnf": "sudo dnf install qemu-system-x86",
                           "brew": "brew install qemu", "nix": "nix profile install nixpkgs#qemu"},
    "qemu-system-aarch64": {"apt": "sudo apt-get install qemu-system-arm qemu-efi-aarch64",
                            "dnf": "sudo dnf install qemu-system-aarch64 edk2-aarch64",
                            "brew": "brew install qemu", "nix": "nix profile install nixpkgs#qemu"},
    "qemu-img": {"apt": "sudo apt-get install qemu-utils", "dnf": "sudo dnf install qemu-img",
                 "brew": "brew install qemu", "nix": "nix profile install nixpkgs#qemu"},
    "xorriso": {"apt": "sudo apt-get install xorriso", "dnf": "sudo dnf install xorriso",
                "brew": "brew install xorriso", "nix": "nix profile install nixpkgs#xorriso"},
    "nix": {"apt": f"sudo apt-get install nix-bin   (or {NIX_INSTALLER})", "*": NIX_INSTALLER},
    "nix-instantiate": {"apt": "sudo apt-get install nix-bin", "*": NIX_INSTALLER},
    "ssh": {"apt": "sudo apt-get install openssh-client", "dnf": "sudo dnf install openssh-clients",
            "brew": "brew install openssh", "nix": "nix profile install nixpkgs#openssh"},
    "gpgv": {"apt": "sudo apt-get install gpgv", "dnf": "sudo dnf install gnupg2", "brew": "brew install gnupg",
             "nix": "nix profile install nixpkgs#gnupg"},
    "rsync": {"apt": "sudo apt-get install rsync", "dnf": "sudo dnf install rsync", "brew": "brew install rsync",
              "nix": "nix profile install nixpkgs#rsync"},
    "limactl": {"brew": "brew install lima", "nix": "nix profile install nixpkgs#lima",
                "*": "install Lima from https://lima-vm.io/docs/installation/ (apt and dnf do not package it);"
                     " on Linux, invoke run boots the images in QEMU without it"},
    "openssl": {"apt": "sudo apt-get install openssl", "dnf": "sudo dnf install openssl",
                "brew": "brew install openssl", "nix": "nix profile install nixpkgs#openssl"},
    "apt-get": {"*": "the demo guest is assembled from Debian packages: build it on Debian or Ubuntu"},
    "dpkg-deb": {"apt": "sudo apt-get install dpkg", "dnf": "sudo dnf install dpkg", "brew": "brew install dpkg",
                 "nix": "nix profile install nixpkgs#dpkg"},
    "cpio": {"apt": "sudo apt-get install cpio", "dnf": "sudo dnf install cpio", "brew": "brew install cpio",
             "nix": "nix profile install nixpkgs#cpio"},
    "debugfs": {"apt": "sudo apt-get install e2fsprogs", "dnf": "sudo dnf install e2fsprogs",
                "brew": "brew install e2fsprogs", "nix": "nix profile install nixpkgs#e2fsprogs"},
    "systemd-analyze": {"apt": "sudo apt-get install systemd", "dnf": "sudo dnf install systemd",
                        "*": "systemd-analyze comes with systemd (Linux only)"},
    "mmdebstrap": {"apt": "sudo apt-get install mmdebstrap arch-test debian-archive-keyring",
                   "dnf": "sudo dnf install mmdebstrap", "*": "mmdebstrap builds Debian roots: build on Debian or Ubuntu"},
    "sfdisk": {"apt": "sudo apt-get install fdisk", "dnf": "sudo dnf install util-linux"},
    "mke2fs": {"apt": "sudo apt-get install e2fsprogs", "dnf": "sudo dnf install e2fsprogs"},
    "mkfs.vfat": {"apt": "sudo apt-get install dosfstools", "dnf": "sudo dnf install dosfstools"},
    "mcopy": {"apt": "sudo apt-get install mtools", "dnf": "sudo dnf install mtools"},
    "unshare": {"apt": "sudo apt-get install util-linux", "dnf": "sudo dnf install util-linux"},
    "chroot": {"apt": "sudo apt-get install coreutils", "dnf": "sudo dnf install coreutils"},
    "qemu-aarch64-static": {"apt": "sudo apt-get install qemu-user-static binfmt-support",
                            "dnf": "sudo dnf install qemu-user-static"},
    "qemu-x86_64-static": {"apt": "sudo apt-get install qemu-user-static binfmt-support",
                           "dnf": "sudo dnf install qemu-user-static"},
    # UEFI firmware (not tools, but installed the same way)
    "uefi-x86_64": {"apt": "sudo apt-get install ovmf", "dnf": "sudo dnf install edk2-ovmf",
                    "brew": "brew install qemu   (ships edk2-x86_64-code.fd)", "nix": "nix profile install nixpkgs#OVMF"},
    "uefi-aarch64": {"apt": "sudo apt-get install qemu-efi-aarch64", "dnf": "sudo dnf install edk2-aarch64",
                     "brew": "brew install qemu   (ships edk2-aarch64-code.fd; or export QEMU_EFI_AARCH64=...)",
                     "nix": "nix profile install nixpkgs#OVMF"},
}
for _tool in ("ssh-keygen", "ssh-keyscan"):
    INSTALL_HINTS[_tool] = INSTALL_HINTS["ssh"]

# The first manager found on PATH is the host's (per OS, in this order).
MANAGERS = {"darwin": (("brew", "brew"), ("nix", "nix-env")),
            "linux": (("apt", "apt-get"), ("dnf", "dnf"), ("dnf", "yum"), ("nix", "nix-env"))}


def package_manager(os_name: str | None = None, on_path: Callable[[str], bool] | None = None) -> str | None:
    """apt, dnf, brew or nix: how a host installs software (None when none is known); by default
    this host, else the OS and PATH test given (a builder's, from its probe)."""
    import platform  # noqa: PLC0415 (kept off the no-op build and the input hash)

    os_name = os_name or platform.system().lower()
    found = on_path or (lambda prog: shutil.which(prog) is not None)
    return next((name for name, prog in MANAGERS.get(os_name, ()) if found(prog)), None)


# Variables that would change a tool's behaviour or output behind our back.
PINNED_ENV = {"LC_ALL": "C.UTF-8", "CHECKPOINT_DISABLE": "1", "PACKER_NO_COLOR": "1"}

PR_SET_PDEATHSIG = 1
# The leash (see the module docstring), run as `python -I -S -c LEASH MODE PARENT ...`:
#   group PARENT ARGV...   fork+exec ARGV in our process group; SIGKILL the group if PARENT dies
#   watch PARENT PID START SIGKILL process PID (if it still has start time START) if PARENT dies
LEASH = r"""
import os, signal, sys, time
mode, parent, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def start_of(pid, like):
    if like.startswith("ps:"):
        import subprocess
        try:
            out = subprocess.run(["ps", "-o", "stat=", "-o", "lstart=", "-p", str(pid)], stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=30,
                                 env={"PATH": os.environ.get("PATH", "/bin:/usr/bin"), "LC_ALL": "C", "LANG": "C",
                                      "TZ": "UTC"}).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return None
        return None if len(out) < 2 or out[0].startswith("Z") else "ps:" + " ".join(out[1:])
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
def orphaned(*_):
    try:
        if mode == "group":
            os.killpg(0, signal.SIGKILL)
        elif start_of(int(rest[0]), rest[1]) == rest[1]:
            os.kill(int(rest[0]), signal.SIGKILL)
    finally:
        os._exit(137)
signal.signal(signal.SIGUSR2, orphaned)
linux = sys.platform.startswith("linux")
if linux:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR2, 0, 0, 0)
if os.getppid() != parent:
    orphaned()
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda *_: None)
if mode == "watch":
    while True:
        if linux:
            signal.pause()
        else:
            time.sleep(0.5)
            if os.getppid() != parent:
                orphaned()
child = os.fork()
if child == 0:
    try:
        os.execv(rest[0], rest)
    except OSError as exc:
        os.write(2, ("cannot run %s: %s\n" % (rest[0], exc.strerror)).encode())
    os._exit(127)
while True:
    done, status = os.waitpid(child, 0 if linux else os.WNOHANG)
    if done:
        break
    time.sleep(0.5)
    if os.getppid() != parent:
        orphaned()
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code & 0xFF)
"""

# Told about every process group stream() starts (build.py records them in the history, so the
# next command can stop what a killed build left behind).
_on_group: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "imagepipe_on_group", default=None)


@dataclass(frozen=True)
class Result:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# Tools whose binary a variable may name (PACKER=/opt/packer/packer): that one is used instead of
# a search. setup.sh honours the same variable.
TOOL_VARIABLES = {"packer": "PACKER"}


def tool_dirs() -> list[str]:
    """Where tools are searched: PATH, then the folder of imagepipe's own Python (the project's
    .venv/bin, where setup.sh links the packer it was given in PACKER), so `.venv/bin/invoke`
    finds it without an activated venv."""
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    here = os.path.dirname(os.path.abspath(sys.executable)) if sys.executable else ""
    return dirs + [here] if here and here not in dirs else dirs


def locate(tool: str) -> str | None:
    """The binary `tool` names here: the path in its variable (TOOL_VARIABLES) when set, else the
    first one in tool_dirs(); None when there is none (or the variable names no executable)."""
    variable = TOOL_VARIABLES.get(tool)
    named = os.environ.get(variable, "") if variable else ""
    if named:
        return os.path.abspath(named) if os.path.isfile(named) and os.access(named, os.X_OK) else None
    return shutil.which(tool, path=os.pathsep.join(tool_dirs()))


def which(tool: str, hint: str | None = None) -> str:
    """Absolute path of `tool`, or ToolMissing with how to install it."""
    path = locate(tool)
    if path is None:
        variable = TOOL_VARIABLES.get(tool)
        if variable and os.environ.get(variable):
            raise ToolMissing(f"{variable}={os.environ[variable]} is not an executable file",
                              f"point {variable} at the {tool} binary, or unset it to use the {tool} on PATH")
        raise ToolMissing(f"{tool} not found on PATH", hint or install_hint(tool))
    return path


def install_hint(tool: str, manager: str | None = None) -> str:
    """How to install `tool` with `manager` (default: this host's package manager)."""
    ways = INSTALL_HINTS.get(tool, {})
    manager = manager or package_manager()
    way = ways.get(manager or "") or ways.get("*")
    if way is None:
        return f"install {tool} with your package manager" + (f" ({manager})" if manager else "")
    return "install with: " + way if way.startswith(("sudo ", "brew ", "nix ")) else way


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every subprocess gets: ours, pinned, plus `extra`."""
    env = dict(os.environ)
    env.update(PINNED_ENV)
    if extra:
        env.update(extra)
    return env


def _resolve(argv: Sequence[str]) -> list[str]:
    if not argv:
        raise ValueError("empty argv")
    args = [os.fspath(a) for a in argv]
    if "/" not in args[0]:
        args[0] = which(args[0])
    return args


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    input: str | None = None,
    hint: str | None = None,
) -> Result:
    """Run a short command to completion, capturing its output.

    `env` adds to the pinned environment; its values are never logged (passwords go there,
    never into argv).
    """
    shown = [os.fspath(a) for a in argv]
    args = _resolve(shown)
    log.debug("run: %s", shlex.join(shown))
    try:
        proc = subprocess.run(
            args, cwd=cwd, env=environment(env), input=input, capture_output=True,
            text=True, errors="replace", timeout=timeout, check=False, preexec_fn=_die_with_us(),
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise CommandFailed(shown, -1, _tail(out), hint=f"timed out after {timeout:.0f}s") from exc
    result = Result(tuple(shown), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(shown, proc.returncode, _tail(proc.stdout + proc.stderr), hint=hint)
    return result


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _die_with_us() -> Callable[[], None] | None:
    """A preexec function (Linux): the child gets SIGKILL when this process dies; if we died
    before it was set, the child ends at once. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415 (kept off the no-op build and the input hash)

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(137)

    return preexec


def leashed(args: Sequence[str]) -> list[str]:
    """`args` run under the leash (its own process group, SIGKILLed with us)."""
    return [sys.executable, "-I", "-S", "-c", LEASH, "group", str(os.getpid()), *args]


@contextlib.contextmanager
def tool_groups(on_group: Callable[[int], None]) -> Iterator[None]:
    """Call `on_group(pgid)` for every process group stream() starts within the block (and the
    hook of an enclosing block too)."""
    outer = _on_group.get()

    def both(pgid: int) -> None:
        on_group(pgid)
        if outer is not None:
            outer(pgid)

    token = _on_group.set(both)
    try:
        yield
    finally:
        _on_group.reset(token)


@contextlib.contextmanager
def tie_to_us(pid: int, start: str | None) -> Iterator[None]:
    """While the block runs, SIGKILL process `pid` (still with start time `start`) if this
    process dies: for processes that are not our children (a daemonized QEMU)."""
    if start is None:
        yield
        return
    watcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", LEASH, "watch", str(os.getpid()), str(pid), start],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        watcher.kill()
        watcher.wait()


def stream(
    argv: Sequence[str | os.PathLike[str]],
    *,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float | None = None,
    check: bool = True,
    grace: float = 15.0,
    hint: str | None = None,
) -> Result:
    """Run a long command in its own process group, line by line.

    Every line goes to `log_path` (if given) and to `on_line`. On KeyboardInterrupt, SIGTERM
    (see `interrupt_guard`) or timeout the whole process group gets SIGINT (the tool's own
    cleanup), then SIGKILL after `grace` seconds, so nothing it started is left behind.
    """
    shown = [os.fspath(a) for a in argv]
    args = _resolve(shown)
    log.debug("stream: %s", shlex.join(shown))
    tail: deque[str] = deque(maxlen=40)
    logf = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    proc = subprocess.Popen(
        leashed(args), cwd=cwd, env=environment(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, start_new_session=True,
    )
    deadline = time.monotonic() + timeout if timeout else None
    try:
        on_group = _on_group.get()
        if on_group is not None:
            on_group(proc.pid)
        with _alarm_at(deadline):
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                if logf:
                    logf.write(raw if raw.endswith("\n") else raw + "\n")
                    logf.flush()
                if on_line:
                    on_line(line)
            returncode = proc.wait()
    except _Timeout:
        stop_group(proc, grace)
        raise CommandFailed(shown, -1, "\n".join(tail), hint=f"timed out after {timeout:.0f}s") from None
    except (KeyboardInterrupt, Interrupted) as exc:
        stop_group(proc, grace)
        raise Interrupted(f"interrupted: stopped {Path(args[0]).name} and its children") from exc
    except BaseException:
        stop_group(proc, grace)
        raise
    finally:
        if logf:
            logf.close()
    _kill_leftovers(proc.pid)
    result = Result(tuple(shown), returncode, "\n".join(tail))
    if check and returncode != 0:
        raise CommandFailed(shown, returncode, "\n".join(tail), hint=hint)
    return result


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm_at(deadline: float | None) -> Iterator[None]:
    """Raise _Timeout in the main thread when `deadline` passes (a blocked read included)."""
    # signal handlers can only be set in the main thread (remote builds run builders in threads)
    if (deadline is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)):
        yield
        return

    def _fire(signum: int, frame: object) -> None:
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def stop_group(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGINT the process group, wait up to `grace` s, then SIGKILL whatever is left."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _kill_leftovers(pgid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _kill_leftovers(pgid: int) -> None:
    """SIGKILL anything still in the group (a qemu that outlived its packer)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Interrupted` for the duration, so cleanups run as for Ctrl-C
    (SIGHUP: the SSH session of a remote build went away)."""

    def _term(signum: int, frame: object) -> None:
        raise Interrupted(f"terminated ({signal.Signals(signum).name})")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _term) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interactive(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run a command attached to this terminal (an SSH session, a VM's console); its exit code.

    The child shares our stdin/stdout/stderr and the terminal's process group, so Ctrl-C reaches
    it directly and it decides what Ctrl-C means (ssh forwards it, QEMU's console passes it to
    the guest). We keep waiting through our own KeyboardInterrupt instead of killing it: the
    session ends when the child ends.
    """
    shown = [os.fspath(a) for a in argv]
    args = _resolve(shown)
    log.debug("interactive: %s", shlex.join(shown))
    proc = subprocess.Popen(args, cwd=cwd, env=environment(env))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue
