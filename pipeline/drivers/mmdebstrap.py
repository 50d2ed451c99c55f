"""The mmdebstrap driver: a Debian image with no build VM (implements drivers.Driver).

    assemble root   mmdebstrap --mode=root --variant=minbase installs the packages into
                    <stage>/root and runs the image's customize hook there; the .deb cache
                    (debcache) goes in before the download and what apt fetched comes back
    boot loaders    GRUB's tools *of the new root* (chroot: versions match what the image
                    holds) make the EFI binary and, on x86_64, the BIOS core image, both with a
                    built-in search for the root file system by its UUID; the modules and
                    grub.cfg go into the root's /boot/grub
    make disk       a GPT on a sparse file (sfdisk), the root as ext4 filled from the folder
                    (`mke2fs -d` at the partition's offset: no loop device, no mount), the ESP as
                    FAT (mkfs.vfat --offset, mtools)
    BIOS boot code  x86_64: grub-bios-setup of the new root writes boot.img into the MBR and
                    core.img into the BIOS boot partition, run on the disk file in a private
                    mount namespace whose /proc/self/mountinfo names that file as the root device
    qcow2           qemu-img convert

Everything that mounts (mmdebstrap's /proc, /sys and /dev in the root; the binfmt_misc file
system a foreign root needs; grub-bios-setup's bind mounts) happens inside a private mount
namespace (`unshare --mount`) that ends with the command, so no mount outlives it, even if
imagepipe is killed, and removing the staging folder never reaches into a mounted file system.
A foreign-arch root (arm64 on x86_64) runs its programs under qemu-user-static through
binfmt_misc: registered in that namespace's own binfmt_misc mount when the host has none, and
gone with it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.base.errors import BuildFailed, CommandFailed, ToolMissing
from pipeline.base.run import install_hint, run, stream
from pipeline.base.text import visible
from pipeline.base.units import mib
from pipeline.contents import packages
from pipeline.drivers import Prepared, Source, debcache
from pipeline.model import Arch, Image
from pipeline.progress import Event, Progress
from pipeline.render import debian as render

if TYPE_CHECKING:
    from pipeline.host import HostFacts
    from pipeline.plan import BuildPlan

MMDEBSTRAP_TIMEOUT = {True: 3600.0, False: 4 * 3600.0}  # native, foreign (every program under qemu-user)
GRUB_PLATFORM = {Arch.X86_64: "x86_64-efi", Arch.AARCH64: "arm64-efi"}
EFI_BINARY = {Arch.X86_64: "BOOTX64.EFI", Arch.AARCH64: "BOOTAA64.EFI"}
GRUB_MODULES = ("part_gpt", "ext2", "search", "search_fs_uuid")
BIOS_MODULES = ("biosdisk", *GRUB_MODULES)
WORK = "/run/imagepipe"  # inside the root, for the boot loader files (the root's /run is empty)

# Runs "$@" after making sure binfmt_misc can run `$1`'s programs (empty: native), in the
# private mount namespace unshare made: a binfmt_misc file system mounted here goes with it.
NS_SCRIPT = r"""set -eu
binfmt="$1"; shift
if [ -n "$binfmt" ] && [ ! -e "/proc/sys/fs/binfmt_misc/$binfmt" ]; then
  if [ -e /proc/sys/fs/binfmt_misc/register ]; then
    echo "binfmt_misc is mounted but has no $binfmt entry: register it (update-binfmts --enable $binfmt)" >&2
    exit 3
  fi
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  grep '^:' "/usr/lib/binfmt.d/$binfmt.conf" > /proc/sys/fs/binfmt_misc/register
fi
exec "$@"
"""

# grub-bios-setup of the root ($1) onto the disk file ($2): it insists on finding the device of
# its --directory, so the namespace's /proc/self/mountinfo ($3) says the root is that file.
BIOS_SCRIPT = r"""set -eu
root="$1" disk="$2" info="$3"
mkdir -p "$root/run/imagepipe"
: > "$root/run/imagepipe/disk"
mount -t proc proc "$root/proc"
mount --bind "$disk" "$root/run/imagepipe/disk"
mount --bind "$info" "$root/proc/$$/mountinfo"
exec chroot "$root" /usr/lib/grub/i386-pc/grub-bios-setup --directory=/boot/grub/i386-pc /run/imagepipe/disk
"""


def binfmt_name(image: Image, host: Arch | None) -> str:
    """The binfmt_misc entry a foreign root needs (`qemu-aarch64`), "" for a native one."""
    return "" if host is image.arch else f"qemu-{image.arch.value}"


def in_namespace(argv: list[str], binfmt: str = "") -> list[str]:
    """`argv` run in a private mount namespace (and with binfmt_misc ready for `binfmt`)."""
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NS_SCRIPT, "sh", binfmt, *argv]


def sources(image: Image, mirror: str, security: str) -> list[str]:
    """mmdebstrap's MIRROR arguments: one-line apt sources for every pocket."""
    suite = render.suite(image)
    lines = [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
    if security:
        lines.append(f"deb {security} {suite}-security main")
    return lines


def mmdebstrap_argv(image: Image, stage: Path, variables: Mapping[str, str]) -> list[str]:
    """The mmdebstrap command of one build (pure)."""
    return ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
            f"--architectures={render.DPKG_ARCH[image.arch]}", f"--include={','.join(render.packages(image))}",
            "--skip=download/empty", "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1/var/cache/apt/archives/"',
            f"--setup-hook=sync-in {stage / 'debs-in'} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {stage / 'debs-out'}",
            f"--customize-hook={variables['customize']}",
            render.suite(image), str(stage / "root"),
            *sources(image, variables["mirror"], variables.get("security_mirror", ""))]


def hook_env(variables: Mapping[str, str]) -> dict[str, str]:
    """The environment mmdebstrap and the customize hook get."""
    return {"SOURCE_DATE_EPOCH": variables["source_date_epoch"], "IMAGEPIPE_MIRROR": variables["mirror"],
            "IMAGEPIPE_SECURITY_MIRROR": variables.get("security_mirror", ""),
            "IMAGEPIPE_SSH_KEYS": variables.get("ssh_keys", "")}


def deb_file_name(name: str, version: str, arch: str) -> str:
    """The name apt gives a package's file in /var/cache/apt/archives."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


class MmdebstrapDriver:
    """mmdebstrap for the root, then the disk and its boot loaders made on the host."""

    name = "mmdebstrap"
    tools: tuple[str, ...] = ("mmdebstrap",)

    def __init__(self, profile: Source) -> None:
        self.profile = profile

    def check(self, plan: BuildPlan, facts: HostFacts) -> None:
        """mmdebstrap is installed (the profile has judged the host: Linux, root)."""
        if not facts.tool("mmdebstrap").found:
            raise ToolMissing(f"mmdebstrap not found on PATH (needed to build {plan.image.name})",
                              install_hint("mmdebstrap"))

    def steps(self, facts: HostFacts) -> list[str]:
        return ["prepare inputs", "assemble root (mmdebstrap)", "boot loaders (grub-mkimage)",
                "make disk (sfdisk, mke2fs -d, mkfs.vfat)", "BIOS boot code (grub-bios-setup)",
                "qcow2 (qemu-img convert)"]

    def template_text(self, image: Image, legacy: bool = False) -> str | None:
        """None: no template; the customize hook the profile renders is the image's recipe."""
        return None

    def command(self, plan: BuildPlan, stage: Path, known: Mapping[str, str] | None = None) -> list[str]:
        """The mmdebstrap command; values prepared at build time come from `known` or show as
        placeholders."""
        known = known or {}
        variables = {v: known.get(v, f"<prepared at build time: {v}>")
                     for v in self.profile.prepared_variables(plan.image)}
        return mmdebstrap_argv(plan.image, stage, variables)

    def describe_failure(self, exc: CommandFailed) -> str:
        """apt's and mmdebstrap's own error lines (`E: ...`), not the argv."""
        errors = [line.strip() for line in exc.tail.splitlines() if line.strip().startswith(("E:", "error"))]
        detail = "; ".join(dict.fromkeys(errors))
        return f"mmdebstrap exited {exc.returncode}" + (f": {detail}" if detail else "")

    def drive(self, plan: BuildPlan, facts: HostFacts, stage: Path, progress: Progress, *,
              on_error: str = "cleanup") -> Path:
        """The whole build into `stage`; returns the qcow2 inside it (the root and the raw disk are
        removed on the way)."""
        image = plan.image
        progress.step_event("prepare inputs")
        prepared = self.profile.prepare(plan, stage, progress.report())
        binfmt = binfmt_name(image, facts.arch)
        tree = stage / "root"
        assemble_root(plan, stage, prepared, binfmt, progress)
        record_packages(tree, stage, image, progress)
        progress.step_event("boot loaders (grub-mkimage)")
        esp = boot_loaders(image, tree, stage, binfmt)
        progress.step_event("make disk (sfdisk, mke2fs -d, mkfs.vfat)")
        disk = stage / "disk.raw"
        make_disk(image, tree, esp, disk, int(prepared.variables["source_date_epoch"]), progress)
        if image.arch is Arch.X86_64:
            progress.step_event("BIOS boot code (grub-bios-setup)")
            bios_boot_code(tree, disk, stage)
        else:
            progress.step_event("BIOS boot code: none (aarch64 boots with UEFI only)")
        shutil.rmtree(tree)
        progress.step_event("qcow2 (qemu-img convert)")
        final = stage / plan.artifact_name
        compress = ["-c"] if image.compress_qcow2 else []
        run(["qemu-img", "convert", "-f", "raw", "-O", image.format.value, *compress, disk, final], timeout=3600)
        for leftover in ("inputs", "debs-in", "debs-out", "esp", "mountinfo"):
            p = stage / leftover
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        disk.unlink()
        return final


def assemble_root(plan: BuildPlan, stage: Path, prepared: Prepared, binfmt: str, progress: Progress) -> None:
    """mmdebstrap into <stage>/root, with the .deb cache synced in and out."""
    image = plan.image
    cache = debcache.cache_dir()
    (stage / "debs-in").mkdir()
    (stage / "debs-out").mkdir()
    cached = debcache.fill(cache, stage / "debs-in")
    argv = mmdebstrap_argv(image, stage, prepared.variables)
    progress.step_event(f"assemble root (mmdebstrap {render.suite(image)} {render.DPKG_ARCH[image.arch]}, "
                        f"{cached} packages cached)")
    tail: list[str] = []

    def on_line(line: str) -> None:
        text = visible(line.rstrip())
        if not text.strip():
            return
        tail.append(text)
        del tail[:-40]
        progress.emit(Event("say" if text.startswith("I: ") else "message", text, source="mmdebstrap"))

    result = stream(in_namespace(argv, binfmt), on_line=on_line, env=hook_env(prepared.variables),
                    log_path=plan.raw_log, timeout=MMDEBSTRAP_TIMEOUT[not binfmt], check=False, cwd=stage)
    if not result.ok:
        raise mmdebstrap_failure(image, argv, result.returncode, "\n".join(tail), prepared.variables, plan.build_log)


MISSING_PACKAGE = re.compile(r"E: Unable to locate package (\S+)|E: Package '([^']+)' has no installation candidate")


def mmdebstrap_failure(image: Image, argv: list[str], code: int, tail: str, variables: Mapping[str, str],
                       log: Path) -> BuildFailed | CommandFailed:
    """What went wrong, in the user's terms: a package that does not exist, else mmdebstrap's
    own error lines."""
    missing = sorted({a or b for a, b in MISSING_PACKAGE.findall(tail)})
    if missing:
        suite = render.suite(image)
        return BuildFailed(f"no package {', '.join(missing)} in Debian {image.version} ({suite}) on "
                           f"{variables['mirror']}",
                           f"check the names under images.{image.name}.packages in invoke.yaml "
                           f"(https://packages.debian.org/{suite}/ lists them)")
    if "binfmt_misc is mounted but has no" in tail:
        line = next(x for x in tail.splitlines() if "binfmt_misc is mounted" in x)
        return BuildFailed(line, "or install qemu-user-static and binfmt-support")
    return CommandFailed(argv, code, tail, hint=f"build log: {log}")


def record_packages(tree: Path, stage: Path, image: Image, progress: Progress) -> list[str]:
    """Every installed package of the root (dpkg-query over its database) into the package
    list the profile hands on, and the file names apt knows them by (for the .deb cache)."""
    out = run(["dpkg-query", f"--admindir={tree / 'var' / 'lib' / 'dpkg'}", "-W",
               "-f=${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\n"]).stdout
    found = packages.parse_dpkg_query(out, distro=f"debian-{image.version}")
    packages.write_deb_list(stage, found)
    names = {deb_file_name(p.name, p.version, p.arch or "all") for p in found}
    cache = debcache.cache_dir()
    got = debcache.absorb(cache, stage / "debs-out", used=names)
    progress.info(f"{len(found)} packages installed: {got.used} from the .deb cache, {got.added} downloaded "
                  f"({mib(got.added_bytes)}, kept in {cache})")
    return sorted(names)


def kernel_version(tree: Path) -> str:
    """The version of the one kernel in the root's /boot."""
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildFailed(f"expected one kernel in the root's /boot, found {len(found)}: {', '.join(found) or 'none'}",
                          "the image's packages must hold exactly one linux-image package")
    return found[0]


def boot_loaders(image: Image, tree: Path, stage: Path, binfmt: str) -> Path:
    """GRUB's files in the root's /boot/grub and its EFI binary (and BIOS core image) built by
    the root's own grub-mkimage; returns the folder holding the ESP's contents."""
    grub = tree / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(render.grub_cfg(image, kernel_version(tree)), encoding="utf-8")
    work = tree / WORK.lstrip("/")
    work.mkdir(parents=True, exist_ok=True)
    (work / "early.cfg").write_text(render.grub_early_cfg(image), encoding="utf-8")
    platforms = [GRUB_PLATFORM[image.arch], *(["i386-pc"] if image.arch is Arch.X86_64 else [])]
    for platform in platforms:
        src = tree / "usr" / "lib" / "grub" / platform
        if not src.is_dir():
            raise BuildFailed(f"the root has no GRUB modules for {platform} ({src})",
                              "its packages must include GRUB's -bin package for that platform")
        shutil.copytree(src, grub / platform, dirs_exist_ok=True)
    efi = EFI_BINARY[image.arch]
    grub_mkimage(tree, binfmt, GRUB_PLATFORM[image.arch], f"{WORK}/{efi}", GRUB_MODULES)
    if image.arch is Arch.X86_64:
        grub_mkimage(tree, binfmt, "i386-pc", "/boot/grub/i386-pc/core.img", BIOS_MODULES)
    esp = stage / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (work / efi).rename(esp / "EFI" / "BOOT" / efi)
    shutil.rmtree(work)
    return esp


def grub_mkimage(tree: Path, binfmt: str, platform: str, output: str, modules: tuple[str, ...]) -> None:
    """The root's grub-mkimage (in the root: its own GRUB version) with the built-in search."""
    argv = ["chroot", str(tree), "grub-mkimage", "-O", platform, "-o", output, "-c", f"{WORK}/early.cfg",
            "-p", "/boot/grub", *modules]
    run(in_namespace(argv, binfmt), timeout=600)


def clamp_times(tree: Path, epoch: int) -> int:
    """Every file's times in the root made what two builds of the same inputs agree on, as
    reproducible builds do: modification times newer than `epoch` (what the customize hook and
    the boot loader step wrote) become `epoch`, and access times (reading during the build moves
    them) the modification time. Links themselves, never their targets. Returns how many
    modification times were clamped."""
    clamped = 0
    for folder, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            mtime = os.lstat(path).st_mtime_ns
            if mtime > epoch * 10**9:
                mtime = epoch * 10**9
                clamped += 1
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    os.utime(tree, ns=(epoch * 10**9, epoch * 10**9))
    return clamped


def set_times(tree: Path, disk: Path, offset: int, epoch: int) -> None:
    """The times mke2fs -d copied that two builds would not agree on, set by debugfs on every file
    of the new file system (found by its path in `tree`): the change time, which only the kernel
    sets (to when the build wrote the file), becomes `epoch`; the access time, which every read
    after clamp_times moves again (relatime: mke2fs reading a folder, its own config file), the
    file's modification time. A path debugfs cannot quote is left as it is (none in Debian's
    packages)."""
    lines = [f"sif / atime @{epoch}", f"sif / ctime @{epoch}"]
    for folder, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            rel = "/" + os.path.relpath(path, tree)
            if '"' not in rel and "\n" not in rel:
                mtime = int(os.lstat(path).st_mtime)
                lines += [f'sif "{rel}" atime @{mtime}', f'sif "{rel}" ctime @{epoch}']
    res = run(["debugfs", "-w", "-f", "-", f"{disk}?offset={offset}"], input="\n".join(lines) + "\n", timeout=600,
              env={"E2FSPROGS_FAKE_TIME": str(epoch)})  # the superblock's last write time too
    problems = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if problems:  # debugfs exits 0 whatever happened: anything but its banner is a failure
        raise BuildFailed(f"debugfs could not set the file times of the root file system: {problems[0]}")


def tree_bytes(tree: Path) -> tuple[int, int]:
    """(bytes the files take in 4 KiB blocks, number of inodes) of the root folder."""
    total = inodes = 0
    for folder, dirs, files in os.walk(tree):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            inodes += 1
            total += -(-st.st_size // 4096) * 4096
    return total, inodes + 1


def journal_bytes(fs_bytes: int) -> int:
    """mke2fs's default journal size for a file system of `fs_bytes` (e2fsprogs' table)."""
    blocks = fs_bytes // 4096
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size * 4096
    return 262144 * 4096


def needed_disk_mib(data: int, inodes: int) -> int:
    """The smallest disk_size (MiB, a multiple of 64) whose root file system holds `data` bytes
    in `inodes` files: the files, 5% spare, the journal and ext4's own tables."""
    mib_ = 1 << 20
    size = 64
    while True:
        fs = size * mib_ - render.ROOT_START - render.GPT_BACKUP
        # inode tables (one 256-byte inode per 16 KiB), bitmaps, group descriptors: ~2% of the file system
        overhead = fs // 16384 * 256 + fs // 50 + journal_bytes(fs)
        if fs > 0 and data * 105 // 100 + overhead <= fs and fs // 16384 >= inodes * 11 // 10:
            return size
        size += 64


def make_disk(image: Image, tree: Path, esp: Path, disk: Path, epoch: int, progress: Progress) -> None:
    """The partitioned disk file: GPT, the root's ext4 filled from `tree`, the ESP's FAT."""
    lay = render.layout(image)
    data, inodes = tree_bytes(tree)
    need = needed_disk_mib(data, inodes)
    if need > image.disk_size:
        raise BuildFailed(f"disk_size {image.disk_size} MiB is too small for {image.name}: its root holds "
                          f"{mib(data)} in {inodes} files and needs a disk of at least {need} MiB",
                          f"set disk_size: {need} (or more) under images.{image.name} in invoke.yaml")
    progress.info(f"root: {mib(data)} in {inodes} files; disk {image.disk_size} MiB (at least {need} MiB needed)")
    clamp_times(tree, epoch)
    with open(disk, "wb") as f:
        f.truncate(lay.disk_bytes)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", disk], input=lay.sfdisk_script())
    conf = tree / "etc" / "mke2fs.conf"  # the target's defaults: features its e2fsck and GRUB know
    env = {"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch),
           **({"MKE2FS_CONFIG": str(conf)} if conf.is_file() else {})}
    try:
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "root", "-U", lay.root_uuid,
             "-E", f"hash_seed={lay.root_hash_seed},offset={lay.root_offset}", "-d", tree, disk,
             str(lay.root_bytes // 4096)], env=env, timeout=3600)
    except CommandFailed as exc:
        if "Could not allocate" in exc.tail or "No space left" in exc.tail:
            raise BuildFailed(f"the root file system of {image.name} does not fit into disk_size {image.disk_size} MiB",
                              f"set disk_size: {need + 256} (or more) under images.{image.name}") from None
        raise
    set_times(tree, disk, lay.root_offset, epoch)
    esp_offset, esp_size = render.ESP
    # no volume label: mkfs.fat stamps its directory entry with the clock (the UUID names the ESP)
    run(["mkfs.vfat", "-F", "32", "-s", "1", "-S", "512", "-i", lay.esp_volume_id,
         "--offset", str(esp_offset // render.SECTOR), disk, str(esp_size // 1024)],
        env={"SOURCE_DATE_EPOCH": str(epoch)})
    target = f"{disk}@@{esp_offset}"
    mtools = {"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(epoch)}
    folders = sorted(p for p in esp.rglob("*") if p.is_dir())
    run(["mmd", "-i", target, *(f"::/{p.relative_to(esp)}" for p in folders)], env=mtools)
    for path in sorted(p for p in esp.rglob("*") if p.is_file()):
        run(["mcopy", "-i", target, path, f"::/{path.relative_to(esp)}"], env=mtools)


def bios_boot_code(tree: Path, disk: Path, stage: Path) -> None:
    """The root's grub-bios-setup on the disk file (see BIOS_SCRIPT)."""
    info = stage / "mountinfo"
    info.write_text("1 0 1:1 / / rw - ext2 /run/imagepipe/disk rw\n", encoding="utf-8")
    run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", BIOS_SCRIPT, "sh", tree, disk, info],
        timeout=600)
