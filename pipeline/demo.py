"""The offline demo guest: a few-MB Linux assembled from Debian packages, no ISO download.

Kernel from `linux-image-*-cloud-amd64`, userland from `busybox-static`, sshd from `dropbear-bin`
(+ `sftp-server` so Packer can upload provisioner scripts), and e2fsprogs' `mke2fs` and `debugfs`,
with which the build's provisioner writes a reproducible file system (fixed UUID, hash seed and
timestamps; busybox's mke2fs can fix none of them). The initramfs is a deterministic newc cpio
(fixed owners and mtimes, sorted, gzip without a timestamp), so the same packages and keys give
the same bytes. Everything is cached under `<output>/.cache/`.

The guest also knows what it is made of: its Debian packages (name, version, architecture, read
from each .deb) and SOURCE_DATE_EPOCH for the build, the newest file time inside those packages
(Debian clamps them to each package's changelog date), so the timestamps written into the disk
follow the inputs and never the clock.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pipeline.base.errors import BuildFailed
from pipeline.base.run import run
from pipeline.contents.packages import Package, deb_package, from_manifest

# Packages whose files end up in the guest (their libraries are pulled in by ld.so --list).
USERLAND = ("busybox-static", "dropbear-bin", "openssh-sftp-server", "e2fsprogs")
E2FSPROGS = ("sbin/mke2fs", "sbin/debugfs")  # copied to the same paths: busybox --install keeps them
# Each file the guest takes, found by what it is: (package, file name, the folders it lives in
# across Debian suites). Each folder is looked for at both merged-/usr places: Debian 13 moved
# much from / to /usr (busybox-static: /bin/busybox in Debian 12, /usr/bin/busybox in 13).
BUSYBOX = ("busybox-static", "busybox", ("bin",))
DROPBEAR = ("dropbear-bin", "dropbear", ("sbin",))
SFTP_SERVER = ("openssh-sftp-server", "sftp-server", ("lib/openssh", "libexec/openssh", "libexec"))
LDSO = ("libc6", "ld-linux-x86-64.so.2", ("lib/x86_64-linux-gnu", "lib64"))
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")  # Debian 13's kernels compress modules with xz
KERNEL_META = "linux-image-cloud-amd64"
# virtio_console: the guest sees the agent's virtio-serial port (the guest contract's check);
# isofs: an instance's NoCloud seed; virtiofs (and fuse): an instance's shared folders
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio-rng", "virtio_console", "button", "evdev", "isofs",
           "virtiofs")
APPEND = "console=ttyS0,115200n8 quiet panic=-1"
RECIPE_VERSION = "5"  # bump when the guest layout below changes
RESOLVER = "2"  # the shape of the resolved package list (2: with the kernel's split-off packages)
GUEST_RECORD = "guest.json"  # beside the cached kernel + initramfs: packages, source date

INITTAB = """\
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""

RCS = """\
#!/bin/sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname "$(cat /etc/hostname)"
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -n -q -t 10 -T 1 -s /etc/udhcpc.script || {
  ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2; }
# ACPI power button (QMP system_powerdown) → clean poweroff; busybox acpid needs /var/log.
mkdir -p /var/log /var/run
acpid
# An imagepipe instance's NoCloud seed (a disk labelled cidata), read as cloud-init would on a
# full image: its hostname (meta-data), the SSH keys its user-data authorizes, and its shared
# folders (imagepipe/boot.sh, which mounts them). Never user-data scripts: the demo has no cloud-init.
seed=$(findfs LABEL=cidata 2>/dev/null)
if [ -n "$seed" ] && mkdir -p /run/seed && mount -t iso9660 -o ro "$seed" /run/seed; then
  name=$(sed -n 's/^local-hostname: *//p' /run/seed/meta-data)
  if [ -n "$name" ]; then hostname "$name"; echo "$name" > /etc/hostname; fi
  grep -oE '(ssh-[a-z0-9-]+|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+' /run/seed/user-data \
    >> /root/.ssh/authorized_keys
  sh /run/seed/imagepipe/boot.sh
  umount /run/seed
fi
# /etc/dropbear/flags: -s (no password logins) unless the image allows root's password over SSH
/usr/sbin/dropbear -R -E $(cat /etc/dropbear/flags) -p 22
echo "imagepipe demo guest: up"
"""

UDHCPC = """\
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    ;;
esac
exit 0
"""

SHUTDOWN = """\
#!/bin/sh
# `shutdown -P now` as Packer and people type it: power off through init, after we return.
(sleep 1; /bin/busybox poweroff) >/dev/null 2>&1 &
exit 0
"""


@dataclass(frozen=True)
class DemoGuest:
    kernel: Path
    initrd: Path
    append: str
    packages: tuple[Package, ...] = ()
    source_date_epoch: int = 0


# ------------------------------------------------------------------------- cpio (pure)


def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (path, mode, data) entries; owners root, mtime 0, sorted by path."""
    out = io.BytesIO()
    ino = 1
    for path, mode, data in sorted(entries):
        name = path.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.write(b"\0" * (-(110 + len(name)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    name = b"TRAILER!!!\0"
    out.write(b"070701" + b"".join(b"%08X" % f for f in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(name), 0)) + name)
    out.write(b"\0" * (-(110 + len(name)) % 4))
    return out.getvalue()


def gzip_n(data: bytes) -> bytes:
    """gzip with no name and mtime 0 (like `gzip -n`), so output is reproducible."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` list from a kernel module's .modinfo section."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_order(wanted: Iterable[str], deps: Mapping[str, list[str]]) -> list[str]:
    """Dependencies first (a depth-first topological order)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for d in deps.get(name, []):
            visit(d)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


def rootfs_entries(
    busybox: bytes,
    files: Mapping[str, tuple[int, bytes]],
    authorized_keys: Iterable[str],
    password_hash: str | None,
    modules: Mapping[str, bytes],
    module_list: list[str],
    root_password_ssh: bool = False,
) -> list[tuple[str, int, bytes]]:
    """Every file of the demo initramfs (pure: bytes in, entries out)."""
    d, f, x, lnk = 0o040755, 0o100644, 0o100755, 0o120777
    shadow_hash = password_hash or "*"
    entries = [(p, d, b"") for p in (
        "bin", "sbin", "etc", "etc/init.d", "etc/dropbear", "dev", "proc", "sys", "tmp", "mnt",
        "run", "usr", "usr/bin", "usr/sbin", "usr/lib", "lib", "lib/modules", "var",
    )]
    entries += [("root", 0o040700, b""), ("root/.ssh", 0o040700, b"")]
    entries += [
        ("bin/busybox", x, busybox),
        ("bin/sh", lnk, b"busybox"),
        ("sbin/init", lnk, b"../bin/busybox"),
        ("init", lnk, b"sbin/init"),
        ("sbin/shutdown", x, SHUTDOWN.encode()),
        ("etc/acpi/PWRF/00000080", x, b"#!/bin/sh\n/bin/busybox poweroff\n"),
        ("etc/inittab", f, INITTAB.encode()),
        ("etc/init.d/rcS", x, RCS.encode()),
        ("etc/udhcpc.script", x, UDHCPC.encode()),
        ("etc/hostname", f, b"demo\n"),
        ("etc/passwd", f, b"root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", f, b"root:x:0:\n"),
        ("etc/shadow", 0o100600, f"root:{shadow_hash}:19000:0:99999:7:::\n".encode()),
        ("etc/shells", f, b"/bin/sh\n"),
        ("etc/dropbear/flags", f, b"\n" if root_password_ssh else b"-s\n"),
        ("etc/mtab", lnk, b"/proc/mounts"),  # where e2fsprogs asks whether the disk is mounted
        ("etc/modules", f, "".join(f"{m}\n" for m in module_list).encode()),
        ("root/.ssh/authorized_keys", 0o100600, "".join(k.strip() + "\n" for k in authorized_keys).encode()),
    ]
    entries += [(f"lib/modules/{name}.ko", f, data) for name, data in modules.items()]
    entries += [(path, mode, data) for path, (mode, data) in files.items()]
    return _with_parents(entries)


def _with_parents(entries: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
    """Add a directory entry for every parent (the kernel's unpacker does not mkdir -p)."""
    have = {p for p, _, _ in entries}
    extra = set()
    for path, _, _ in entries:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in have:
                extra.add(parent)
    return entries + [(p, 0o040755, b"") for p in sorted(extra)]


# ------------------------------------------------------------------------- assembly


def cache_dir(output_dir: Path) -> Path:
    return output_dir / ".cache"


DOWNLOADING = ".download-"  # apt-get download's folder inside the .deb cache, one per download
STALE_DOWNLOAD = 3600.0      # seconds after which such a folder is a killed download's leftover


def download(packages: list[str], debs: Path) -> dict[str, Path]:
    """`apt-get download` what is not cached yet; returns package → .deb path.

    apt-get writes into a folder of its own inside the cache, and only the .deb files it
    finished (and checked against the package lists' hashes) are moved into the cache: a
    download that fails, on a full disk or a dropped link, leaves no partial .deb that a later
    build would take for a good one. A folder left by a killed download is removed later.
    """
    debs.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(debs)
    found = _cached_debs(debs, packages)
    missing = [p for p in packages if p not in found]
    if missing:
        landing = Path(tempfile.mkdtemp(prefix=DOWNLOADING, dir=debs))
        try:
            run(["apt-get", "download", *missing], cwd=landing, timeout=600,
                hint="the demo guest needs Debian's package lists: run `sudo apt-get update`")
            for deb in landing.glob("*.deb"):
                os.replace(deb, debs / deb.name)
        finally:
            shutil.rmtree(landing, ignore_errors=True)
        found = _cached_debs(debs, packages)
    out = {}
    for p in packages:
        if p not in found:
            raise BuildFailed(f"apt-get download did not produce a .deb for {p}")
        out[p] = found[p]
    return out


def _remove_stale_downloads(debs: Path) -> None:
    """Remove the download folders a killed build left (older than STALE_DOWNLOAD seconds: a
    download of a few dozen MB running now is younger)."""
    now = time.time()
    for entry in debs.glob(f"{DOWNLOADING}*"):
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink() and now - entry.stat().st_mtime > STALE_DOWNLOAD:
                shutil.rmtree(entry, ignore_errors=True)


def _cached_debs(debs: Path, packages: Iterable[str]) -> dict[str, Path]:
    """package → its newest-named `<package>_*.deb` in `debs` (the folder is listed once)."""
    names = sorted(n for n in os.listdir(debs) if n.endswith(".deb"))
    out = {}
    for package in packages:
        hits = [n for n in names if n.startswith(f"{package}_")]
        if hits:
            out[package] = debs / hits[-1]
    return out


def resolve_kernel_package() -> str:
    """linux-image-cloud-amd64 → the versioned package it depends on."""
    out = run(["apt-cache", "depends", KERNEL_META], hint="run `sudo apt-get update` first").stdout
    m = re.search(r"Depends: (linux-image-[\w.+-]+)", out)
    if not m:
        raise BuildFailed(f"cannot resolve {KERNEL_META} to a kernel package (apt-cache depends)")
    return m.group(1)


def apt_signature() -> str | None:
    """Changes whenever `apt-get update` changed the package lists (None: cannot tell)."""
    lists = Path("/var/lib/apt/lists")
    if not lists.is_dir():
        return None
    stats = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in lists.glob("*_Packages*"))
    return hashlib.sha256(repr(stats).encode()).hexdigest() if stats else None


def resolve_kernel_packages() -> list[str]:
    """The kernel's packages: the versioned image package and the packages of the same kernel
    it depends on. Debian's newest suite splits the kernel: linux-image-V is empty and depends on
    linux-binary-V (vmlinuz) and linux-modules-V (the modules); Debian 12 and 13 have one package."""
    image = resolve_kernel_package()
    abi = re.escape(image.removeprefix("linux-image-"))
    out = run(["apt-cache", "depends", image], hint="run `sudo apt-get update` first").stdout
    same = re.findall(rf"^\s+\|?(?:Pre)?Depends: (linux-[a-z-]+-{abi})$", out, re.MULTILINE)
    return [image, *sorted(set(same) - {image})]


def resolve_packages(cache: Path) -> list[str]:
    """[kernel packages, *userland, *libraries]; apt-cache is slow, so the answer is cached
    until the package lists change."""
    sig = apt_signature()
    memo = cache / "resolved-packages.json"
    if sig and memo.exists():
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved.get("apt") == sig and saved.get("recipe") == RECIPE_VERSION and saved.get("resolver") == RESOLVER:
            return list(saved["packages"])
    packages = [*resolve_kernel_packages(), *USERLAND, *library_packages(USERLAND)]
    if sig:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"apt": sig, "recipe": RECIPE_VERSION, "resolver": RESOLVER, "packages": packages}),
                        encoding="utf-8")
    return packages


def library_packages(packages: Iterable[str]) -> list[str]:
    """The closure of shared-library packages (lib*, zlib*) the userland depends on."""
    seen: set[str] = set()
    todo = list(packages)
    while todo:
        out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", *todo]).stdout
        found = set(re.findall(r"^\s+(?:\|)?(?:Pre)?Depends: ((?:lib|zlib)[\w.+-]+)$", out, re.MULTILINE))
        todo = sorted(found - seen)
        seen |= found
    return sorted(seen - set(packages))


def extract(deb: Path, into: Path) -> Path:
    if not into.exists():
        tmp = into.with_name(into.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(["dpkg-deb", "-x", deb, tmp])
        tmp.rename(into)
    return into


def _needed_libs(root: Path, ldso: Path, binaries: Iterable[Path]) -> dict[str, Path]:
    """Shared libraries of `binaries`, resolved with the packaged ld.so (`ldso`, in the merged
    tree `root`), not the host's."""
    libdirs = ":".join(str(p) for p in (root / "lib/x86_64-linux-gnu", root / "usr/lib/x86_64-linux-gnu") if p.exists())
    libs: dict[str, Path] = {str(ldso.relative_to(root)): ldso}
    for b in binaries:
        out = run([ldso, "--library-path", libdirs, "--list", b]).stdout
        missing = re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE)
        if missing:
            raise BuildFailed(f"demo guest: {b.name} needs {', '.join(missing)}, not in the downloaded packages")
        for m in re.finditer(r"=> (\S+) \(", out):
            path = Path(m.group(1))
            if path.is_relative_to(root):
                libs[str(path.relative_to(root))] = path
    return libs


def assemble(
    output_dir: Path, authorized_keys: list[str], password_hash: str | None = None, root_password_ssh: bool = False
) -> DemoGuest:
    """Build (or reuse from cache) the demo kernel + initramfs with these keys baked in
    (`root_password_ssh`: dropbear lets root in with its password)."""
    cache = cache_dir(output_dir)
    packages = resolve_packages(cache)
    kernel_pkgs = [p for p in packages if p.startswith("linux-")]
    debs = download(packages, cache / "debs")
    key = hashlib.sha256(
        "\n".join([RECIPE_VERSION, *sorted(p.name for p in debs.values()), *authorized_keys, password_hash or "",
                   str(root_password_ssh)]).encode()
    ).hexdigest()[:16]
    out = cache / "demo" / key
    if (out / "initrd.img").exists() and (out / "vmlinuz").exists() and (out / GUEST_RECORD).exists():
        return _guest(out)
    root = cache / "root"
    trees = {p: extract(deb, root / deb.stem) for p, deb in debs.items()}
    found = Finder(trees, {p: deb.stem for p, deb in debs.items()}, host_suite())
    merged = _merge(trees.values(), cache / "merged" / key)
    modules = _modules(found, kernel_pkgs)
    files = _userland_files(found, merged)
    entries = rootfs_entries(
        found.file(*BUSYBOX).read_bytes(), files, authorized_keys, password_hash,
        modules, module_order(sorted(modules), {n: module_depends(b) for n, b in modules.items()}), root_password_ssh,
    )
    kernel = found.kernel(kernel_pkgs)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "initrd.img").write_bytes(gzip_n(cpio_newc(entries)))
    shutil.copyfile(kernel, tmp / "vmlinuz")
    record = {"packages": [p.as_manifest() for p in sorted(deb_packages(debs.values()))],
              "source_date_epoch": source_date_epoch(trees.values())}
    (tmp / GUEST_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(merged, ignore_errors=True)
    return _guest(out)


def _guest(folder: Path) -> DemoGuest:
    """The assembled guest in `folder` (kernel, initramfs and its record)."""
    record = json.loads((folder / GUEST_RECORD).read_text(encoding="utf-8"))
    return DemoGuest(folder / "vmlinuz", folder / "initrd.img", APPEND, tuple(from_manifest(record["packages"])),
                     int(record["source_date_epoch"]))


def deb_packages(debs: Iterable[Path]) -> list[Package]:
    """Name, version and architecture of each .deb, from its control file (`dpkg-deb -f`)."""
    out = []
    for deb in debs:
        text = run(["dpkg-deb", "-f", deb, "Package", "Version", "Architecture"]).stdout
        out.append(deb_package(parse_control(text)))
    return out


def parse_control(text: str) -> dict[str, str]:
    """`Field: value` lines (as `dpkg-deb -f` prints them) → {field: value}."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            fields[name.strip()] = value.strip()
    return fields


def source_date_epoch(trees: Iterable[Path]) -> int:
    """The newest modification time of any file in the extracted packages (whole seconds)."""
    newest = 0
    for tree in trees:
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                newest = max(newest, int(path.stat().st_mtime))
    return newest


def _modules(found: Finder, kernel_pkgs: list[str]) -> dict[str, bytes]:
    """The wanted modules and their dependencies, read from the kernel package (plain .ko bytes:
    compressed modules are unpacked; a module the kernel has built in is not there and not needed)."""
    available = found.modules(kernel_pkgs)
    norm = {n.replace("-", "_"): p for n, p in available.items()}
    picked: dict[str, bytes] = {}
    todo = [m.replace("-", "_") for m in MODULES]
    while todo:
        name = todo.pop()
        if name in picked or name not in norm:
            continue
        picked[name] = found.module_bytes(*norm[name])
        todo.extend(d.replace("-", "_") for d in module_depends(picked[name]))
    return picked


def _merge(trees: Iterable[Path], into: Path) -> Path:
    """One root holding every extracted package (for ld.so lookups)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for t in trees:
        shutil.copytree(t, into, symlinks=True, dirs_exist_ok=True)
    return into


def _userland_files(found: Finder, merged: Path) -> dict[str, tuple[int, bytes]]:
    """dropbear, sftp-server, mke2fs and debugfs at the guest's paths, with their libraries."""
    in_merged = {spec: merged / found.file(*spec).relative_to(found.trees[spec[0]])
                 for spec in (DROPBEAR, SFTP_SERVER, LDSO, *E2FS)}
    dropbear, sftp = in_merged[DROPBEAR], in_merged[SFTP_SERVER]
    e2fs = [in_merged[spec] for spec in E2FS]
    files: dict[str, tuple[int, bytes]] = {
        "usr/sbin/dropbear": (0o100755, dropbear.read_bytes()),
        "usr/lib/sftp-server": (0o100755, sftp.read_bytes()),
        **{rel: (0o100755, path.read_bytes()) for rel, path in zip(E2FSPROGS, e2fs, strict=True)},
    }
    for rel, path in _needed_libs(merged, in_merged[LDSO], [dropbear, sftp, *e2fs]).items():
        files[rel] = (0o100755, path.resolve().read_bytes())
        if rel.endswith("ld-linux-x86-64.so.2"):  # the interpreter path baked into binaries
            files["lib64/ld-linux-x86-64.so.2"] = (0o120777, f"/{rel}".encode())
    return files


E2FS = tuple(("e2fsprogs", rel.rsplit("/", 1)[1], ("sbin",)) for rel in E2FSPROGS)


def host_suite() -> str:
    """The Debian (or Ubuntu) release the host's apt takes the guest's packages from, as
    /etc/os-release names it ("Debian GNU/Linux 13 (trixie)")."""
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return "this host's suite"
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?$', text, re.MULTILINE)
    return m.group(1) if m else "this host's suite"


def merged_usr_candidates(folder: str) -> tuple[str, str]:
    """A folder at both merged-/usr places: "bin" → ("bin", "usr/bin"), "usr/lib" → ("lib", "usr/lib")."""
    bare = folder.removeprefix("usr/")
    return (bare, f"usr/{bare}")


@dataclass(frozen=True)
class Finder:
    """Files inside the extracted packages, found by what they are; a missing one is a clear
    error that names the package, the file and the suite."""

    trees: Mapping[str, Path]    # package → its extracted tree (dpkg-deb -x: the .deb's file list)
    debs: Mapping[str, str]      # package → its .deb's name (name_version_arch)
    suite: str

    def file(self, package: str, name: str, folders: tuple[str, ...]) -> Path:
        """The regular file `name` in one of `folders` (at either merged-/usr place)."""
        tree = self.tree(package)
        looked = [place for folder in folders for place in merged_usr_candidates(folder)]
        for place in looked:
            path = tree / place / name
            if path.is_file() and not path.is_symlink():  # a link would resolve on this host
                return path
        raise self.missing(package, name, ", ".join(f"/{p}/" for p in looked))

    def kernel(self, packages: list[str]) -> Path:
        """The kernel image of the kernel's packages: /boot/vmlinuz-V (Debian 12, 13) or
        /usr/lib/modules/V/vmlinuz (the newest suite's linux-binary-V)."""
        for package in packages:
            tree = self.tree(package)
            hits = sorted(tree.glob("boot/vmlinuz-*")) + [
                p for place in merged_usr_candidates("lib/modules") for p in sorted(tree.glob(f"{place}/*/vmlinuz"))]
            if hits:
                return hits[0]
        raise self.missing(" + ".join(packages), "vmlinuz", "/boot/, /lib/modules/*/, /usr/lib/modules/*/")

    def modules(self, packages: list[str]) -> dict[str, tuple[str, Path]]:
        """Module name → (package, file), from /lib/modules/*/kernel or /usr/lib/modules/*/kernel."""
        out: dict[str, tuple[str, Path]] = {}
        for package in packages:
            tree = self.tree(package)
            for place in merged_usr_candidates("lib/modules"):
                for path in sorted(tree.glob(f"{place}/*/kernel/**/*.ko*")):
                    suffix = next((s for s in MODULE_SUFFIXES if path.name.endswith(s)), None)
                    if suffix and path.is_file():
                        out.setdefault(path.name.removesuffix(suffix), (package, path))
        if not out:
            raise self.missing(" + ".join(packages), "kernel modules (*.ko, *.ko.xz, ...)",
                               "/lib/modules/*/kernel/, /usr/lib/modules/*/kernel/")
        return out

    def module_bytes(self, package: str, path: Path) -> bytes:
        """A module file's bytes, unpacked when Debian ships it compressed (busybox insmod loads
        plain .ko files)."""
        data = path.read_bytes()
        try:
            if path.name.endswith(".xz"):
                return lzma.decompress(data)
            if path.name.endswith(".gz"):
                return gzip.decompress(data)
            if path.name.endswith(".zst"):
                return _unzstd(path)
        except (OSError, EOFError, ValueError) as exc:
            raise BuildFailed(f"demo guest: {path.name} in package {self.deb(package)} ({self.suite}) "
                              f"cannot be unpacked: {exc}") from exc
        return data

    def tree(self, package: str) -> Path:
        """The extracted tree of `package` (every package the guest takes files from is downloaded)."""
        if package not in self.trees:
            raise BuildFailed(f"demo guest: package {package} was not downloaded ({self.suite})")
        return self.trees[package]

    def deb(self, package: str) -> str:
        """The package's .deb name (name_version_arch), as people read it (packages joined by +)."""
        return " + ".join(unquote(self.debs.get(p, p)) for p in package.split(" + "))

    def missing(self, package: str, name: str, where: str) -> BuildFailed:
        """The error for a file that is not where any known suite puts it."""
        return BuildFailed(
            f"demo guest: package {self.deb(package)} from {self.suite} has no {name} in {where}",
            "the demo guest is assembled from the host's Debian suite and this package's files moved: "
            f"please report it with the output of `dpkg-deb -c {self.deb(package)}.deb`",
        )


def _unzstd(path: Path) -> bytes:
    """A zstd-compressed module's bytes: Python's own zstd (3.14+), else the zstd tool."""
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 (optional: the code goes on without it)

        return bytes(zstd.decompress(path.read_bytes()))
    except ImportError:
        plain = path.with_name(path.name.removesuffix(".zst"))
        if not plain.is_file():
            run(["zstd", "-d", "-q", "-f", path, "-o", plain], hint="install zstd (Debian: sudo apt-get install zstd)")
        return plain.read_bytes()
