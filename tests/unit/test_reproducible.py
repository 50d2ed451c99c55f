"""The pure parts of check-reproducible: partition tables, the areas outside them, file trees."""

from __future__ import annotations

import os
import struct
import uuid

from pipeline import reproducible
from pipeline.reproducible import Partition


def mbr(*entries: tuple[int, int, int]) -> bytearray:
    """A disk head with an MBR of (type, first LBA, sectors) entries."""
    head = bytearray(1 << 20)
    for i, (kind, lba, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", head, 446 + 16 * i, 0, kind, lba, count)
    head[510:512] = b"\x55\xaa"
    return head


def gpt(*parts: tuple[int, int, str]) -> bytearray:
    """A protective MBR, a GPT header at LBA 1 and entries at LBA 2: (first LBA, last LBA, name)."""
    head = mbr((0xEE, 1, 0xFFFFFFFF))
    head[512:520] = b"EFI PART"
    struct.pack_into("<QII", head, 512 + 72, 2, 128, 128)
    for i, (first, last, name) in enumerate(parts):
        off = 1024 + 128 * i
        head[off:off + 16] = uuid.uuid4().bytes
        struct.pack_into("<QQ", head, off + 32, first, last)
        encoded = name.encode("utf-16-le")
        head[off + 56:off + 56 + len(encoded)] = encoded
    return head


def test_mbr_partitions():
    kind, parts = reproducible.partition_table(bytes(mbr((0x83, 2048, 4096), (0, 0, 0), (0x82, 8192, 100))))
    assert kind == "mbr"
    assert parts == [Partition(1, 2048 * 512, 4096 * 512, "type 0x83"), Partition(3, 8192 * 512, 100 * 512, "type 0x82")]


def test_gpt_partitions_with_names():
    kind, parts = reproducible.partition_table(bytes(gpt((2048, 4095, "ESP"), (4096, 10239, "root"))))
    assert kind == "gpt"
    assert parts == [Partition(1, 2048 * 512, 2048 * 512, "ESP"), Partition(2, 4096 * 512, 6144 * 512, "root")]


def test_no_table():
    assert reproducible.partition_table(bytes(1 << 20)) == ("none", [])
    assert reproducible.partition_table(b"") == ("none", [])


def test_areas_outside_the_partitions():
    parts = [Partition(2, 5000, 1000), Partition(1, 1000, 2000)]
    assert reproducible._gaps(parts, 8000) == [(0, 1000), (3000, 5000), (6000, 8000)]
    assert reproducible._gaps([Partition(0, 0, 8000)], 8000) == []


def test_compare_trees_names_each_kind_of_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "same").write_text("x")
        (root / "etc" / "content").write_text(root.name)
        (root / "mode").write_text("m")
        (root / "link").symlink_to(f"target-{root.name}")
    (a / "only-a").write_text("1")
    (b / "mode").chmod(0o600)
    for root in (a, b):  # the same mtime everywhere but where it is meant to differ
        for path in [*root.rglob("*"), root]:
            os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    os.utime(b / "etc" / "same", (1_700_000_000, 1_700_000_100))
    assert reproducible.compare_trees(a, b) == [
        "/only-a: only in build a",
        "/etc/content: differs in content",
        "/etc/same: differs in mtime",
        "/link: differs in content",
        "/mode: differs in mode",
    ]


def test_compare_trees_does_not_compare_a_links_own_time(tmp_path):
    """debugfs rdump makes each link at the time of the dump (it has no way to set a link's
    times): two dumps of the same file system a second apart must not differ there."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root, when in ((a, 1_700_000_000), (b, 1_700_000_100)):
        root.mkdir()
        (root / "link").symlink_to("target")
        os.utime(root / "link", (when, when), follow_symlinks=False)
    assert reproducible.compare_trees(a, b) == []
    (b / "link").unlink()
    (b / "link").symlink_to("elsewhere")
    assert reproducible.compare_trees(a, b) == ["/link: differs in content"]
