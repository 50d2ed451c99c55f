"""`invoke check-reproducible IMAGE`: build the image twice into staging and compare the results.

Nothing is published and no build history is written: both builds run the normal steps up to
the SBOM (pipeline.build.produce) under the image's lock, their logs go to
output/<image>/logs/reproducible/{a,b}/ (replaced on every check), their staging folders are
removed at the end. Every file of the two builds is compared by sha256, except the SBOM, which
names its build on purpose.

Where image files differ, the report says where, as far as it can tell:
  1. `qemu-img compare`: the same guest-visible disk in different container bytes (vmdk, vhdx
     and vdi carry random IDs), or the first offset where the disks differ;
  2. partitions: the MBR or GPT of the disk, which partitions (or the area outside them) differ;
  3. files, for ext2/3/4 (a partition or the whole disk): the superblock fields that differ
     (`dumpe2fs -h`) and the files whose content, mode or mtime differ (`debugfs rdump`).
Other file systems (AlmaLinux's XFS) are compared at the partition level only.

A difference is a finding, not a failure: the command exits 0 unless a build fails or --strict
is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import build, inputs
from pipeline.base.run import interrupt_guard, run
from pipeline.contents import sbom
from pipeline.model import Config, Image
from pipeline.output import artifacts, history, retention
from pipeline.plan import new_build_id
from pipeline.progress import Progress

SECTOR = 512
EXT_MAGIC = 0xEF53
SKIPPED = {sbom.FILE_NAME: "names its build (id, time) on purpose"}
MAX_LINES = 40  # details per file, so a wildly different disk stays readable


@dataclass(frozen=True)
class Partition:
    number: int
    start: int          # bytes
    size: int           # bytes
    label: str = ""


@dataclass
class FileResult:
    name: str
    same: bool
    sha_a: str
    sha_b: str
    details: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"file": self.name, "same": self.same, "sha256_a": self.sha_a, "sha256_b": self.sha_b,
                "details": self.details}


@dataclass
class Report:
    image: str
    builds: tuple[str, str]
    files: list[FileResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return all(f.same for f in self.files)

    def as_json(self) -> dict[str, Any]:
        return {"image": self.image, "builds": list(self.builds), "reproducible": self.identical,
                "files": [f.as_json() for f in self.files], "skipped": self.skipped}

    def render(self) -> str:
        verdict = "reproducible: every file is bit-for-bit the same" if self.identical else "NOT reproducible"
        lines = [f"{self.image}: builds {self.builds[0]} and {self.builds[1]}: {verdict}"]
        for f in self.files:
            lines.append(f"  {'same   ' if f.same else 'differs'} {f.name}  {f.sha_a[:16]}"
                         + ("" if f.same else f" ≠ {f.sha_b[:16]}"))
            lines += [f"      {d}" for d in f.details]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the two builds


def check(cfg: Config, image: Image, opts: Any, say: Callable[[str], None]) -> Report:
    """Build `image` twice into staging (opts: pipeline.build.BuildOptions) and compare."""
    facts, driver, first = build.decide(cfg, image, opts, None)
    logs = first.image_dir / "logs" / "reproducible"
    with interrupt_guard(), history.image_lock(first.image_dir, build_id=first.build_id, wait=opts.wait, say=say):
        retention.clean_stale(first.image_dir, say)
        ihash = inputs.compute(cfg, image)
        shutil.rmtree(logs, ignore_errors=True)
        plans = [dataclasses.replace(first, log_dir=logs / "a")]
        second = new_build_id()
        plans.append(dataclasses.replace(first, build_id=second, staging=first.staging.parent / second,
                                         log_dir=logs / "b"))
        manifests: list[dict[str, Any]] = []
        try:
            for label, plan in zip("ab", plans, strict=True):
                say(f"{image.name}: build {label} of 2 ({plan.build_id}), logs in {plan.log_dir}")
                plan.log_dir.mkdir(parents=True)
                plan.staging.mkdir(parents=True)
                with Progress(f"{image.name} [{label}]", json_lines=opts.json) as progress:
                    done = build.produce(cfg, plan, driver, facts, ihash, opts, progress, plan.staging)
                manifests.append(done.manifest)
            say(f"{image.name}: comparing the two builds")
            return compare_builds(image.name, plans[0].staging, plans[1].staging, manifests)
        finally:
            for plan in plans:
                artifacts.discard(plan.staging)


def compare_builds(image: str, a: Path, b: Path, manifests: list[dict[str, Any]]) -> Report:
    """Compare every file of two build folders (image files in depth)."""
    report = Report(image, (str(manifests[0]["build_id"]), str(manifests[1]["build_id"])))
    formats = {art["file"]: art["format"] for art in artifacts.image_files(manifests[0])}
    names = sorted({p.name for p in a.iterdir() if p.is_file()} | {p.name for p in b.iterdir() if p.is_file()})
    for name in names:
        if name in SKIPPED:
            report.skipped[name] = SKIPPED[name]
            continue
        fa, fb = a / name, b / name
        if not fa.is_file() or not fb.is_file():
            report.files.append(FileResult(name, False, _sha(fa), _sha(fb), [f"only in build {'a' if fa.is_file() else 'b'}"]))
            continue
        result = FileResult(name, False, artifacts.sha256_file(fa), artifacts.sha256_file(fb))
        result.same = result.sha_a == result.sha_b
        if not result.same and name in formats:
            scratch = Path(tempfile.mkdtemp(prefix="compare-", dir=a.parent))
            try:
                result.details = explain_image(fa, fb, formats[name], scratch)[:MAX_LINES]
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        report.files.append(result)
    return report


def _sha(path: Path) -> str:
    return artifacts.sha256_file(path) if path.is_file() else "-"


# ----------------------------------------------------------------------------- image files


def explain_image(a: Path, b: Path, fmt: str, scratch: Path) -> list[str]:
    """Where two image files differ: container only, or which partitions and files."""
    res = run(["qemu-img", "compare", "-f", fmt, "-F", fmt, a, b], check=False, timeout=3600)
    if res.returncode == 0:
        return [f"the disks are the same: only the {fmt} container differs (its metadata: IDs, layout)"]
    if res.returncode != 1:
        return [f"qemu-img compare failed: {(res.stdout + res.stderr).strip()[-200:]}"]
    lines = [res.stdout.strip() or "the disks differ"]
    raw_a, raw_b = scratch / "a.raw", scratch / "b.raw"
    for src, dst in ((a, raw_a), (b, raw_b)):
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", src, dst], timeout=4 * 3600)
    return lines + explain_raw(raw_a, raw_b, scratch)


def explain_raw(a: Path, b: Path, scratch: Path) -> list[str]:
    """Partition by partition (or the whole disk when it has no table), then ext file systems."""
    with open(a, "rb") as f:
        head = f.read(1 << 20)
    kind, parts = partition_table(head)
    size = min(a.stat().st_size, b.stat().st_size)
    if a.stat().st_size != b.stat().st_size:
        return [f"disk sizes differ: {a.stat().st_size} vs {b.stat().st_size} bytes"]
    if not parts:
        parts = [Partition(0, 0, size, "whole disk")]
        lines = ["no partition table: the disk is compared as one file system"]
    else:
        lines = [f"{kind} partition table with {len(parts)} partition(s)"]
    covered = 0
    for region_start, region_end in _gaps(parts, size):
        covered += region_end - region_start
        if _differs(a, b, region_start, region_end - region_start):
            lines.append(f"bytes {region_start}..{region_end} outside the partitions differ "
                         "(partition table, boot loader, disk GUIDs)")
    for part in parts:
        name = f"partition {part.number}" if part.number else "the disk"
        label = f" ({part.label})" if part.label and part.number else ""
        if not _differs(a, b, part.start, part.size):
            lines.append(f"{name}{label}: same")
            continue
        lines.append(f"{name}{label}: differs")
        if is_ext(a, part.start):
            lines += [f"  {line}" for line in explain_ext(a, b, part.start, scratch / f"p{part.number}")]
        else:
            lines.append("  not an ext2/3/4 file system: compared at the partition level only")
    return lines


def _gaps(parts: list[Partition], size: int) -> list[tuple[int, int]]:
    """The byte ranges of the disk outside every partition."""
    gaps, pos = [], 0
    for p in sorted(parts, key=lambda p: p.start):
        if p.start > pos:
            gaps.append((pos, p.start))
        pos = max(pos, p.start + p.size)
    if pos < size:
        gaps.append((pos, size))
    return gaps


def _differs(a: Path, b: Path, start: int, length: int, chunk: int = 4 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(start)
        fb.seek(start)
        left = length
        while left > 0:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return True
            left -= n
    return False


def partition_table(head: bytes) -> tuple[str, list[Partition]]:
    """The partitions of a disk from its first bytes (pure): ("gpt"|"mbr"|"none", partitions).
    GPT entries must lie in `head` (the first MiB holds them on every disk imagepipe builds)."""
    if len(head) < 2 * SECTOR or head[510:512] != b"\x55\xaa":
        return "none", []
    entries = [struct.unpack_from("<B3xB3xII", head, 446 + 16 * i) for i in range(4)]
    if any(kind == 0xEE for _, kind, _, _ in entries) and head[SECTOR:SECTOR + 8] == b"EFI PART":
        return "gpt", _gpt(head)
    parts = [Partition(i + 1, lba * SECTOR, count * SECTOR, f"type 0x{kind:02x}")
             for i, (_, kind, lba, count) in enumerate(entries) if kind and count]
    return "mbr", parts


def _gpt(head: bytes) -> list[Partition]:
    entry_lba, count, entry_size = struct.unpack_from("<QII", head, SECTOR + 72)
    parts = []
    for i in range(count):
        off = entry_lba * SECTOR + i * entry_size
        if off + 128 > len(head):
            break
        type_guid = head[off:off + 16]
        if type_guid == b"\0" * 16:
            continue
        first, last = struct.unpack_from("<QQ", head, off + 32)
        name = head[off + 56:off + 128].decode("utf-16-le", errors="replace").rstrip("\0")
        parts.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, name))
    return parts


# ----------------------------------------------------------------------------- ext file systems


def is_ext(raw: Path, offset: int) -> bool:
    with open(raw, "rb") as f:
        f.seek(offset + 1024 + 56)
        magic = f.read(2)
    return len(magic) == 2 and struct.unpack("<H", magic)[0] == EXT_MAGIC


def explain_ext(a: Path, b: Path, offset: int, scratch: Path) -> list[str]:
    """The superblock fields and the files that differ between two ext file systems."""
    lines = []
    sa, sb = superblock(a, offset), superblock(b, offset)
    changed = [k for k in sorted(sa.keys() | sb.keys()) if sa.get(k) != sb.get(k)]
    if changed:
        lines.append("superblock fields differ: " + ", ".join(changed))
    tree_a, tree_b = scratch / "a", scratch / "b"
    for raw, tree in ((a, tree_a), (b, tree_b)):
        tree.mkdir(parents=True)
        # debugfs splits its command on blanks: the quotes keep a folder name with spaces whole
        run(["debugfs", "-R", f'rdump / "{tree}"', f"{raw}?offset={offset}"], timeout=3600)
    files = compare_trees(tree_a, tree_b)
    same = ("every file has the same content, mode and mtime: the difference is in file system metadata"
            " (ctimes, allocation, journal)")
    lines += files or [same]
    return lines


def superblock(raw: Path, offset: int) -> dict[str, str]:
    """`dumpe2fs -h` as {field: value}."""
    res = run(["dumpe2fs", "-h", f"{raw}?offset={offset}"], check=False, timeout=120)
    fields = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields[key.strip()] = value.strip()
    return fields


def compare_trees(a: Path, b: Path) -> list[str]:
    """Files only on one side, or whose type, content, mode or mtime differ (a link's: its type and
    target; pure over two folders)."""
    ia, ib = _inventory(a), _inventory(b)
    out = [f"/{p}: only in build a" for p in sorted(ia.keys() - ib.keys())]
    out += [f"/{p}: only in build b" for p in sorted(ib.keys() - ia.keys())]
    for p in sorted(ia.keys() & ib.keys()):
        (ka, ma, ta, ca), (kb, mb, tb, cb) = ia[p], ib[p]
        what = [w for w, x, y in (("type", ka, kb), ("content", ca, cb), ("mode", oct(ma), oct(mb)),
                                   ("mtime", ta, tb)) if x != y]
        if what:
            out.append(f"/{p}: differs in {', '.join(what)}")
    return out


def _inventory(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """relative path → (type, mode, mtime, content hash or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            # debugfs rdump gives a link the time it made it, never the one stored: its target only
            out[rel] = ("symlink", st.st_mode & 0o7777, 0, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, int(st.st_mtime), "")
        else:
            out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), hashlib.sha256(path.read_bytes()).hexdigest())
    return out
