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


# ---------------------------------------------------------------- files found by what they are

def _tree(base, files: dict[str, bytes]):
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


def test_files_are_found_at_either_merged_usr_place(tmp_path):
    """Debian 12's busybox-static ships /bin/busybox, Debian 13's /usr/bin/busybox: both are found."""
    from pipeline.demo import BUSYBOX, Finder

    old = _tree(tmp_path / "bookworm", {"bin/busybox": b"twelve"})
    new = _tree(tmp_path / "trixie", {"usr/bin/busybox": b"thirteen"})
    for tree, want in ((old, b"twelve"), (new, b"thirteen")):
        found = Finder({"busybox-static": tree}, {"busybox-static": "busybox-static_1%3a1.37.0-6+b9_amd64"}, "Debian")
        assert found.file(*BUSYBOX).read_bytes() == want


def test_a_link_is_not_taken_for_the_file(tmp_path):
    """A packaged symlink (openssh-sftp-server's /usr/lib/sftp-server → /usr/lib/openssh/sftp-server)
    would resolve on the host: only regular files count."""
    from pipeline.demo import SFTP_SERVER, Finder

    tree = _tree(tmp_path / "t", {"usr/lib/openssh/sftp-server": b"real"})
    (tmp_path / "t/usr/lib/sftp-server").symlink_to("/usr/lib/openssh/sftp-server")
    found = Finder({"openssh-sftp-server": tree}, {}, "Debian")
    assert found.file(*SFTP_SERVER) == tree / "usr/lib/openssh/sftp-server"


def test_a_missing_file_names_the_package_the_file_and_the_suite(tmp_path):
    import pytest

    from pipeline.base.errors import BuildFailed
    from pipeline.demo import BUSYBOX, Finder

    tree = _tree(tmp_path / "t", {"usr/share/doc/busybox-static/copyright": b"c"})
    found = Finder({"busybox-static": tree}, {"busybox-static": "busybox-static_1%3a1.38.0-3+b1_amd64"},
                   "Debian GNU/Linux forky/sid")
    with pytest.raises(BuildFailed) as err:
        found.file(*BUSYBOX)
    text = err.value.message
    assert "busybox-static_1:1.38.0-3+b1_amd64" in text and "busybox" in text and "forky/sid" in text
    assert "/bin/" in text and "/usr/bin/" in text
    assert "dpkg-deb -c" in (err.value.hint or "")
    with pytest.raises(BuildFailed, match="has no kernel modules"):
        found.modules(["busybox-static"])
    with pytest.raises(BuildFailed, match="has no vmlinuz"):
        found.kernel(["busybox-static"])


def test_modules_are_read_from_lib_or_usr_lib_and_unpacked(tmp_path):
    """Debian 12: /lib/modules/V/kernel/**/x.ko; Debian 13: /usr/lib/modules/V/kernel/**/x.ko.xz."""
    import gzip as gz
    import lzma

    from pipeline.demo import Finder, _modules

    ko = b"\x7fELF\x00depends=virtio_ring\x00"
    ring = b"\x7fELF\x00depends=\x00"
    old = _tree(tmp_path / "12", {"lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/net/virtio_net.ko": ko,
                                  "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko": ring})
    new = _tree(tmp_path / "13", {
        "usr/lib/modules/6.12.1-cloud-amd64/kernel/drivers/net/virtio_net.ko.xz": lzma.compress(ko),
        "usr/lib/modules/6.12.1-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko.gz": gz.compress(ring)})
    for tree in (old, new):
        found = Finder({"linux-image": tree}, {}, "Debian")
        mods = _modules(found, ["linux-image"])
        assert mods == {"virtio_net": ko, "virtio_ring": ring}


def test_the_kernel_split_over_packages_is_found(tmp_path):
    """The newest suite: linux-image-V is empty, linux-binary-V has /usr/lib/modules/V/vmlinuz and
    linux-modules-V the modules; Debian 12 and 13: /boot/vmlinuz-V in linux-image-V."""
    from pipeline.demo import Finder

    image = _tree(tmp_path / "image", {"usr/share/doc/linux-image-7/changelog": b""})
    binary = _tree(tmp_path / "binary", {"usr/lib/modules/7.2.12-cloud-amd64/vmlinuz": b"kernel"})
    modules = _tree(tmp_path / "modules", {"usr/lib/modules/7.2.12-cloud-amd64/kernel/net/virtio_net.ko.xz": b"x"})
    found = Finder({"linux-image-7": image, "linux-binary-7": binary, "linux-modules-7": modules}, {}, "forky")
    kernel_pkgs = ["linux-image-7", "linux-binary-7", "linux-modules-7"]
    assert found.kernel(kernel_pkgs).read_bytes() == b"kernel"
    assert found.modules(kernel_pkgs)["virtio_net"][0] == "linux-modules-7"
    old = _tree(tmp_path / "old", {"boot/vmlinuz-6.1.0-1-cloud-amd64": b"six"})
    assert Finder({"linux-image-6": old}, {}, "bookworm").kernel(["linux-image-6"]).read_bytes() == b"six"
