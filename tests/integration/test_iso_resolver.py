"""ISO resolver against a real HTTP server on loopback serving AlmaLinux-style mirror folders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from pipeline import iso
from pipeline.base.errors import IsoUnavailable, VerifyFailed
from pipeline.config import load_file
from pipeline.output import artifacts
from tests.almalinux_support import (
    clearsign,
    closed_port_url,
    serve,
    trust_test_signer,
    write_release,
)
from tests.support import ROOT, invoke, project_copy

CFG = load_file(ROOT / "invoke.yaml")
X86 = CFG.image("almalinux10-x86_64")


@pytest.fixture()
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """repo/: 10 (= 10.1, the latest) and 10.1; vault/: 10.0 (moved out of repo). The CHECKSUM
    files are clear-signed by a key made for the test run, which the test trusts."""
    trust_test_signer(monkeypatch)
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
    with pytest.raises(IsoUnavailable) as err:
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
        with pytest.raises(IsoUnavailable) as err:
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


# ----------------------------------------------------------------------- CHECKSUM signatures


def test_a_signed_checksum_is_verified_and_the_pin_and_dry_run_say_so(mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, _shas, _ = mirror
    entry = iso.resolve(X86, mirrors)
    assert entry.signature == "verified (the key in IMAGEPIPE_ALMA_KEY)"
    root = tmp_path / "proj"
    root.mkdir()
    iso.write_lock(root, {X86.name: entry})
    assert json.loads((root / iso.LOCK_FILE).read_text())["images"][X86.name]["signature"] == entry.signature
    assert iso.describe(X86, root, tmp_path / "cache", mirrors)["signature"] == entry.signature


@pytest.fixture()
def site_root(mirror, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    return tmp_path / "site" / "almalinux"


def test_a_changed_checksum_is_refused(mirror, site_root: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, _shas, _ = mirror
    checksum = site_root / "10.1" / "isos" / "x86_64" / "CHECKSUM"
    text = checksum.read_text()
    real = text.split("SHA256 (AlmaLinux-10.1-x86_64-boot.iso) = ")[1][:64]
    checksum.write_text(text.replace(real, "0" * 64))  # the sha256 swapped after signing
    with pytest.raises(iso.BadSignature, match="BAD"):
        iso.resolve(dataclasses.replace(X86, version="10.1"), mirrors)


def test_unsigned_or_foreign_signed_checksums_are_refused(mirror, site_root: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, _shas, _ = mirror
    checksum = site_root / "10.1" / "isos" / "x86_64" / "CHECKSUM"
    signed = checksum.read_text()
    body = signed.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----")[0]
    checksum.write_text(body)
    with pytest.raises(iso.BadSignature, match="is not signed"):
        iso.resolve(dataclasses.replace(X86, version="10.1"), mirrors)
    stranger = tmp_path / "stranger-gpg"
    stranger.mkdir(mode=0o700)
    subprocess.run(["gpg", "--batch", "--homedir", str(stranger), "--passphrase", "", "--quick-gen-key",
                    "someone else <else@example.invalid>", "ed25519", "sign", "never"], check=True,
                   capture_output=True, timeout=120)
    clearsign(checksum, stranger)
    with pytest.raises(iso.BadSignature, match="signed by another key"):
        iso.resolve(dataclasses.replace(X86, version="10.1"), mirrors)


def test_the_shipped_almalinux_key_is_the_one_checked_by_default(mirror, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without IMAGEPIPE_ALMA_KEY only AlmaLinux's own key counts: the test mirror's signature is
    refused, and the shipped key file holds the pinned fingerprint."""
    mirrors, _shas, _ = mirror
    monkeypatch.delenv(iso.KEY_ENV)
    with pytest.raises(iso.BadSignature, match="signed by another key with AlmaLinux 10 key EE6D…E572"):
        iso.resolve(X86, mirrors)
    key = iso.trusted_key("10")
    assert key is not None and key.fingerprint == "EE6DB7B98F5BF5EDD9DA0DE5DEE5C11CC2A1E572"
    home = tmp_path / "gpg-home"
    home.mkdir(mode=0o700)
    shown = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--show-keys", "--with-colons", str(key.path)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"fpr:::::::::{key.fingerprint}:" in shown and "AlmaLinux OS 10 <packager@almalinux.org>" in shown


def test_without_gpgv_the_checksum_is_used_and_said_to_be_unverified(mirror, monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mirrors, shas, _ = mirror
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # no gpgv (nor anything else) on PATH
    entry = iso.resolve(X86, mirrors)
    assert entry.sha256 == shas["10.1"] and entry.signature.startswith("not verified: gpgv not found")
