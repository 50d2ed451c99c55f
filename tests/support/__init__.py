"""The one set of helpers the tests share (fixtures live in tests/conftest.py, the test sshd in
tests/support/sshd.py): the project root, the invoke runner, configs, keys, copies of a published
output folder and of the project, deadline-bounded waits and the process scan.

Nothing here changes the environment when imported."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from pipeline.base.errors import AccelUnavailable
from pipeline.model import Accel, Arch

if TYPE_CHECKING:
    from pipeline.plan import AccelChoice

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent.parent  # the project checkout

# Debian's nix-bin as root in a container (MACHINE.md); conftest's session fixture puts it in the
# environment unless the caller has their own NIX_CONFIG.
NIX_CONFIG = "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command flakes"


@functools.cache
def nix_store_writable() -> bool:
    """Whether nix can write its store for this user: root, a nix daemon to ask, or a store the
    user owns (a single-user install in their name). Debian's nix-bin as anyone else has none."""
    return (os.geteuid() == 0 or Path("/nix/var/nix/daemon-socket/socket").exists()
            or (os.access("/nix/store", os.W_OK) and os.access("/nix/var/nix", os.W_OK)))


# Tests that run the local nix: even `nix-instantiate --parse` takes nix's locks under /nix/var.
NEEDS_NIX_STORE = pytest.mark.needs_root(
    "runs the local nix, which writes under /nix: root's with a single-user nix and no daemon",
    unless=nix_store_writable)


@functools.cache
def sshd_gives_pty() -> bool:
    """Whether the test sshd, started by this user, can give a session a pty: sshd chowns it to
    group tty, which only root or a member of tty may do ("chown(/dev/pts/N, uid, 5) failed")."""
    import grp

    try:
        tty = grp.getgrnam("tty").gr_gid
    except KeyError:
        return os.geteuid() == 0
    return os.geteuid() == 0 or tty in os.getgroups()


# Tests whose builder runs a remote build: imagepipe asks for a pty there (^C reaches the build).
NEEDS_PTY = pytest.mark.needs_root(
    "the test sshd runs as this user and must give the remote build a pty (needs root or group tty)",
    unless=sshd_gives_pty)


def require_tool(name: str, package: str) -> str:
    """A tool the test needs; missing → the test FAILS with the install hint (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install it with `sudo apt-get install {package}` (.ci/run does)")
    return path


def write_config(path: Path, output_dir: Path, extra: dict | None = None) -> Path:
    """A runtime config (invoke -f) pointing output_dir at a temp folder, its instances isolated
    (defaults.instance_network: isolated); `extra` merged in."""
    import yaml

    # instances the tests start reach nothing but their forwarded SSH port (restrict=on)
    data: dict = {"defaults": {"output_dir": str(output_dir), "instance_network": "isolated"}}
    for key, value in (extra or {}).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def invoke(args: list[str], config: Path | None = None, *, timeout: float = 600, env: dict | None = None,
           cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m invoke [-f config] ARGS` in `cwd` (the project, or a copy of it) as a user
    would: a separate process, its real exit code, output captured."""
    argv = [sys.executable, "-m", "invoke", *(["-f", str(config)] if config else []), *args]
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def keygen(path: Path, comment: str = "imagepipe-test") -> Path:
    """An unencrypted ed25519 key pair at `path` (+ .pub), made by the real ssh-keygen."""
    require_tool("ssh-keygen", "openssh-client")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, timeout=30)
    return path


def published_copy(demo_build: tuple[Path, Path], dest: Path, *, cache: bool = False,
                   extra: dict | None = None, config: str = "test.yaml") -> tuple[Path, Path]:
    """A private copy of the session's published demo output in dest/output, and a config
    pointing there: (config file, output dir). Tests that change an output folder work on this;
    the session's build stays as built. Links stay links; no VM state, instance or lock is copied; the
    history through sqlite's backup API (a WAL database is more than its main file); the guest
    cache (`cache`) for a test that builds again."""
    import sqlite3

    _, src = demo_build  # (or the session's debian_build: any published output folder)
    out = dest / "output"
    out.mkdir(parents=True, exist_ok=True)
    for image in (p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "instances"):
        shutil.copytree(image, out / image.name, symlinks=True,
                        ignore=shutil.ignore_patterns("run", "boot-test", ".lock"))
    shutil.copytree(src / ".keys", out / ".keys")
    if (src / "history.db").exists():
        with sqlite3.connect(src / "history.db") as a, sqlite3.connect(out / "history.db") as b:
            a.backup(b)
        b.close()
        a.close()
    if cache and (src / ".cache").exists():
        shutil.copytree(src / ".cache", out / ".cache", symlinks=True, ignore=shutil.ignore_patterns("root", "merged"))
    return write_config(dest / config, out, extra), out


PROJECT_PARTS = ("tasks.py", "invoke.yaml", "pyproject.toml", "pipeline", "packer", "kickstart", "nixos", "debian")

# What a Debian image's build needs on the host (tool, Debian package), checked by the debian_build fixture.
DEBIAN_TOOLS = (("mmdebstrap", "mmdebstrap"), ("sfdisk", "fdisk"), ("mke2fs", "e2fsprogs"), ("debugfs", "e2fsprogs"),
                ("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"), ("unshare", "util-linux"), ("qemu-img", "qemu-utils"),
                ("qemu-system-x86_64", "qemu-system-x86"))


# What a copy of the whole checkout leaves out: VCS data, the build output and the virtualenv at
# the top only (pipeline/output/ is code), caches and build metadata anywhere.
_TOP_ONLY = frozenset({".git", "output", ".venv", "venv"})
_ANYWHERE = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info")


def checkout_copy(dest: Path) -> Path:
    """A copy of the whole checkout, as a user's project folder is synced to a builder."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = _TOP_ONLY.intersection(names) if Path(folder) == ROOT else set()
        return top | set(_ANYWHERE(folder, names))

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def project_copy(dest: Path, parts: tuple[str, ...] = PROJECT_PARTS) -> Path:
    """A throwaway copy of the project (code, tasks.py, invoke.yaml and the generated files)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in parts:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "result*", ".git"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


HOLD_IMAGE_LOCK = """
import json, sys
from pathlib import Path
from pipeline.output.history import image_lock
with image_lock(Path(sys.argv[1]), **json.loads(sys.argv[2])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_image_lock(image_dir: Path, **kwargs: object) -> subprocess.Popen[str]:
    """A real second process inside `image_lock(image_dir, **kwargs)` (flock is per open file, so
    a thread of ours would not do), returned once it holds the lock; it lets go when its stdin
    closes (`proc.communicate("")`) or when it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IMAGE_LOCK, str(image_dir), json.dumps(kwargs)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked", "the holder did not get the lock"
    return proc


def wait_until(check: Callable[[], T], timeout: float, what: str,
               seen: Callable[[], object] | None = None, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; when `timeout` s pass, FAIL the test naming
    `what` was awaited and what `seen()` shows at that moment (never a silent hang or a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            shown = seen() if seen else result
            pytest.fail(f"waited {timeout:.0f}s for {what}; last seen: {shown!r}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (exited, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def accel_here(requested: Accel = Accel.AUTO, guest: Arch = Arch.X86_64, *,
               purpose: str = "run") -> AccelChoice | AccelUnavailable:
    """What imagepipe's decision function gives on THIS host (probed, not assumed): the choice, or
    the refusal it raises. Tests compare the CLI's output with this, so they hold on a KVM laptop
    as on a TCG-only CI box; the table tests in tests/unit cover every host kind by hand."""
    from pipeline.host import probe
    from pipeline.plan import choose_accel

    try:
        return choose_accel(requested, probe(tools=()), guest, purpose=purpose)
    except AccelUnavailable as exc:
        return exc


# ------------------------------------------------------------------------------ processes


def live_processes_mentioning(text: str) -> list[str]:
    """`pid: command line` (first 200 characters) of the live processes (zombies left out) whose
    command line, arguments joined by spaces as pipeline.base.procs.cmdline shows it, contains `text`
    (so "-I -S -c" matches three arguments)."""
    from pipeline.base import procs

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmd = procs.cmdline(int(entry.name))
        if cmd is not None and text in cmd:
            found.append(f"{entry.name}: {cmd[:200]}")
    return found


def live_pids_mentioning(text: str) -> list[int]:
    """The pids of live_processes_mentioning(text)."""
    return [int(line.split(":", 1)[0]) for line in live_processes_mentioning(text)]


def wait_gone(text: str, timeout: float = 30) -> None:
    """Poll until no live process mentions `text`; fail listing what is left."""
    wait_until(lambda: not live_processes_mentioning(text), timeout, f"no process mentioning {text}",
               lambda: "\n".join(live_processes_mentioning(text)))


class Background:
    """`python -m invoke -f CFG ARGS` in the project, in its own session (its whole process group
    can be killed), its output collected line by line by a reader thread so that every wait on it
    has a deadline even when it prints nothing."""

    def __init__(self, cfg: Path, args: list[str], env: dict[str, str] | None = None, *,
                 pause_at: str | None = None, resume: Path | None = None) -> None:
        import os
        import subprocess
        import sys
        import threading

        # pause_at: the build holds there (tests/support/paused.py) until `resume` exists
        held = ["tests.support.paused", pause_at, *(["--resume", str(resume)] if resume else []), "--"]
        command = [*(held if pause_at else ["invoke"]), "-f", str(cfg), *args]
        self.proc = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT,
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, *texts: str, timeout: float = 300) -> str:
        """Wait until a line holds one of `texts` (returns that line); fail with the output so far
        if the command exits first or `timeout` s pass."""
        def seen() -> str | None:
            hit = next((line for line in list(self.lines) for t in texts if t in line), None)
            if hit is None and self.proc.poll() is not None:
                self.reader.join(timeout=5)
                hit = next((line for line in list(self.lines) for t in texts if t in line), None)
                if hit is None:
                    pytest.fail(f"exited {self.proc.returncode} before {texts!r}:\n{self.output()}")
            return hit

        return wait_until(seen, timeout, f"a line with {' or '.join(map(repr, texts))}", self.output)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the command to exit (its output fully read); its exit code."""
        import subprocess

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running after {timeout:.0f}s:\n{self.output()}")
        self.reader.join(timeout=30)
        return code
