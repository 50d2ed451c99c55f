import gzip

from pipeline.demo import cpio_newc, gzip_n, module_depends, module_order, rootfs_entries


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos: pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_is_deterministic_and_parseable():
    entries = [("b", 0o100644, b"hello"), ("a", 0o040755, b"")]
    one, two = cpio_newc(entries), cpio_newc(list(reversed(entries)))
    assert one == two
    assert parse_newc(one) == {"a": (0o040755, b""), "b": (0o100644, b"hello")}
    assert gzip_n(one) == gzip_n(one) and gzip.decompress(gzip_n(one)) == one


def test_module_dependencies_come_first():
    ko = b"\x00license=GPL\x00depends=virtio,virtio_ring\x00intree=Y\x00"
    assert module_depends(ko) == ["virtio", "virtio_ring"]
    deps = {"virtio_net": ["virtio", "net_failover"], "net_failover": ["failover"], "virtio": []}
    assert module_order(["virtio_net"], deps) == ["virtio", "failover", "net_failover", "virtio_net"]


def test_rootfs_has_parents_keys_and_no_plaintext():
    entries = rootfs_entries(b"BB", {"usr/lib/x86_64-linux-gnu/libz.so.1": (0o100755, b"z")},
                             ["ssh-ed25519 AAAA test"], "$6$salt$hash", {"virtio": b"ko"}, ["virtio"])
    files = {p: (m, d) for p, m, d in entries}
    assert "usr/lib/x86_64-linux-gnu" in files and files["usr/lib/x86_64-linux-gnu"][0] == 0o040755
    assert files["root/.ssh/authorized_keys"] == (0o100600, b"ssh-ed25519 AAAA test\n")
    assert b"root:$6$salt$hash:" in files["etc/shadow"][1]
    assert files["etc/modules"][1] == b"virtio\n"
    assert files["sbin/init"] == (0o120777, b"../bin/busybox")
