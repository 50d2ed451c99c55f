"""Debian roots for the test lanes: made with mmdebstrap, cached by content, run with mounts.

A lane runs the project in a root of another Debian suite: Debian 13 for the quick start, the
newest suite for the current toolchains. This module is the code they share:

- `ensure_root(suite, packages)` makes the root once and keeps it as a tarball under
  ~/.cache/imagepipe/lanes/roots/ (IMAGEPIPE_CACHE moves it), named by a hash of what it holds: the
  package list, the mirror, and the suite's InRelease file as the mirror serves it now (a new
  point release or a changed mirror gives a new root). The tarball is written beside its final
  name and renamed into place, so two runs never see half a root.
- `Root.unpack(tar)` gives a run its own copy in a fresh folder; `Root.run(argv)` runs a command
  inside it (chroot) with /proc, /dev (with /dev/pts) and /sys mounted, the host's resolver and
  the caches bound in. The mounts are made in a private mount namespace and a new PID namespace
  (`unshare --mount --pid --fork`): when the command ends, or its runner is killed, the kernel
  takes the mounts and every process left in the root away, so no exit path leaves a mount or a
  process behind. The root shares the host's network (a loopback sshd works as on the host).
- `Root.place_packer()` copies the host's packer into the root: Debian 13 and later have no
  packer package, and Debian 12's packer binary runs there.

Roots need root (mmdebstrap --mode=root, chroot, mounts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = "1"  # bump when the way a root is made changes (its options, hooks)
NEWEST = "forky"  # Debian's development suite: the newest Nix, QEMU, rsync, OpenSSH, Python
# The development suite's Release file on a mirror can be past its Valid-Until date.
SUITE_APTOPTS: Mapping[str, tuple[str, ...]] = {NEWEST: ('Acquire::Check-Valid-Until "false"',)}
# Environment variables a command in the root inherits from the lane (how to reach the package
# registries: proxies, pip's settings and certificates); everything else is set by the lane.
PASS_ENV = re.compile(r"^(PIP_\w+|(?:http|https|no|all)_proxy|(?:HTTP|HTTPS|NO|ALL)_PROXY|SSL_CERT_FILE|"
                      r"REQUESTS_CA_BUNDLE|CI|TERM)$")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LaneError(Exception):
    """A lane cannot run: the message says what is wrong and how to fix it."""


def cache_home() -> Path:
    """~/.cache/imagepipe/lanes (IMAGEPIPE_CACHE moves ~/.cache/imagepipe): the lanes' roots,
    .debs, apt's and pip's downloads, apart from what imagepipe itself caches beside them."""
    return Path(os.environ.get("IMAGEPIPE_CACHE") or Path.home() / ".cache" / "imagepipe") / "lanes"


def log(message: str) -> None:
    print(f"[lane] {message}", flush=True)


# ----------------------------------------------------------------------------- pure helpers


def parse_sources(texts: Iterable[str]) -> list[str]:
    """The URIs of `deb` entries in apt sources (one-line .list and deb822 .sources), in order."""
    uris: list[str] = []
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes").lower() != "no":
                uris += fields.get("URIs", "").split()
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", line)
            if m:
                uris.append(m.group(1))
    return uris


def pick_mirror(uris: Sequence[str]) -> str | None:
    """The Debian archive among apt's URIs (not the security archive), without a trailing /."""
    for uri in uris:
        if "security" not in uri and re.match(r"^https?://", uri):
            return uri.rstrip("/")
    return None


def root_key(suite: str, packages: Iterable[str], mirror: str, release_sha256: str,
             aptopts: Iterable[str] = ()) -> str:
    """The cache key of a root: what it is made of (sorted packages, mirror, Release, options)."""
    what = {"recipe": RECIPE, "suite": suite, "packages": sorted(set(packages)), "mirror": mirror,
            "release": release_sha256, "aptopts": list(aptopts)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def setup_packages(setup_sh: str) -> list[str]:
    """The Debian packages that setup.sh installs (its PACKAGES=( ... ) list), so a root can hold
    them already: one list, in one place."""
    m = re.search(r"^PACKAGES=\(\n?(.*?)^\)", setup_sh, re.MULTILINE | re.DOTALL)
    if not m:
        raise LaneError("setup.sh has no PACKAGES=( ... ) list")
    return [word for line in m.group(1).splitlines() for word in line.split("#")[0].split()]


def mountpoints_under(folder: Path, mountinfo: str) -> list[str]:
    """Mount points at or below `folder` in a /proc/self/mountinfo text (pure)."""
    prefix = str(folder).rstrip("/")
    found = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) > 4:
            point = parts[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


# ----------------------------------------------------------------------------- the mirror + cache


def host_mirror() -> str:
    """The Debian mirror the host's apt sources name (IMAGEPIPE_LANE_MIRROR overrides)."""
    if os.environ.get("IMAGEPIPE_LANE_MIRROR"):
        return os.environ["IMAGEPIPE_LANE_MIRROR"].rstrip("/")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    mirror = pick_mirror(parse_sources(f.read_text(encoding="utf-8", errors="replace") for f in files if f.is_file()))
    if mirror is None:
        raise LaneError("no Debian mirror in /etc/apt/sources.list*: set IMAGEPIPE_LANE_MIRROR=http://MIRROR/debian")
    return mirror


def release_sha256(mirror: str, suite: str) -> str:
    """sha256 of the suite's InRelease as the mirror serves it now (one small request)."""
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return hashlib.sha256(resp.read()).hexdigest()
    except OSError as exc:
        raise LaneError(f"cannot read {url}: {exc} (the lanes need Debian's mirror)") from exc


def require_root_and_tools() -> None:
    """Lanes make roots, chroot and mount: root and mmdebstrap are needed."""
    if os.geteuid() != 0:
        raise LaneError("the lanes need root (mmdebstrap --mode=root, chroot, mounts): run them as root "
                        "(CI does), or leave them out: tests/run --no-lanes")
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux"), ("tar", "tar")):
        if shutil.which(tool) is None:
            raise LaneError(f"{tool} not found: install it with `sudo apt-get install {package}` (setup.sh does)")


def ensure_root(suite: str, packages: Sequence[str], *, variant: str = "minbase") -> Path:
    """The cached tarball of a `suite` root holding `packages` (made now when missing)."""
    mirror = host_mirror()
    aptopts = SUITE_APTOPTS.get(suite, ())
    key = root_key(suite, [*packages, f"variant={variant}"], mirror, release_sha256(mirror, suite), aptopts)
    folder = cache_home() / "roots"
    tar = folder / f"{suite}-{key}.tar"
    if tar.is_file():
        log(f"{suite} root: cached {tar.name}")
        return tar
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{tar.name}.{os.getpid()}.tmp"
    argv = ["mmdebstrap", "--mode=root", "--format=tar", f"--variant={variant}", "--skip=cleanup/apt/lists",
            *[f"--aptopt={opt}" for opt in aptopts],
            f"--include={','.join(sorted(set(packages)))}", suite, str(tmp), mirror]
    log(f"{suite} root: making it with mmdebstrap ({len(set(packages))} packages; cached afterwards as {tar.name})")
    started = time.monotonic()
    try:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        tmp.unlink(missing_ok=True)
        raise LaneError(f"mmdebstrap failed for {suite} (exit {exc.returncode}): {shlex_join(argv)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, tar)
    log(f"{suite} root: made in {time.monotonic() - started:.0f} s ({tar.stat().st_size / 2**20:.0f} MiB)")
    for old in folder.glob(f"{suite}-*.tar"):  # earlier roots of this suite (an older Release)
        if old != tar and time.time() - old.stat().st_mtime > 7 * 86400:
            old.unlink(missing_ok=True)
    return tar


def shlex_join(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


def processes_in(root: Path) -> list[int]:
    """Pids whose root directory is `root` or below it (chrooted there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                where = os.readlink(entry / "root")
            except OSError:
                continue
            if where == str(root) or where.startswith(f"{root}/"):
                found.append(int(entry.name))
    return found


# ----------------------------------------------------------------------------- running inside

# PID 1 of the root's PID namespace, run by the host's Python before the chroot: mounts /proc,
# /dev (rbind: /dev/pts with it) and /sys in the root, binds what the spec asks, then runs the
# command chrooted, forwards Ctrl-C/TERM to it and reaps every orphan until it ends. Its exit
# ends the namespaces: the kernel kills what is left and drops the mounts.
INIT = r"""
import json, os, signal, subprocess, sys
spec = json.loads(sys.argv[1])
root = spec["root"]
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("--bind", root, root)  # the root a mount point of its own: `ip netns exec` makes / a slave mount
mount("-t", "proc", "proc", root + "/proc")
mount("--rbind", "/dev", root + "/dev")
mount("--rbind", "/sys", root + "/sys")
mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", root + "/run")
for src, dst, ro in spec["binds"]:
    target = root + dst
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    mount("--bind", src, target)
    if ro:
        mount("-o", "remount,bind,ro", target)
child = os.fork()
if child == 0:
    os.chroot(root)
    os.chdir(spec["cwd"])
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: os.kill(child, signum))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(1)
    except InterruptedError:
        continue
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


@dataclass
class Root:
    """One run's own copy of a root (a fresh folder), and how to run commands in it."""

    path: Path
    binds: list[tuple[str, str, bool]] = field(default_factory=list)  # (host path, path in root, read-only)

    @classmethod
    def unpack(cls, tar: Path, name: str) -> Root:
        """A fresh copy of the root in tarball `tar`, under $TMPDIR (or /var/tmp)."""
        base = Path(os.environ.get("TMPDIR") or "/var/tmp")
        path = Path(tempfile.mkdtemp(prefix=f"imagepipe-lane-{name}-", dir=base))
        started = time.monotonic()
        subprocess.run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(path)], check=True)
        log(f"root unpacked in {time.monotonic() - started:.0f} s at {path}")
        root = cls(path)
        root.trust_host_cas()
        if Path("/etc/resolv.conf").exists():
            root.binds.append(("/etc/resolv.conf", "/etc/resolv.conf", True))
        return root

    def cache(self, name: str, inside: str) -> Path:
        """Bind ~/.cache/imagepipe/lanes/NAME (made when missing) at `inside` in the root."""
        folder = cache_home() / name
        folder.mkdir(parents=True, exist_ok=True)
        self.binds.append((str(folder), inside, False))
        return folder

    def trust_host_cas(self) -> None:
        """The root trusts the certificate authorities the host's administrator added (a proxy's CA,
        for pip): the host's local CAs and its bundle are copied in."""
        local = Path("/usr/local/share/ca-certificates")
        if local.is_dir():
            shutil.copytree(local, self.path / local.relative_to("/"), dirs_exist_ok=True)
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            (self.path / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, self.path / bundle.relative_to("/"))

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The command's environment: a clean one, with how to reach the registries passed on
        (host paths the root lacks, such as a local wheel folder of pip's, are left out)."""
        env = {}
        for key, value in os.environ.items():
            if PASS_ENV.match(key):
                kept = [v for v in value.split() if not v.startswith("/") or (self.path / v.lstrip("/")).exists()]
                if kept:
                    env[key] = " ".join(kept)
        env.update({"PATH": PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8",
                    "SHELL": "/bin/sh", "PYTHONUNBUFFERED": "1"})
        env.update(extra or {})
        return env

    def run(self, argv: Sequence[str], *, cwd: str = "/", env: Mapping[str, str] | None = None,
            check: bool = True, capture: bool = False, tee: bool = False,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the root (see INIT); its output goes to ours unless `capture`
        (`tee`: both, stdout and stderr merged into the result's stdout)."""
        spec = {"root": str(self.path), "argv": list(argv), "cwd": cwd, "env": self.environment(env),
                "binds": self.binds}
        outer = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
                 sys.executable, "-I", "-c", INIT, json.dumps(spec)]
        if tee:
            res = _tee(outer, timeout)
        else:
            res = subprocess.run(outer, text=True, capture_output=capture, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            tail = f"\n{res.stdout[-2000:]}{res.stderr[-2000:]}" if capture else ""
            raise LaneError(f"in the root, `{shlex_join(argv)}` failed (exit {res.returncode}){tail}")
        return res

    def output(self, argv: Sequence[str], **kwargs: object) -> str:
        """A command's stdout+stderr (checked)."""
        res = self.run(argv, capture=True, **kwargs)  # type: ignore[arg-type]
        return (res.stdout + res.stderr).strip()

    def place_packer(self, source: str | None = None) -> str:
        """Copy the host's packer (PACKER, else the one on PATH) to /usr/local/bin/packer in the
        root; returns its `packer version`."""
        src = source or os.environ.get("PACKER") or shutil.which("packer")
        if not src or not os.access(src, os.X_OK):
            raise LaneError("the lane places the host's packer in the root and there is none: install it "
                            "(./setup.sh does) or set PACKER=/path/to/packer")
        dest = self.path / "usr/local/bin/packer"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), dest)
        return self.output(["packer", "version"], env={"CHECKPOINT_DISABLE": "1"})

    def clone_project(self, checkout: Path, inside: str = "/root/imagepipe") -> str:
        """A clone of `checkout`'s HEAD (committed files only) at `inside`."""
        dest = self.path / inside.lstrip("/")
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(checkout), str(dest)], check=True)
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        log(f"project: a clone of {checkout} at {head} (committed files only) in {inside}")
        return inside

    def remove(self) -> None:
        """Delete the copy, refusing while anything is still mounted below it or a process still
        runs in it (neither can happen: both went with the namespaces; this checks that)."""
        mounted = mountpoints_under(self.path, Path("/proc/self/mountinfo").read_text(encoding="utf-8"))
        if mounted:
            raise LaneError(f"not removing {self.path}: still mounted there: {', '.join(mounted)}")
        running = processes_in(self.path)
        if running:
            raise LaneError(f"not removing {self.path}: processes still run in it: {running}")
        shutil.rmtree(self.path)


def _tee(argv: Sequence[str], timeout: float | None) -> subprocess.CompletedProcess[str]:
    """Run `argv` with its output shown as it comes and kept (stderr merged into stdout)."""
    deadline = time.monotonic() + timeout if timeout else None
    kept: list[str] = []
    with subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            kept.append(line)
            if deadline and time.monotonic() > deadline:
                proc.kill()
                kept.append(f"[lane] timed out after {timeout:.0f} s\n")
                break
        code = proc.wait()
    return subprocess.CompletedProcess(list(argv), code, "".join(kept), "")


# ----------------------------------------------------------------------------- .deb cache


def deb_cache(root_tar: Path) -> Path:
    """The demo guest's .debs of one root: ~/.cache/imagepipe/lanes/debs/SUITE-KEY (the root's key:
    its suite's Release). Within one Release a name_version_arch.deb never changes, and the demo
    takes whatever .deb of a package its folder holds, so each Release gets a folder of its own."""
    return cache_home() / "debs" / root_tar.stem


def seed_debs(cache: Path, folder: Path) -> int:
    """Link the cached .debs into `folder` (the demo guest's download folder in the root)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for deb in cache.glob("*.deb") if cache.is_dir() else ():
        target = folder / deb.name
        if not target.exists():
            try:
                os.link(deb, target)
            except OSError:
                shutil.copyfile(deb, target)
            count += 1
    return count


def keep_debs(folder: Path, cache: Path) -> int:
    """Add the .debs a run downloaded into `folder` to the cache (temp file + rename)."""
    cache.mkdir(parents=True, exist_ok=True)
    added = 0
    for deb in folder.glob("*.deb") if folder.is_dir() else ():
        target = cache / deb.name
        if target.exists():
            continue
        tmp = cache / f".{deb.name}.{os.getpid()}.tmp"
        shutil.copyfile(deb, tmp)
        os.replace(tmp, target)
        added += 1
    return added
