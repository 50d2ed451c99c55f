"""prepare(): the host-side inputs of an AlmaLinux build (ISO, kickstart, firmware, secrets)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline import iso
from pipeline.config import Accel, Arch, load_file
from pipeline.distros import almalinux as alma_profile
from pipeline.distros.almalinux import PROFILE as ALMA
from pipeline.errors import UsageError
from pipeline.host import find_firmware, local_descriptors
from pipeline.plan import AccelChoice, BuildPlan
from pipeline.render import almalinux
from tests.almalinux_support import ROOT, closed_port_url

CFG = load_file(ROOT / "invoke.yaml")


def plan_for(name: str, tmp: Path, **changes: object) -> BuildPlan:
    image = dataclasses.replace(CFG.image(name), **changes)
    fw = find_firmware(image.arch, os.environ, descriptors=local_descriptors())
    assert fw is not None, "UEFI firmware missing: sudo apt-get install ovmf qemu-efi-aarch64"
    out = tmp / "output" / image.name
    return BuildPlan(image=image, build_id="20261123T000000Z-test", root=ROOT, accel=AccelChoice(Accel.TCG, "test"),
                     firmware=fw, image_dir=out, staging=out / ".staging" / "b", log_dir=out / "logs" / "b",
                     template=alma_profile.PROFILE.template(ROOT, image), ssh_key=tmp / "key", host_os="linux",
                     host_machine="x86_64", profile=alma_profile.PROFILE)


def prepare(plan: BuildPlan, stage: Path, report=lambda _line: None):  # type: ignore[no-untyped-def]
    return alma_profile.PROFILE.prepare(plan, stage, report)


def test_no_network_and_no_iso_is_one_line_naming_url_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url() + "/almalinux")
    monkeypatch.setenv(iso.VAULT_ENV, closed_port_url())
    with pytest.raises(iso.IsoUnavailable) as err:
        prepare(plan_for("almalinux10-x86_64", tmp_path), tmp_path / "stage")
    text = err.value.render()
    assert "\n" not in text and "http://127.0.0.1:" in text and "iso:" in text


@pytest.mark.parametrize("name", ["almalinux10-x86_64", "almalinux10-aarch64"])
def test_local_iso_gives_every_variable_and_keeps_the_password_out_of_argv(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(almalinux.PASSWORD_ENV, raising=False)
    local = tmp_path / "boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for(name, tmp_path, iso=str(local))
    notes: list[str] = []
    inputs = prepare(plan, tmp_path / "stage", report=notes.append)
    v = inputs.variables
    assert notes == [], "the committed kickstart is what the config renders"
    staged = Path(v["kickstart_dir"], "ks.cfg")
    assert staged.read_text() == ALMA.kickstart_path(ROOT, plan.image).read_text()
    assert v["iso_url"] == str(local) and v["iso_checksum"] == "sha256:" + iso.sha256_file(local)
    assert Path(v["kickstart_dir"], "ks.cfg").is_file()
    assert Path(v["efi_firmware_code"]) == Path(plan.firmware.code)
    store = Path(v["efi_firmware_vars"])
    assert store.parent == tmp_path / "stage" / "inputs" and os.access(store, os.W_OK)
    assert store.stat().st_size == Path(plan.firmware.vars or plan.firmware.code).stat().st_size
    assert inputs.secret_env == {"ssh_password": "admin"}  # the driver exports it as PKR_VAR_ssh_password
    assert "admin" not in {val for key, val in v.items() if key != "ssh_username"}
    assert plan.image.arch in (Arch.X86_64, Arch.AARCH64)


def test_changed_config_builds_with_the_rendered_kickstart_and_says_so(tmp_path: Path) -> None:
    local = tmp_path / "boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, iso=str(local), timezone="Europe/Berlin")
    notes: list[str] = []
    v = prepare(plan, tmp_path / "stage", report=notes.append).variables
    assert "timezone Europe/Berlin --utc" in Path(v["kickstart_dir"], "ks.cfg").read_text()
    assert len(notes) == 1 and "invoke render" in notes[0]


def test_no_login_possible_fails_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(almalinux.PASSWORD_ENV, raising=False)
    image = CFG.image("almalinux10-x86_64")
    other = "$6$saltsalt$" + "c" * 86
    users = tuple(dataclasses.replace(u, password_hash=other) for u in image.users)
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url())
    with pytest.raises(UsageError, match="cannot log in"):
        prepare(plan_for("almalinux10-x86_64", tmp_path, users=users), tmp_path / "stage")

