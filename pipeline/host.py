"""Host facts: a command plus a pure parser for each, so local and remote hosts probe alike.

`probe(runner)` runs the commands through `runner` (local: `local_runner`; remote: a Fabric
Connection adapter in pipeline.builders.remote) and assembles `HostFacts`. The parsers are pure
functions over command output and are tested with plain asserts. (A little over 450 lines: each
fact's command and parser stay side by side, so the local and the remote probe cannot drift;
the firmware lookup lives in pipeline.firmware.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.base.errors import CommandFailed, MachinesError, ToolMissing
from pipeline.base.fsutil import atomic_write
from pipeline.base.numbers import int_or_none
from pipeline.base.run import Result, locate, package_manager, run
from pipeline.firmware import FirmwareInfo, find_firmware, local_descriptors
from pipeline.model import Arch
from pipeline.nixmachines import Machine, configured

Runner = Callable[[Sequence[str]], Result]

# Opening /dev/kvm read-write is the real test (a present device node is not enough).
KVM_SNIPPET = (
    "import os,sys\n"
    "try:\n    os.close(os.open('/dev/kvm', os.O_RDWR)); print('ok')\n"
    "except FileNotFoundError: print('missing')\n"
    "except OSError as e: print('denied:' + (e.strerror or str(e)))\n"
)

# tool -> argv that prints its version
TOOL_VERSION_ARGS: dict[str, tuple[str, ...]] = {
    "packer": ("packer", "version"),
    "qemu-system-x86_64": ("qemu-system-x86_64", "--version"),
    "qemu-system-aarch64": ("qemu-system-aarch64", "--version"),
    "qemu-img": ("qemu-img", "--version"),
    "xorriso": ("xorriso", "-version"),
    "nix": ("nix", "--version"),
    "ssh": ("ssh", "-V"),
    "rsync": ("rsync", "--version"),
    "limactl": ("limactl", "--version"),
    "python3": ("python3", "--version"),
    "mke2fs": ("mke2fs", "-V"),
}

VERSION_RE = re.compile(r"([0-9]{1,9}\.[0-9]{1,9}(?:\.[0-9]{1,9})?(?:p[0-9]{1,9})?)")


@dataclass(frozen=True)
class ToolInfo:
    name: str
    found: bool
    version: str | None = None

    @property
    def major_minor(self) -> tuple[int, int] | None:
        if not self.version:
            return None
        m = re.match(r"([0-9]{1,9})\.([0-9]{1,9})", self.version)
        return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class KvmFacts:
    device: bool          # /dev/kvm exists
    rw: bool              # opens read-write
    cpu_virt: bool | None  # vmx/svm in /proc/cpuinfo (None: not applicable / unknown)
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.device and self.rw and self.cpu_virt is not False

    def why_not(self) -> str:
        """One line saying why KVM cannot be used (empty when it can)."""
        if not self.device:
            return "/dev/kvm does not exist (no KVM module, or not Linux)"
        if not self.rw:
            return f"/dev/kvm cannot be opened read-write ({self.detail or 'permission denied'}): add yourself to group kvm"
        if self.cpu_virt is False:
            return "/dev/kvm exists but the CPU has no vmx/svm flag (nested virtualisation is off): guests would hang"
        return ""


@dataclass(frozen=True)
class HostFacts:
    """What one probe found out about a host; passed down, never probed again in a command."""

    os: str                      # "linux", "darwin", ...
    machine: str                 # raw `uname -m`
    kvm: KvmFacts
    hvf: bool
    tools: Mapping[str, ToolInfo] = field(default_factory=dict)
    firmware: Mapping[Arch, FirmwareInfo] = field(default_factory=dict)
    free_disk: int | None = None  # bytes free under the output dir
    nix_config: Mapping[str, str] | None = None  # `nix config show` (None: not probed / no nix)
    nix_builders: tuple[Machine, ...] = ()       # nix's remote builders (`builders`, machines files)
    nix_builders_error: str | None = None        # why they could not be read (a line nix rejects)
    package_manager: str | None = None  # apt, dnf, brew, nix: what install hints name
    cpu_flags: frozenset[str] | None = None      # x86 CPU flags, /proc/cpuinfo names (None: unknown / not x86)

    @property
    def cpu_level(self) -> int | None:
        """The host CPU's x86-64 microarchitecture level (1-4); None when unknown or not x86."""
        return x86_level(self.cpu_flags) if self.cpu_flags is not None else None

    @property
    def arch(self) -> Arch | None:
        return Arch.from_machine(self.machine)

    def tool(self, name: str) -> ToolInfo:
        return self.tools.get(name, ToolInfo(name, False))

    def version(self, name: str) -> tuple[int, ...] | None:
        """A probed tool's version as numbers, e.g. (1, 6, 6); None when missing or unreadable."""
        text = self.tool(name).version
        m = re.match(r"([0-9]{1,9}(?:\.[0-9]{1,9})*)", text or "")
        return tuple(int(p) for p in m.group(1).split(".")) if m else None


# --------------------------------------------------------------------------------- parsers


def parse_uname(out: str) -> tuple[str, str]:
    """`uname -sm` → ("linux", "x86_64")."""
    parts = out.split()
    if len(parts) < 2:
        return ("unknown", "unknown")
    return (parts[0].lower(), parts[-1])


def parse_cpu_virt(cpuinfo: str, machine: str) -> bool | None:
    """True when /proc/cpuinfo shows vmx or svm (x86); None where flags do not tell (arm)."""
    if Arch.from_machine(machine) is not Arch.X86_64:
        return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"vmx", "svm"})
    return False if cpuinfo.strip() else None


# The x86-64 psABI levels as /proc/cpuinfo names them (SSE3 is `pni`, LZCNT is `abm`); each
# level also needs everything of the ones below. The same list as glibc's get-isa-level.h.
X86_LEVELS: dict[int, frozenset[str]] = {
    1: frozenset({"lm", "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2"}),
    2: frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    3: frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    4: frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
}

# macOS names (sysctl machdep.cpu.features, leaf7_features, extfeatures) -> /proc/cpuinfo names
DARWIN_FLAGS = {
    "SSE": "sse", "SSE2": "sse2", "SSE3": "pni", "SSSE3": "ssse3", "SSE4.1": "sse4_1", "SSE4.2": "sse4_2",
    "CX8": "cx8", "CX16": "cx16", "CMOV": "cmov", "FPU": "fpu", "FXSR": "fxsr", "MMX": "mmx",
    "SYSCALL": "syscall", "EM64T": "lm", "LAHF": "lahf_lm", "POPCNT": "popcnt", "AVX1.0": "avx",
    "AVX2": "avx2", "BMI1": "bmi1", "BMI2": "bmi2", "F16C": "f16c", "FMA": "fma", "LZCNT": "abm",
    "MOVBE": "movbe", "XSAVE": "xsave", "AVX512F": "avx512f", "AVX512BW": "avx512bw",
    "AVX512CD": "avx512cd", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
}


def x86_level(flags: Iterable[str]) -> int:
    """The highest x86-64 level whose flags (and all lower levels' flags) are present; 0: none."""
    have = set(flags)
    level = 0
    for n in sorted(X86_LEVELS):
        if not X86_LEVELS[n] <= have:
            break
        level = n
    return level


def missing_for(flags: Iterable[str], level: int) -> list[str]:
    """The flags `flags` lacks to reach `level`, sorted."""
    have = set(flags)
    return sorted(f for n in range(1, level + 1) for f in X86_LEVELS[n] - have)


def parse_cpu_flags(cpuinfo: str, machine: str) -> frozenset[str] | None:
    """The first `flags` line of /proc/cpuinfo on x86 (None elsewhere or when absent)."""
    if Arch.from_machine(machine) is not Arch.X86_64:
        return None
    return _first_list(cpuinfo, "flags")


def parse_cpu_features(cpuinfo: str) -> frozenset[str]:
    """The CPU's features as /proc/cpuinfo lists them: x86's `flags` or arm64's `Features` line
    (empty when neither is there)."""
    return _first_list(cpuinfo, "flags") or _first_list(cpuinfo, "Features") or frozenset()


def _first_list(cpuinfo: str, key: str) -> frozenset[str] | None:
    for line in cpuinfo.splitlines():
        if line.startswith(key):
            return frozenset(line.partition(":")[2].split())
    return None


def parse_darwin_cpu_flags(sysctl: str) -> frozenset[str] | None:
    """`sysctl -n machdep.cpu.features machdep.cpu.leaf7_features machdep.cpu.extfeatures` on an
    Intel Mac -> /proc/cpuinfo-style flags (None when the output holds none: Apple Silicon)."""
    flags = frozenset(DARWIN_FLAGS[t] for t in sysctl.upper().split() if t in DARWIN_FLAGS)
    return flags or None


def parse_kvm_open(out: str) -> tuple[bool, bool, str]:
    """Output of KVM_SNIPPET → (device exists, opens rw, detail)."""
    text = out.strip()
    if text == "ok":
        return True, True, ""
    if text.startswith("denied:"):
        return True, False, text.partition(":")[2]
    return False, False, text


def parse_hvf(out: str, returncode: int) -> bool:
    return returncode == 0 and out.strip() == "1"


def parse_version(tool: str, out: str) -> str | None:
    """First version-looking token of a tool's version output."""
    first = next((line for line in out.splitlines() if line.strip()), "")
    if tool == "ssh":  # "OpenSSH_9.2p1 Debian-2, OpenSSL ..."
        m = re.search(r"OpenSSH_([\w.]+)", out)
        return m.group(1) if m else None
    m = VERSION_RE.search(first) or VERSION_RE.search(out)
    return m.group(1) if m else None


def parse_nix_config(text: str) -> dict[str, str]:
    """`nix config show` (older: `nix show-config`) output, `key = value` lines, as a dict."""
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key.strip():
            settings[key.strip()] = value.strip()
    return settings


# Programs whose presence tells the package manager (see pipeline.base.run.MANAGERS).
MANAGER_PROGRAMS = ("apt-get", "dnf", "yum", "brew", "nix-env")
MANAGER_ARGV = ("sh", "-c", "command -v apt-get dnf yum brew nix-env")  # a constant: nothing is interpolated


def parse_package_manager(os_name: str, out: str) -> str | None:
    """`command -v apt-get dnf ...` output (found programs' paths) -> apt, dnf, brew, nix or None."""
    found = {line.strip().rsplit("/", 1)[-1] for line in out.splitlines() if line.strip()}
    return package_manager(os_name, on_path=lambda prog: prog in found)


def parse_df(out: str) -> int | None:
    """`df -Pk PATH` → free bytes."""
    lines = [line for line in out.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    cols = lines[-1].split()

    free = int_or_none(cols[3]) if len(cols) > 3 else None
    return free * 1024 if free is not None else None


# --------------------------------------------------------------------------------- probing


def local_runner(argv: Sequence[str]) -> Result:
    """Run a probe command here (through run()); a missing program is rc 127, not an exception."""
    try:
        return run(argv, check=False, timeout=20)
    except ToolMissing:
        return Result(tuple(argv), 127, "")
    except (CommandFailed, OSError) as exc:  # timed out, or not executable
        return Result(tuple(argv), 126, "", str(exc))


def kvm_open_here() -> str:
    """KVM_SNIPPET's answer for this process's host, without starting a Python for it."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return "missing\n"
    except OSError as e:
        return "denied:" + (e.strerror or str(e)) + "\n"
    return "ok\n"


def in_process_runner(argv: Sequence[str]) -> Result:
    """local_runner, with the local probe's fixed questions (uname, /proc/cpuinfo, can /dev/kvm
    be opened, free disk, nix's machines files, the package manager) answered here: the same
    text the command would print, the same parsers read it, and no process is started (each one
    costs 50-100 ms on a busy host)."""
    args = tuple(argv)
    if args == ("uname", "-sm"):
        u = os.uname()
        return Result(args, 0, f"{u.sysname} {u.machine}\n")
    if args == ("cat", "/proc/cpuinfo") or (len(args) == 3 and args[:2] == ("cat", "--")):
        try:  # /proc/cpuinfo, and nix's machines files (probe_nix_builders)
            return Result(args, 0, Path(args[-1]).read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            return Result(args, 1, "", f"cat: {args[-1]}: {exc.strerror or exc}")
    if len(args) == 3 and args[1:] == ("-c", KVM_SNIPPET):
        return Result(args, 0, kvm_open_here())
    if args == MANAGER_ARGV:  # `command -v` prints the path of each one found
        found = [path for path in map(shutil.which, MANAGER_ARGV[2].split()[2:]) if path]
        return Result(args, 0 if found else 1, "".join(f"{path}\n" for path in found))
    if len(args) == 3 and args[:2] == ("df", "-Pk"):
        try:
            st = os.statvfs(args[2])
        except OSError as exc:
            return Result(args, 1, "", str(exc))
        kib = st.f_frsize // 1024 or 1
        return Result(args, 0, "Filesystem 1024-blocks Used Available Capacity Mounted on\n"
                               f"- {st.f_blocks * kib} {(st.f_blocks - st.f_bfree) * kib} {st.f_bavail * kib} - {args[2]}\n")
    return local_runner(argv)


def version_argv(tool: str) -> tuple[str, ...]:
    return TOOL_VERSION_ARGS.get(tool, (tool, "--version"))


def probe_tools(runner: Runner, tools: Iterable[str] = TOOL_VERSION_ARGS) -> dict[str, ToolInfo]:
    out = {}
    for tool in tools:
        res = runner(version_argv(tool))
        found = res.returncode != 127
        out[tool] = ToolInfo(tool, found, parse_version(tool, res.stdout + res.stderr) if found else None)
    return out


def cached_tools(tools: Iterable[str], cache_file: Path | None, save: bool = True) -> dict[str, ToolInfo]:
    """Local tools' versions from a cache keyed by the binary's path, size and mtime, so a version
    command runs only after a tool was installed or upgraded (cache_file None: always ask;
    save=False: read it, never write it — a dry run writes nothing)."""
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file else {}
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    out: dict[str, ToolInfo] = {}
    dirty = False
    for tool in tools:
        key = _stat_key(version_argv(tool)[0])
        if key is None:
            out[tool] = ToolInfo(tool, False)
            continue
        if key not in cache:
            res = local_runner(version_argv(tool))
            cache[key] = parse_version(tool, res.stdout + res.stderr) if res.ok else None
            dirty = True
        out[tool] = ToolInfo(tool, True, cache[key] if isinstance(cache[key], str) else None)
    if dirty and cache_file is not None and save:
        _save_cache(cache_file, cache)
    return out


def _stat_key(program: str) -> str | None:
    path = locate(program)
    if path is None:
        return None
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    return f"{program}:{real}:{st.st_size}:{st.st_mtime_ns}"


def _save_cache(path: Path, data: dict[str, object]) -> None:
    """Best effort: a cache that cannot be written only costs speed. Only into an output folder
    that exists: a build refused before it starts leaves no folder behind for a cache."""
    if path.parent.is_symlink():  # never write through a link imagepipe did not make
        return
    try:
        path.parent.mkdir(exist_ok=True)  # no parents: FileNotFoundError (skipped) without the output folder
        atomic_write(path, json.dumps(data, sort_keys=True, indent=1))
    except OSError:
        pass


NIX_CONFIG_ARGV = (("nix", "--extra-experimental-features", "nix-command", "config", "show"),
                   ("nix", "--extra-experimental-features", "nix-command", "show-config"))


def probe_nix_config(runner: Runner, version: str | None = None) -> dict[str, str] | None:
    """nix's effective settings: `nix config show`, else `nix show-config` (Nix before 2.20:
    asked first when `version`, the installed nix's, says so — one process instead of two)."""
    m = re.match(r"([0-9]{1,9})\.([0-9]{1,9})", version or "")
    order = NIX_CONFIG_ARGV[::-1] if m and (int(m[1]), int(m[2])) < (2, 20) else NIX_CONFIG_ARGV
    for argv in order:
        res = runner(argv)
        if res.returncode == 127:
            return None
        if res.ok and " = " in res.stdout:
            return parse_nix_config(res.stdout)
    return None


def probe_nix_builders(runner: Runner, settings: Mapping[str, str] | None) -> tuple[tuple[Machine, ...], str | None]:
    """nix's configured remote builders: the `builders` setting with its machines files read
    through `runner` (a missing file counts as empty, as for nix), or why they cannot be read."""

    def read(path: str) -> str | None:
        res = runner(("cat", "--", path))
        return res.stdout if res.ok else None

    try:
        return tuple(configured(settings, read)), None
    except MachinesError as exc:
        return (), str(exc)


def probe(
    runner: Runner = local_runner,
    *,
    disk_path: str | None = None,
    tools: Iterable[str] = TOOL_VERSION_ARGS,
    python: str = "python3",
    env: Mapping[str, str] | None = None,
    local: bool = True,
    version_cache: Path | None = None,
    save_cache: bool = True,
) -> HostFacts:
    """Probe a host through `runner` (firmware is looked up on the local filesystem only).

    Locally, `version_cache` (a JSON file) spares the tools' version commands; nix's settings
    are read when nix is among `tools` and found.
    """
    tools = list(tools)
    here = local and runner is local_runner
    if here:
        runner = in_process_runner
    os_name, machine = parse_uname(runner(("uname", "-sm")).stdout)
    cpu = runner(("cat", "/proc/cpuinfo")) if os_name == "linux" else Result((), 1, "")
    device, rw, detail = parse_kvm_open(runner((python, "-c", KVM_SNIPPET)).stdout) if os_name == "linux" else (False, False, "")
    hv = runner(("sysctl", "-n", "kern.hv_support")) if os_name == "darwin" else Result((), 1, "")
    cpu_flags = parse_cpu_flags(cpu.stdout, machine) if cpu.ok else None
    if os_name == "darwin" and Arch.from_machine(machine) is Arch.X86_64:
        feats = runner(("sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"))
        cpu_flags = parse_darwin_cpu_flags(feats.stdout) if feats.ok else None
    firmware = {}
    if local:
        descs = local_descriptors()
        for arch in Arch:
            fw = find_firmware(arch, env if env is not None else os.environ, descriptors=descs)
            if fw:
                firmware[arch] = fw
    free = parse_df(runner(("df", "-Pk", disk_path)).stdout) if disk_path else None
    tool_info = cached_tools(tools, version_cache, save_cache) if here else probe_tools(runner, tools)
    nix = tool_info.get("nix", ToolInfo("nix", False))
    nix_config = probe_nix_config(runner, nix.version) if nix.found else None
    builders, builders_error = probe_nix_builders(runner, nix_config)
    return HostFacts(
        os=os_name,
        machine=machine,
        kvm=KvmFacts(device, rw, parse_cpu_virt(cpu.stdout, machine) if cpu.ok else None, detail),
        hvf=parse_hvf(hv.stdout, hv.returncode),
        tools=tool_info,
        firmware=firmware,
        free_disk=free,
        nix_config=nix_config,
        nix_builders=builders,
        nix_builders_error=builders_error,
        package_manager=parse_package_manager(os_name, runner(MANAGER_ARGV).stdout),
        cpu_flags=cpu_flags,
    )


def existing_parent(path: Path) -> Path:
    """The nearest existing ancestor (df needs a path that exists)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p
