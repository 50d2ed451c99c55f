"""ISO resolver against a real HTTP server on loopback serving AlmaLinux-style mirror folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import iso
from pipeline.base.errors import VerifyFailed
from pipeline.config import load_file
from pipeline.output import artifacts
from tests.almalinux_support import closed_port_url, serve, write_release
from tests.support import ROOT, invoke, project_copy

CFG = load_file(ROOT / "invoke.yaml")
X86 = CFG.image("almalinux10-x86_64")


@pytest.fixture()
def mirror(tmp_path: Path):  # type: ignore[no-untyped-def]
    """repo/: 10 (= 10.1, the latest) and 10.1; vault/: 10.0 (moved out of repo)."""
    site = tmp_path / "site"
    repo, vault = site / "almalinux", site / "vault"
    sha101 = write_release(repo, "10.1", "x86_64", b"iso 10.1\n" * 100)
    write_release(repo, "10", "x86_64", b"iso 10.1\n" * 100)  # the major folder mirrors the latest
    # the major folder's CHECKSUM also names the point release, as AlmaLinux's does
    major = repo / "10" / "isos" / "x86_64"
    (major / "CHECKSUM").write_text((repo / "10.1/isos/x86_64/CHECKSUM").read_text())
    sha100 = write_release(vault, "10.0", "x86_64", b"iso 10.0\n" * 100)
    with serve(site) as (base, hits):
        yield iso.Mirrors(f"{base}/almalinux", f"{base}/vault"), {"10.1": sha101, "10.0": sha100}, hits


def test_major_version_resolves_to_newest_point_release(mirror) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, _ = mirror
    entry = iso.resolve(X86, mirrors)
    assert (entry.version, entry.source, entry.sha256) == ("10.1", "repo", shas["10.1"])
    assert entry.url == f"{mirrors.repo}/10.1/isos/x86_64/AlmaLinux-10.1-x86_64-boot.iso"
    assert iso.resolve(dataclasses.replace(X86, version="latest"), mirrors).version == "10.1"


def test_point_release_gone_from_repo_comes_from_vault(mirror) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, _ = mirror
    entry = iso.resolve(dataclasses.replace(X86, version="10.0"), mirrors)
    assert (entry.source, entry.sha256) == ("vault", shas["10.0"])
    assert entry.url.startswith(mirrors.vault + "/10.0/isos/x86_64/")


def test_download_verifies_and_is_cached(mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, hits = mirror
    entry = iso.resolve(X86, mirrors)
    root = tmp_path / "proj"
    root.mkdir()
    iso.write_lock(root, {X86.name: entry})
    got = iso.ensure(X86, root, tmp_path / "cache", mirrors)
    assert got.sha256 == shas["10.1"] and got.path.read_bytes() == b"iso 10.1\n" * 100
    before = len(hits)
    assert iso.ensure(X86, root, tmp_path / "cache", mirrors) == got
    assert len(hits) == before, "a verified cached ISO is not downloaded again"


def test_locked_release_moved_to_vault_still_downloads(mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, _ = mirror
    stale = iso.LockEntry("10.0", "10.0", "x86_64", "AlmaLinux-10.0-x86_64-boot.iso",
                          f"{mirrors.repo}/10.0/isos/x86_64/AlmaLinux-10.0-x86_64-boot.iso", shas["10.0"], "repo")
    image = dataclasses.replace(X86, version="10.0")
    iso.write_lock(tmp_path, {image.name: stale})
    assert iso.ensure(image, tmp_path, tmp_path / "cache", mirrors).sha256 == shas["10.0"]


def test_checksum_mismatch_refuses_and_leaves_nothing(mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, _, _ = mirror
    entry = dataclasses.replace(iso.resolve(X86, mirrors), sha256="0" * 64)
    iso.write_lock(tmp_path, {X86.name: entry})
    with pytest.raises(VerifyFailed, match="refusing to build"):
        iso.ensure(X86, tmp_path, tmp_path / "cache", mirrors)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_no_network_is_one_clear_line(tmp_path: Path) -> None:
    dead = iso.Mirrors(closed_port_url() + "/almalinux", closed_port_url())
    with pytest.raises(iso.IsoUnavailable) as err:
        iso.ensure(X86, tmp_path, tmp_path / "cache", dead)
    text = err.value.render()
    assert "\n" not in text and "/10/isos/x86_64/CHECKSUM" in text and "iso:" in text


def test_local_iso_is_hashed_once(tmp_path: Path) -> None:
    local = tmp_path / "AlmaLinux-10.1-x86_64-boot.iso"
    local.write_bytes(b"local iso\n")
    image = dataclasses.replace(X86, iso=str(local))
    first = iso.ensure(image, tmp_path, tmp_path / "cache", iso.Mirrors(closed_port_url(), closed_port_url()))
    assert first.path == local and first.sha256 == artifacts.sha256_file(local)
    index = json.loads((tmp_path / "cache" / "sha256-index.json").read_text())
    assert index[str(local.resolve())]["sha256"] == first.sha256


def test_update_iso_task_writes_lock_only_when_changed(mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, _ = mirror
    (tmp_path / "p").mkdir()
    proj = project_copy(tmp_path / "p")
    env = {iso.MIRROR_ENV: mirrors.repo, iso.VAULT_ENV: mirrors.vault}
    res = invoke(["update-iso", "-i", "almalinux10-x86_64"], cwd=proj, env=env)
    assert res.returncode == 0, res.stderr
    lock = json.loads((proj / iso.LOCK_FILE).read_text())
    assert lock["images"]["almalinux10-x86_64"]["sha256"] == shas["10.1"]
    stamp = (proj / iso.LOCK_FILE).stat().st_mtime_ns
    again = invoke(["update-iso", "-i", "almalinux10-x86_64"], cwd=proj, env=env)
    assert again.returncode == 0 and "unchanged" in again.stderr
    assert (proj / iso.LOCK_FILE).stat().st_mtime_ns == stamp
    bad = invoke(["update-iso", "-i", "nixos-x86_64"], cwd=proj, env=env)
    assert bad.returncode != 0 and "installer ISO" in bad.stderr


def test_update_iso_offline_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    dead = closed_port_url()
    res = invoke(["update-iso"], cwd=proj, env={iso.MIRROR_ENV: dead, iso.VAULT_ENV: dead})
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and dead in errors[0], res.stderr
    assert not (proj / iso.LOCK_FILE).exists()


def _release_site(tmp_path: Path, payload: bytes) -> tuple[Path, str]:
    site = tmp_path / "site"
    sha = write_release(site / "almalinux", "10.1", "x86_64", payload)
    return site, sha


class Lines:
    """A report callable without `transfer`: gets text lines (as remote and older callers do)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


def test_interrupted_download_keeps_the_part_and_resumes_with_range(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    site, sha = _release_site(tmp_path, payload)
    name = "AlmaLinux-10.1-x86_64-boot.iso"
    path = f"/almalinux/10.1/isos/x86_64/{name}"
    ranges: list[str | None] = []
    dest = tmp_path / "cache" / name
    with serve(site, ranges=ranges, cut_once={path: 300_000}) as (base, _hits):
        with pytest.raises(iso.IsoUnavailable) as err:
            iso.download(base + path, dest, sha, X86)
        part = dest.with_name(name + ".part")
        assert part.stat().st_size == 300_000, "the bytes already fetched are kept"
        assert "kept in" in err.value.message and "resumed next time" in err.value.message
        report = Lines()
        assert iso.download(base + path, dest, sha, X86, report) == dest
    assert ranges == [None, "bytes=300000-"], "the second request asks only for the rest"
    assert dest.read_bytes() == payload and not part.exists()
    assert report.lines[-1].startswith(f"downloaded {name}: 1.0 MiB")


def test_a_complete_part_is_verified_not_fetched_again(tmp_path: Path) -> None:
    payload = b"whole iso\n" * 1000
    site, sha = _release_site(tmp_path, payload)
    name = "AlmaLinux-10.1-x86_64-boot.iso"
    dest = tmp_path / "cache" / name
    dest.parent.mkdir(parents=True)
    dest.with_name(name + ".part").write_bytes(payload)
    ranges: list[str | None] = []
    with serve(site, ranges=ranges) as (base, _):
        iso.download(f"{base}/almalinux/10.1/isos/x86_64/{name}", dest, sha, X86)
    assert ranges == [f"bytes={len(payload)}-"] and dest.read_bytes() == payload  # 416: nothing left


def test_a_corrupt_part_is_removed_after_the_check(tmp_path: Path) -> None:
    payload = b"good iso\n" * 1000
    site, sha = _release_site(tmp_path, payload)
    name = "AlmaLinux-10.1-x86_64-boot.iso"
    dest = tmp_path / "cache" / name
    dest.parent.mkdir(parents=True)
    dest.with_name(name + ".part").write_bytes(b"XXXX")  # not the start of this file
    with serve(site) as (base, _), pytest.raises(VerifyFailed, match="checksum mismatch"):
        iso.download(f"{base}/almalinux/10.1/isos/x86_64/{name}", dest, sha, X86)
    assert not dest.exists() and not dest.with_name(name + ".part").exists()


def test_download_progress_reaches_the_build_view(tmp_path: Path) -> None:
    import io

    from pipeline.progress import Progress

    payload = b"x" * (3 * 1024**2)
    site, sha = _release_site(tmp_path, payload)
    name = "AlmaLinux-10.1-x86_64-boot.iso"
    out = io.StringIO()
    with serve(site) as (base, _), Progress("alma", stream=out, heartbeat=0) as p:
        iso.download(f"{base}/almalinux/10.1/isos/x86_64/{name}", tmp_path / "c" / name, sha, X86, p.report())
    lines = out.getvalue().splitlines()
    assert "downloading AlmaLinux-10.1-x86_64-boot.iso: 1.0 of 3.0 MiB (33%)" in lines[0] and "MiB/s, ETA" in lines[0]
    assert lines[-1].endswith("downloaded AlmaLinux-10.1-x86_64-boot.iso: 3.0 MiB at " + lines[-1].split(" at ")[-1])
