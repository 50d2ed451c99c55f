"""The rebuild's ISO refresh against a real loopback mirror: a new pin changes the input hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipeline import inputs, rebuild
from pipeline.config import load
from tests.almalinux_support import closed_port_url, serve, trust_test_signer, write_release
from tests.support import ROOT, project_copy

VERSIONS = {"packer": "1.6.6", "qemu-system-x86_64": "7.2.22"}
KICKSTART = "kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg"


def project(tmp_path: Path):  # Config rooted in a copy holding the committed Alma files
    root = tmp_path / "proj"
    project_copy(root, ("packer", "kickstart"))
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    raw["defaults"]["output_dir"] = str(tmp_path / "output")
    return load(raw, root)


def test_refresh_pins_a_new_release_and_offline_keeps_the_pin(tmp_path, monkeypatch):
    trust_test_signer(monkeypatch)
    cfg = project(tmp_path)
    alma = cfg.image("almalinux10-x86_64")
    events: list[tuple[str, str]] = []

    def emit(kind: str, image: str, message: str, **_: object) -> None:
        events.append((kind, message))

    site = tmp_path / "site"
    write_release(site / "almalinux", "10.1", "x86_64", b"iso 10.1\n" * 50)
    shutil.copytree(site / "almalinux/10.1", site / "almalinux/10")
    unpinned = inputs.compute(cfg, alma, VERSIONS)
    with serve(site) as (base, _hits):
        monkeypatch.setenv("IMAGEPIPE_ALMA_MIRROR", f"{base}/almalinux")
        monkeypatch.setenv("IMAGEPIPE_ALMA_VAULT", f"{base}/vault")
        rebuild.refresh_pin(cfg, alma, emit)
        assert events[-1][0] == "pin" and events[-1][1].startswith("installer ISO: 10.1 (repo, sha256 ")
        # the committed kickstart installs the pinned point release's packages: it follows the pin
        assert events[-1][1].endswith(") pinned; kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg follows it")
        assert "/almalinux/10.1/BaseOS/x86_64/os/" in (cfg.root / KICKSTART).read_text()
        pinned = inputs.compute(cfg, alma, VERSIONS)
        assert pinned.changed_parts(unpinned.parts) == [f"file:{KICKSTART}", "iso.lock"]
        rebuild.refresh_pin(cfg, alma, emit)
        assert events[-1][1].startswith("installer ISO: 10.1 (repo") and events[-1][1].endswith(") unchanged")
        # AlmaLinux ships 10.2: the next timer run pins it and the hash says "rebuild"
        write_release(site / "almalinux", "10.2", "x86_64", b"iso 10.2\n" * 50)
        shutil.rmtree(site / "almalinux/10")
        shutil.copytree(site / "almalinux/10.2", site / "almalinux/10")
        rebuild.refresh_pin(cfg, alma, emit)
        assert events[-1][1].startswith("installer ISO: 10.2 (repo") and events[-1][1].endswith("follows it")
        assert ") updated from 10.1;" in events[-1][1]
        assert inputs.compute(cfg, alma, VERSIONS).changed_parts(pinned.parts) == [f"file:{KICKSTART}", "iso.lock"]
    lock_before = (cfg.root / "iso.lock.json").read_text()
    monkeypatch.setenv("IMAGEPIPE_ALMA_MIRROR", closed_port_url())
    rebuild.refresh_pin(cfg, alma, emit)
    assert events[-1][1].startswith("kept the pinned installer ISO (could not check for updates:")
    assert (cfg.root / "iso.lock.json").read_text() == lock_before
    assert json.loads(lock_before)["images"]["almalinux10-x86_64"]["version"] == "10.2"
