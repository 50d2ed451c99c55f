"""ISO resolver: the pure parts (CHECKSUM parsing, version choice, messages)."""

from __future__ import annotations

from pathlib import Path

from pipeline import iso
from pipeline.config import load_file

IMAGE = load_file(Path(__file__).resolve().parents[2] / "invoke.yaml").image("almalinux10-x86_64")
HEX = "ab" * 32


def test_bsd_style_lines_with_comments() -> None:
    text = f"""# AlmaLinux-10.1-x86_64-boot.iso: 1000 bytes
SHA256 (AlmaLinux-10.1-x86_64-boot.iso) = {HEX}
SHA256 (AlmaLinux-10.1-x86_64-dvd.iso) = {"cd" * 32}
garbage line
{"ef" * 32}  gnu-style.iso
"""
    sums = iso.parse_checksums(text)
    assert sums["AlmaLinux-10.1-x86_64-boot.iso"] == HEX
    assert sums["gnu-style.iso"] == "ef" * 32
    assert len(sums) == 3


def test_boot_isos_and_newest_point_release() -> None:
    sums = {f"AlmaLinux-10.{n}-x86_64-boot.iso": HEX for n in (0, 9, 10)}
    sums["AlmaLinux-10-latest-x86_64-boot.iso"] = HEX
    sums["AlmaLinux-10.2-aarch64-boot.iso"] = HEX
    found = iso.boot_isos(sums, "x86_64")
    assert sorted(found) == ["10.0", "10.10", "10.9"]
    assert iso.newest(list(found)) == "10.10"  # numeric, not string order


def test_versions() -> None:
    assert iso.is_point_release("10.1") and not iso.is_point_release("10") and not iso.is_point_release("latest")
    assert iso.major_of("10.1") == "10" and iso.major_of("latest") == "10"


def test_mirrors_from_env() -> None:
    m = iso.Mirrors.from_env({iso.MIRROR_ENV: "http://127.0.0.1:1/alma/", iso.VAULT_ENV: "http://v"})
    assert m == iso.Mirrors("http://127.0.0.1:1/alma", "http://v")
    assert iso.Mirrors.from_env({}) == iso.Mirrors(iso.REPO, iso.VAULT)


def test_offline_message_is_one_line_naming_url_and_override() -> None:
    msg = iso.offline_message("https://repo.almalinux.org/x.iso", "Name or service not known", IMAGE)
    assert "\n" not in msg
    assert "https://repo.almalinux.org/x.iso" in msg and "iso:" in msg and "images.almalinux10-x86_64" in msg
