"""What is inside the demo builds, with real packer + QEMU (TCG) builds on a copy of the session's
demo output: three formats published and verified, the package list and a valid SBOM, `invoke
diff` and the rebuild report's changes, a fetch of every format from a builder over real
ssh/rsync, and two builds from the same inputs giving the same sha256 (check-reproducible)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.output import artifacts
from tests.support import invoke, published_copy, write_config
from tests.support.sshd import SshHost
from tests.unit.test_packages import validate

pytestmark = pytest.mark.slow
IMAGE = "demo-x86_64"
FORMATS = ["qcow2", "raw", "vmdk"]


@pytest.fixture(scope="module")
def formats_build(demo_build, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The session's demo output copied, then `rebuild --json` with formats [qcow2, raw, vmdk]:
    the config changed, so it builds (and boot-tests) a second build next to the first."""
    base = tmp_path_factory.mktemp("formats")
    _, out = published_copy(demo_build, base, cache=True)
    first = artifacts.read_manifest(out / IMAGE)
    cfg = write_config(base / "formats.yaml", out, {"images": {IMAGE: {"formats": FORMATS}}})
    res = invoke(["rebuild", "--image", IMAGE, "--json"], cfg, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {"base": base, "out": out, "cfg": cfg, "first": first, "events": events,
            "manifest": artifacts.read_manifest(out / IMAGE)}


def test_three_formats_are_published_verified_and_checkable_where_they_are(formats_build):
    image_dir = formats_build["out"] / IMAGE
    manifest = formats_build["manifest"]
    files = manifest["artifacts"]
    assert [a["format"] for a in files] == FORMATS and manifest["artifact"] == files[0]
    for art in files:
        link = image_dir / art["file"]
        assert link.is_symlink() and link.resolve().parent == artifacts.current_build(image_dir)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(link)], capture_output=True,
                                         text=True, check=True, timeout=60).stdout)
        assert info["format"] == art["format"] and info["virtual-size"] == art["virtual_size"] == 64 << 20
        assert artifacts.sha256_file(link) == art["sha256"]
    same = subprocess.run(["qemu-img", "compare", str(image_dir / files[0]["file"]), str(image_dir / files[2]["file"])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert same.returncode == 0, same.stdout
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=image_dir, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {line.split(":")[0] for line in res.stdout.splitlines()} >= {a["file"] for a in files} | {"sbom.cdx.json"}


def test_the_manifest_lists_the_debian_packages_and_the_sbom_validates(formats_build):
    manifest = formats_build["manifest"]
    pkgs = {p["name"]: p for p in manifest["packages"]}
    assert {"busybox-static", "dropbear-bin", "e2fsprogs", "libc6"} <= set(pkgs)
    assert any(name.startswith("linux-image-") for name in pkgs)
    bb = pkgs["busybox-static"]
    assert bb["type"] == "deb" and bb["arch"] == "amd64" and bb["purl"].startswith("pkg:deb/debian/busybox-static@")
    doc = json.loads((formats_build["out"] / IMAGE / "sbom.cdx.json").read_text())
    validate(doc)
    assert {c["purl"] for c in doc["components"]} == {p["purl"] for p in manifest["packages"]}
    assert doc["metadata"]["component"]["hashes"][0]["content"] == manifest["artifact"]["sha256"]


def test_rebuild_reports_what_changed_and_diff_prints_a_real_comparison(formats_build):
    first, second = formats_build["first"], formats_build["manifest"]
    built = [e for e in formats_build["events"] if e["kind"] == "built"]
    assert len(built) == 1, formats_build["events"]
    changes = built[0]["changes"]
    assert changes["from"] == first["build_id"] and changes["inputs_changed"] == ["config"]
    assert changes["packages"] == {"added": 0, "removed": 0, "changed": 0}
    # the qcow2 is reproducible: a new build id and config, the same disk
    assert changes["same_image"] is True and second["artifact"]["sha256"] == first["artifact"]["sha256"]

    res = invoke(["diff", IMAGE], formats_build["cfg"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == f"{IMAGE}: build {first['build_id']} → {second['build_id']}"
    assert "packages: 0 added, 0 removed, 0 changed" in res.stdout and "inputs changed: config" in res.stdout
    assert "size raw: - → 64.0 MiB" in res.stdout and "image: bit-for-bit the same" in res.stdout
    as_json = json.loads(invoke(["diff", IMAGE, "--json", "--build-a", second["build_id"],
                                 "--build-b", first["build_id"]], formats_build["cfg"], check=True).stdout)
    assert as_json["old"] == second["build_id"] and as_json["sizes"]["vmdk"]["new"] is None
    bad = invoke(["diff", IMAGE, "--build-a", "20990101T000000Z-none"], formats_build["cfg"])
    assert bad.returncode == 2 and "no kept build '20990101T000000Z-none'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_fetch_brings_every_format_and_verifies_each(formats_build, tmp_path):
    """A builder (real sshd + rsync on loopback) holding the three-format build: the fetch
    transfers and verifies every file SHA256SUMS names and publishes them all here."""
    host = SshHost(tmp_path / "sshd").start()
    try:
        known = tmp_path / "known_hosts"
        known.write_text(host.known_hosts_line())
        builder = tmp_path / "builder"
        shutil.copytree(formats_build["out"], builder / "output", symlinks=True)
        out = tmp_path / "local"
        cfg = write_config(tmp_path / "fetch.yaml", out, {
            "ssh_config_path": str(host.client_config(tmp_path / "ssh_config", known)),
            "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}},
            "images": {IMAGE: {"formats": FORMATS}},
        })
        res = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        image_dir = out / IMAGE
        local = artifacts.read_manifest(image_dir)
        assert local["build_id"] == formats_build["manifest"]["build_id"]
        for art in formats_build["manifest"]["artifacts"]:
            assert artifacts.sha256_file(image_dir / art["file"]) == art["sha256"]
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=image_dir, capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0 and "demo-x86_64.vmdk: OK" in check.stdout, check.stdout + check.stderr
        again = invoke(["remote-fetch-demo", "hal9000"], cfg, timeout=300)
        assert again.returncode == 0 and "nothing to fetch" in again.stderr, again.stderr
    finally:
        host.stop()


def test_two_builds_from_the_same_inputs_give_the_same_sha256(demo_build, tmp_path):
    """check-reproducible builds twice into staging: both equal each other and the session's
    published build (three builds, one sha256); nothing is published, no history is written."""
    cfg, out = published_copy(demo_build, tmp_path, cache=True)
    before = artifacts.read_manifest(out / IMAGE)
    builds_before = sorted(p.name for p in (out / IMAGE / "builds").iterdir())
    res = invoke(["check-reproducible", IMAGE, "--json"], cfg, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    report = [json.loads(line) for line in res.stdout.splitlines() if '"kind": "check"' in line]
    assert len(report) == 1 and report[0]["reproducible"] is True, res.stdout
    files = {f["file"]: f for f in report[0]["files"]}
    assert files["demo-x86_64.qcow2"]["same"] and files["demo-x86_64.qcow2"]["sha256_a"] == before["artifact"]["sha256"]
    assert {"vmlinuz", "initrd.img", "template.pkr.hcl"} <= set(files)
    assert report[0]["skipped"] == {"sbom.cdx.json": "names its build (id, time) on purpose"}
    assert sorted(p.name for p in (out / IMAGE / "builds").iterdir()) == builds_before
    assert artifacts.read_manifest(out / IMAGE)["build_id"] == before["build_id"]
    assert not (out / IMAGE / ".staging").exists()
    assert sorted(p.name for p in (out / IMAGE / "logs" / "reproducible").iterdir()) == ["a", "b"]
    history = invoke(["history", "--image", IMAGE, "--json"], cfg, check=True).stdout.splitlines()
    assert len(history) == 1, "the check's builds are not in the history"


def test_build_writes_the_collected_list_nowhere_it_stays(formats_build):
    current = artifacts.current_build(formats_build["out"] / IMAGE)
    assert current is not None and not (current / "collected").exists()
    assert sorted(formats_build["manifest"]["files"]) == ["initrd.img", "sbom.cdx.json", "template.pkr.hcl", "vmlinuz"]
    assert Path(current / "SHA256SUMS").read_text().count("\n") == len(FORMATS) + 4
