"""Compression per link (pipeline.builders.wire), rsync's --version and itemized output
(pipeline.builders.rsync), the composite basis's sparse copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.base.errors import ConfigError, HostUnsuitable
from pipeline.builders import remote, rsync, transfer, wire
from pipeline.config import load

VERSIONS = Path(__file__).resolve().parent.parent / "fixtures" / "rsync"  # `rsync --version` outputs (README there)
RSYNC_35 = rsync.parse_version((VERSIONS / "rsync-3.5.0.txt").read_text())
RSYNC_327 = rsync.parse_version((VERSIONS / "rsync-3.2.7.txt").read_text())
RSYNC_313 = rsync.parse_version("rsync  version 3.1.3  protocol version 31\nCopyright (C) 1996-2018\n")
OPENRSYNC = rsync.parse_version((VERSIONS / "openrsync.txt").read_text())


def test_rsync_version_output_is_read_by_version_and_shape():
    assert RSYNC_35.version == (3, 5, 0) and RSYNC_35.protocol == 32 and RSYNC_35.named
    assert RSYNC_35.compress == ("zstd", "lz4", "zlibx", "zlib")
    assert RSYNC_327.version == (3, 2, 7) and "zstd" in RSYNC_327.compress and RSYNC_327.named
    assert RSYNC_313.compress == ("zlib",) and not RSYNC_313.named       # -z only
    assert OPENRSYNC.flavor == "openrsync" and OPENRSYNC.compress == () and not OPENRSYNC.named
    assert rsync.parse_version("").flavor == "unknown" and rsync.parse_version("").compress == ()
    assert rsync.parse_version((VERSIONS / "rsync-3.5.1.txt").read_text()).compress[0] == "zstd"
    assert RSYNC_35.common(RSYNC_327)[0] == "zstd" and RSYNC_35.common(OPENRSYNC) == ()


def _choose(setting, there=RSYNC_327, *, local_link=False, rate=None, here=RSYNC_35):
    asked = []

    def measure(enough):
        asked.append(enough)
        return rate

    got = wire.choose(setting, here, there, "hal9000", local_link=local_link, measure=measure)
    return got, bool(asked)


@pytest.mark.parametrize("rate,compress,level", [
    (12.5e6, "zstd", 3),         # 100 Mbit/s: the best ratio pays
    (125e6, "lz4", None),        # 1 Gbit/s (or more): the fast compressor
    (None, "zstd", 3),           # not measured: compressed
])
def test_auto_compresses_by_the_measured_link(rate, compress, level):
    got, measured = _choose("auto", rate=rate)
    assert (got.compress, got.level, measured) == (compress, level, True)
    assert got.rsync_args() == ["--compress", f"--compress-choice={compress}",
                                *([f"--compress-level={level}"] if level else [])]
    assert ("link measured at" in got.text) == (rate is not None)


def test_auto_falls_back_to_zstd_level_1_without_lz4():
    no_lz4 = rsync.RsyncVersion("rsync", (3, 2, 3), 31, ("zstd", "zlibx", "zlib"))
    got, _ = _choose("auto", no_lz4, rate=125e6)
    assert (got.compress, got.level) == ("zstd", 1)


def test_auto_is_off_on_the_same_machine_and_without_a_common_compressor():
    got, measured = _choose("auto", local_link=True, rate=1.0)
    assert got.compress is None and not measured and got.text == "uncompressed (hal9000 is this machine)"
    got, measured = _choose("auto", OPENRSYNC, rate=1.0)
    assert got.compress is None and not measured and "no compressor in common" in got.text


def test_explicit_settings():
    assert _choose("off")[0].compress is None
    on, measured = _choose("on")
    assert on.compress == "zstd" and not measured
    assert _choose("lz4")[0].rsync_args() == ["--compress", "--compress-choice=lz4"]
    old = _choose("zlib", RSYNC_313)[0]
    assert old.rsync_args() == ["--compress"]  # rsync before 3.2 knows -z only, which is zlib
    with pytest.raises(HostUnsuitable, match=r"compress: zstd needs zstd in both rsyncs.*rsync 3\.1\.3"):
        _choose("zstd", RSYNC_313)
    with pytest.raises(HostUnsuitable, match="no compressor in common"):
        _choose("on", OPENRSYNC)


@pytest.mark.parametrize("conn,same", [
    ("127.0.0.1 50000 127.0.0.1 22", True),
    ("198.18.0.1 50000 198.18.0.2 22", False),
    ("10.0.0.5 50000 10.0.0.5 22", True),       # this machine's own address
    ("::1 50000 ::1 22", True),
    ("", False),
    ("garbage", False),
])
def test_same_machine_from_ssh_connection(conn, same):
    assert wire.same_machine(conn) is same


def test_builder_facts_parse():
    facts = wire.parse_facts("198.18.0.1 50000 198.18.0.2 22\n" + (VERSIONS / "rsync-3.2.7.txt").read_text())
    assert facts.rsync.version == (3, 2, 7) and not facts.same_machine
    assert wire.parse_facts("\n").rsync.flavor == "unknown"


def test_compress_config_accepts_yaml_booleans(tmp_path):
    login = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]
    cfg = load({"images": {"demo": {"distro": "demo", "arch": "x86_64", "users": login}},
                "builders": {"a": {"compress": False}, "b": {"compress": True}, "c": {"compress": "lz4"}, "d": {}}},
               tmp_path)
    assert [cfg.builders[n].compress.value for n in "abcd"] == ["off", "on", "lz4", "auto"]
    assert remote.resolve(cfg, "c").compress.value == "lz4" and remote.resolve(cfg, "elsewhere").compress.value == "auto"
    with pytest.raises(ConfigError, match=r"builders\.a\.compress"):
        load({"images": {"demo": {"distro": "demo", "arch": "x86_64", "users": login}},
              "builders": {"a": {"compress": "brotli"}}}, tmp_path)


def test_itemized_lines():
    out = ("imagepipe-item >f+++++++++ demo.qcow2\nimagepipe-item cf......... vmlinuz\n"
           "imagepipe-item .f..t...... sbom.cdx.json\nNumber of files: 3\n")
    assert rsync.parse_itemized(out) == {"demo.qcow2": ">f+++++++++", "vmlinuz": "cf.........",
                                         "sbom.cdx.json": ".f..t......"}
    argv = rsync.pull_argv("h", ["x"], Path("/d"), None, basis=Path("/prev"), compress=["--compress"])
    assert "--no-whole-file" in argv and "--copy-dest=/prev" in argv and "--append-verify" not in argv
    assert "--ignore-times" in argv  # the basis is never taken as the new build by size and time
    assert "--compress" in argv and rsync.ITEMIZE in argv


def test_one_pass_counts_matched_data_of_a_delta():
    grown = {"img": 100}
    assert transfer.one_pass(rsync.Stats(literal=10, matched=90), {}, grown)       # a delta: one pass
    assert not transfer.one_pass(rsync.Stats(literal=110, matched=90), {}, grown)  # redone
    assert transfer.one_pass(rsync.Stats(), {}, {})                                # only local copies


def test_copy_sparse_appends_and_keeps_holes(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    with open(src, "wb") as f:
        f.write(b"A" * 100_000)
        f.seek(8 << 20)
        f.write(b"B" * 5000)
        f.truncate(16 << 20)
    dest.write_bytes(b"head" * 1000)
    with open(src, "rb") as s, open(dest, "r+b") as d:
        transfer.copy_sparse(s.fileno(), d.fileno(), 4000)
    assert dest.read_bytes() == b"head" * 1000 + src.read_bytes()
    assert os.stat(dest).st_blocks * 512 < 1 << 20  # the 16 MiB are mostly holes still


def test_one_read_gives_both_hashes_and_a_bad_blake3_map_is_refused(tmp_path):
    import hashlib

    import blake3

    from pipeline.base import digest
    from pipeline.output import manifest_check

    data = os.urandom(9 << 20)  # more than one read
    (tmp_path / "f").write_bytes(data)
    assert digest.of_file(tmp_path / "f", (digest.SHA256, digest.FAST)) == {
        "sha256": hashlib.sha256(data).hexdigest(), "blake3": blake3.blake3(data).hexdigest()}
    base = {"image": "demo-x86_64", "build_id": "b1",
            "artifact": {"file": "d.qcow2", "format": "qcow2", "size": 1, "sha256": "0" * 64}}
    assert manifest_check.problems({**base, "blake3": {"d.qcow2": "a" * 64}}) == []
    assert manifest_check.problems({**base, "blake3": {"../d.qcow2": "a" * 64}})
    assert manifest_check.problems({**base, "blake3": {"d.qcow2": "xyz"}})
