"""Image files with the real qemu-img, e2fsprogs and sha256sum: conversion into every format and
its verification, the links of the published folder, and how check-reproducible explains two
disks that differ (partition, superblock, file)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline import reproducible
from pipeline.base.errors import VerifyFailed
from pipeline.output import artifacts
from tests.support import require_tool


@pytest.fixture(autouse=True)
def tools():
    require_tool("qemu-img", "qemu-utils")
    require_tool("qemu-io", "qemu-utils")
    require_tool("mke2fs", "e2fsprogs")
    require_tool("debugfs", "e2fsprogs")


def qcow2_with_data(path: Path) -> artifacts.Verified:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True, timeout=60)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(path)], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    return artifacts.verify(path, "qcow2")


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vhdx", "vdi", "qcow2"])
def test_convert_writes_a_verified_file_with_the_same_disk(tmp_path, fmt):
    src_dir = tmp_path / "stage"
    src_dir.mkdir()
    primary = qcow2_with_data(src_dir / "img.qcow2" if fmt != "qcow2" else src_dir / "img.raw.qcow2")
    out = artifacts.convert(primary, src_dir, fmt, compress=True)
    assert out.file == f"{Path(primary.file).stem}.{fmt}" and out.format == fmt
    assert out.sha256 == artifacts.sha256_file(src_dir / out.file) and out.virtual_size == 16 << 20
    assert out.compressed is (fmt == "qcow2") and not list(src_dir.glob("*.part"))
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(src_dir / primary.file),
                           str(src_dir / out.file)], capture_output=True, text=True, timeout=60, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    if fmt != "raw":
        with pytest.raises(VerifyFailed, match=f"expected a raw image, qemu-img says {fmt}"):
            artifacts.verify(src_dir / out.file, "raw")


def test_a_corrupt_vdi_fails_qemu_img_check(tmp_path):
    primary = qcow2_with_data(tmp_path / "img.qcow2")
    vdi = artifacts.convert(primary, tmp_path, "vdi")
    data = bytearray((tmp_path / vdi.file).read_bytes())
    blocks_offset = struct.unpack_from("<I", data, 0x154)[0]  # the VDI block map
    struct.pack_into("<I", data, blocks_offset, 0x7FFFFFF0)   # block 0 points far beyond the file
    (tmp_path / vdi.file).write_bytes(bytes(data))
    with pytest.raises(VerifyFailed, match="qemu-img check failed"):
        artifacts.verify(tmp_path / vdi.file, "vdi")


def build_folder(path: Path, files: dict[str, bytes]) -> dict[str, str]:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    sums = {name: artifacts.sha256_file(path / name) for name in files}
    artifacts.write_build_files(path, {"image": "img", "artifact": {"file": "img.qcow2"}}, sums)
    return sums


def test_every_file_of_the_published_build_is_linked_and_sha256sum_checks_in_both_folders(tmp_path):
    image_dir = tmp_path / "img"
    build_folder(image_dir / ".staging" / "b1", {"img.qcow2": b"q1", "vmlinuz": b"k", "sbom.cdx.json": b"{}"})
    artifacts.publish(image_dir / ".staging" / "b1", image_dir, "b1")
    (image_dir / "notes.txt").write_text("mine")                # a person's own file
    (image_dir / "mine").symlink_to("/elsewhere")               # a person's own link
    (image_dir / "img.vmdk").write_text("not ours")             # a file under a name the next build uses
    names = {p.name for p in image_dir.iterdir() if p.is_symlink() and os.readlink(p).startswith("current/")}
    assert names == {"img.qcow2", "vmlinuz", "sbom.cdx.json", "manifest.json", "SHA256SUMS"}
    for where in (image_dir, image_dir / "current"):
        res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=where, capture_output=True, text=True,
                             timeout=30, check=False)
        assert res.returncode == 0 and res.stdout.count(": OK") == 3, res.stdout + res.stderr

    # the next build has a vmdk and no kernel: its links appear, the kernel's goes, others stay
    build_folder(image_dir / ".staging" / "b2", {"img.qcow2": b"q2", "img.raw": b"r", "sbom.cdx.json": b"[]"})
    artifacts.publish(image_dir / ".staging" / "b2", image_dir, "b2")
    assert os.readlink(image_dir / "img.raw") == "current/img.raw" and not (image_dir / "vmlinuz").is_symlink()
    assert (image_dir / "notes.txt").read_text() == "mine" and os.readlink(image_dir / "mine") == "/elsewhere"
    assert (image_dir / "img.vmdk").read_text() == "not ours"
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=image_dir, capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 0 and "img.raw: OK" in res.stdout, res.stdout + res.stderr


def ext_disk(path: Path, files: dict[str, str], fs_uuid: str, partitioned: bool) -> Path:
    """A raw disk holding an ext4 file system (in an MBR partition at 1 MiB, or the whole disk)."""
    src = path.with_suffix(".src")
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
        os.utime(src / name, (1_700_000_000, 1_700_000_000))
    with open(path, "wb") as f:
        f.truncate(24 << 20)
    offset = 1 << 20 if partitioned else 0
    if partitioned:
        head = bytearray(512)
        struct.pack_into("<B3xB3xII", head, 446, 0, 0x83, 2048, (22 << 20) // 512)
        head[510:512] = b"\x55\xaa"
        with open(path, "r+b") as f:
            f.write(head)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", fs_uuid, "-E", f"offset={offset},root_owner=0:0",
                    "-d", str(src), str(path), "22M"], check=True, env=env, timeout=60)
    return path


def test_explain_names_the_partition_the_superblock_fields_and_the_file(tmp_path):
    a = ext_disk(tmp_path / "a.raw", {"etc-hostname": "demo\n", "same": "x"}, "11111111-2222-4333-8444-555555555555", True)
    b = ext_disk(tmp_path / "b.raw", {"etc-hostname": "other\n", "same": "x"}, "99999999-2222-4333-8444-555555555555", True)
    for raw in (a, b):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(raw.with_suffix(".qcow2"))],
                       check=True, timeout=60)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lines = reproducible.explain_image(a.with_suffix(".qcow2"), b.with_suffix(".qcow2"), "qcow2", scratch)
    text = "\n".join(lines)
    assert "Content mismatch at offset" in lines[0]
    assert "mbr partition table with 1 partition(s)" in text
    assert "partition 1 (type 0x83): differs" in text
    assert "Filesystem UUID" in text and "/etc-hostname: differs in content" in text and "/same" not in text
    assert "outside the partitions differ" not in text


def test_explain_a_whole_disk_file_system_and_a_container_only_difference(tmp_path):
    a = ext_disk(tmp_path / "a.raw", {"marker": "1"}, "11111111-2222-4333-8444-555555555555", False)
    b = tmp_path / "b.raw"
    b.write_bytes(a.read_bytes())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ext_disk(tmp_path / "c.raw", {"marker": "2"}, "11111111-2222-4333-8444-555555555555", False)
    lines = reproducible.explain_raw(a, tmp_path / "c.raw", scratch)
    assert lines[0].startswith("no partition table") and "the disk: differs" in lines
    assert "  /marker: differs in content" in lines
    for raw in (a, b):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(raw.with_suffix(".vmdk"))],
                       check=True, timeout=60)
    assert artifacts.sha256_file(a.with_suffix(".vmdk")) != artifacts.sha256_file(b.with_suffix(".vmdk"))
    (scratch / "v").mkdir()
    assert reproducible.explain_image(a.with_suffix(".vmdk"), b.with_suffix(".vmdk"), "vmdk", scratch / "v") == [
        "the disks are the same: only the vmdk container differs (its metadata: IDs, layout)"]


def test_compare_builds_reports_files_and_skips_the_sbom(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, kernel in ((a, b"k1"), (b, b"k2")):
        folder.mkdir()
        (folder / "vmlinuz").write_bytes(kernel)
        (folder / "sbom.cdx.json").write_text(json.dumps({"build": folder.name}))
        (folder / "initrd.img").write_bytes(b"same")
    (a / "extra").write_text("only here")
    m = [{"build_id": "a", "artifact": {"file": "x.qcow2", "format": "qcow2"}}, {"build_id": "b"}]
    report = reproducible.compare_builds("img", a, b, m)
    assert not report.identical and report.skipped == {"sbom.cdx.json": reproducible.SKIPPED["sbom.cdx.json"]}
    by_name = {f.name: f for f in report.files}
    assert by_name["initrd.img"].same and not by_name["vmlinuz"].same
    assert by_name["extra"].details == ["only in build a"] and by_name["extra"].sha_b == "-"
    text = report.render()
    assert "NOT reproducible" in text and "differs vmlinuz" in text and "same    initrd.img" in text
    assert json.loads(json.dumps(report.as_json()))["reproducible"] is False
