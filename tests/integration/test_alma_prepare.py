"""prepare(): the host-side inputs of an AlmaLinux build (ISO, kickstart, firmware, secrets)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pipeline import contract, iso, keys
from pipeline.base.errors import IsoUnavailable
from pipeline.config import load_file
from pipeline.distros import almalinux as alma_profile
from pipeline.distros.almalinux import PROFILE as ALMA
from pipeline.firmware import find_firmware, local_descriptors
from pipeline.model import Accel, Arch
from pipeline.output import artifacts
from pipeline.plan import AccelChoice, BuildPlan
from pipeline.render import almalinux
from tests.almalinux_support import closed_port_url, serve, trust_test_signer, write_release
from tests.support import ROOT, project_copy

CFG = load_file(ROOT / "invoke.yaml")


def plan_for(name: str, tmp: Path, root: Path = ROOT, **changes: object) -> BuildPlan:
    image = dataclasses.replace(CFG.image(name), **changes)
    fw = find_firmware(image.arch, os.environ, descriptors=local_descriptors())
    assert fw is not None, "UEFI firmware missing: sudo apt-get install ovmf qemu-efi-aarch64"
    out = tmp / "output" / image.name
    return BuildPlan(image=image, build_id="20261123T000000Z-test", root=root, accel=AccelChoice(Accel.TCG, "test"),
                     firmware=fw, image_dir=out, staging=out / ".staging" / "b", log_dir=out / "logs" / "b",
                     template=alma_profile.PROFILE.template(root, image), ssh_key=keys.project_key(tmp / "output"),
                     host_os="linux", host_machine="x86_64",
                     cpu_model=alma_profile.PROFILE.cpu_model(image, Accel.TCG),
                     artifact_name=alma_profile.PROFILE.artifact_name(image))


def prepare(plan: BuildPlan, stage: Path, report=lambda _line: None):  # type: ignore[no-untyped-def]
    return alma_profile.PROFILE.prepare(plan, stage, report)


def test_no_network_and_no_iso_is_one_line_naming_url_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url() + "/almalinux")
    monkeypatch.setenv(iso.VAULT_ENV, closed_port_url())
    with pytest.raises(IsoUnavailable) as err:
        prepare(plan_for("almalinux10-x86_64", tmp_path), tmp_path / "stage")
    text = err.value.render()
    assert "\n" not in text and "http://127.0.0.1:" in text and "iso:" in text


@pytest.mark.parametrize("name", ["almalinux10-x86_64", "almalinux10-aarch64"])
def test_local_iso_gives_every_variable_and_keeps_the_password_out_of_argv(name: str, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(almalinux.PASSWORD_ENV, raising=False)
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url() + "/almalinux")  # offline: the repo cannot be checked
    local = tmp_path / "boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for(name, tmp_path, iso=str(local))
    notes: list[str] = []
    inputs = prepare(plan, tmp_path / "stage", report=notes.append)
    v = inputs.variables
    assert not [n for n in notes if "invoke render" in n], "the committed kickstart is what the config renders"
    assert any("point release is unknown" in n for n in notes), notes  # a file name that names no release
    staged = Path(v["kickstart_dir"], "ks.cfg").read_text()
    committed = ALMA.kickstart_path(ROOT, plan.image).read_text()
    # the staged kickstart differs from the committed one only by the build key and the repo
    build_key = keys.public_key(plan.ssh_key)
    assert build_key not in committed and f"sshkey --username=admin '{build_key}'" in staged
    assert [line for line in staged.splitlines() if not line.startswith(("sshkey ", "url ", "repo "))] == \
        [line for line in committed.splitlines() if not line.startswith(("sshkey ", "url ", "repo "))]
    assert v["iso_url"] == str(local) and v["iso_checksum"] == "sha256:" + artifacts.sha256_file(local)
    assert Path(v["efi_firmware_code"]) == Path(plan.firmware.code)
    store = Path(v["efi_firmware_vars"])
    assert store.parent == tmp_path / "stage" / "inputs" and os.access(store, os.W_OK)
    assert store.stat().st_size == Path(plan.firmware.vars or plan.firmware.code).stat().st_size
    assert inputs.secret_env == {"ssh_password": "admin"}  # the driver exports it as PKR_VAR_ssh_password
    assert "admin" not in {val for key, val in v.items() if key != "ssh_username"}
    assert plan.image.arch in (Arch.X86_64, Arch.AARCH64)


def test_staged_kickstart_keeps_the_guest_contract_and_the_committed_one_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url() + "/almalinux")
    local = tmp_path / "AlmaLinux-10.1-x86_64-boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, iso=str(local))
    staged = Path(prepare(plan, tmp_path / "stage").variables["kickstart_dir"], "ks.cfg").read_text()
    key = keys.public_key(plan.ssh_key)
    assert contract.check_rendered(plan.image, key, alma_profile.guest_view(staged)) == []
    committed = ALMA.kickstart_path(ROOT, plan.image).read_text()
    assert contract.check_rendered(plan.image, key, alma_profile.guest_view(committed)) == [
        "key-login: the build key is not among admin's authorized keys"]


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A loopback mirror: repo/10 and repo/10.1 (ISO + BaseOS repodata), vault/10.0 (repodata only);
    its CHECKSUM files are signed by the test signer, which this test trusts."""
    trust_test_signer(monkeypatch)
    root = tmp_path / "site"
    for arch in ("x86_64", "x86_64_v2"):
        write_release(root / "almalinux", "10.1", arch, b"iso 10.1\n" * 20)
        write_release(root / "almalinux", "10", arch, b"iso 10.1\n" * 20)
        (root / f"almalinux/10/isos/{arch}/CHECKSUM").write_text((root / f"almalinux/10.1/isos/{arch}/CHECKSUM").read_text())
        for base in (root / "almalinux/10.1", root / "vault/10.0"):
            repodata = base / "BaseOS" / arch / "os" / "repodata"
            repodata.mkdir(parents=True)
            (repodata / "repomd.xml").write_text("<repomd/>\n")
    with serve(root) as (url, hits):
        yield url, hits


def staged_url(plan: BuildPlan, stage: Path) -> str:
    text = Path(prepare(plan, stage).variables["kickstart_dir"], "ks.cfg").read_text()
    return next(line for line in text.splitlines() if line.startswith("url ")).split("=", 1)[1]


def test_iso_and_mirror_build_without_almalinux_org(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, hits = site
    port = url.rsplit(":", 1)[1]
    monkeypatch.setenv(iso.MIRROR_ENV, f"{url}/almalinux")
    monkeypatch.setenv(iso.VAULT_ENV, f"{url}/vault")
    local = tmp_path / "AlmaLinux-10.1-x86_64-boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, iso=str(local))
    # the guest reaches the host's loopback mirror through QEMU's user network (10.0.2.2)
    assert staged_url(plan, tmp_path / "s1") == f"http://10.0.2.2:{port}/almalinux/10.1/BaseOS/x86_64/os/"
    assert "/almalinux/10.1/BaseOS/x86_64/os/repodata/repomd.xml" in hits
    # 10.0 left the mirror: its packages come from the vault
    old = tmp_path / "AlmaLinux-10.0-x86_64-boot.iso"
    old.write_bytes(b"an older installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, iso=str(old))
    assert staged_url(plan, tmp_path / "s2") == f"http://10.0.2.2:{port}/vault/10.0/BaseOS/x86_64/os/"


def test_resolved_release_and_variant_follow_the_mirror(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, hits = site
    port = url.rsplit(":", 1)[1]
    monkeypatch.setenv(iso.MIRROR_ENV, f"{url}/almalinux")
    monkeypatch.setenv(iso.VAULT_ENV, f"{url}/vault")
    plan = plan_for("almalinux10-x86_64", tmp_path, variant="x86_64_v2")
    assert staged_url(plan, tmp_path / "s") == f"http://10.0.2.2:{port}/almalinux/10.1/BaseOS/x86_64_v2/os/"
    assert "/almalinux/10/isos/x86_64_v2/CHECKSUM" in hits  # the v2 media, not the v3 ones
    assert "/almalinux/10.1/isos/x86_64_v2/AlmaLinux-10.1-x86_64_v2-boot.iso" in hits


def test_committed_kickstart_follows_the_pin_and_never_a_mirror(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = site
    root = tmp_path / "proj"
    project_copy(root, ("packer", "kickstart"))
    image = CFG.image("almalinux10-x86_64")
    assert iso.committed_repo_base(image, root) == "https://repo.almalinux.org/almalinux/10"
    monkeypatch.setenv(iso.MIRROR_ENV, f"{url}/almalinux")
    monkeypatch.setenv(iso.VAULT_ENV, f"{url}/vault")
    said = alma_profile.PROFILE.pin.refresh(root, image)
    assert said.endswith("follows it")
    committed = (root / "kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg").read_text()
    assert "url --url=https://repo.almalinux.org/almalinux/10.1/BaseOS/x86_64/os/" in committed
    assert url not in committed and "10.0.2.2" not in committed
    entry = iso.read_lock(root)[image.name]
    vaulted = {image.name: dataclasses.replace(entry, version="10.0", source="vault")}
    iso.write_lock(root, vaulted)
    assert iso.committed_repo_base(image, root) == "https://vault.almalinux.org/10.0"


def test_changed_config_builds_with_the_rendered_kickstart_and_says_so(tmp_path: Path) -> None:
    local = tmp_path / "boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, iso=str(local), timezone="Europe/Berlin")
    notes: list[str] = []
    v = prepare(plan, tmp_path / "stage", report=notes.append).variables
    assert "timezone Europe/Berlin --utc" in Path(v["kickstart_dir"], "ks.cfg").read_text()
    assert len([n for n in notes if "invoke render" in n]) == 1


def test_no_password_is_needed_since_the_build_key_logs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(almalinux.PASSWORD_ENV, raising=False)
    monkeypatch.setenv(iso.MIRROR_ENV, closed_port_url())
    image = CFG.image("almalinux10-x86_64")
    other = "$6$saltsalt$" + "c" * 86
    users = tuple(dataclasses.replace(u, password_hash=other) for u in image.users)
    local = tmp_path / "boot.iso"
    local.write_bytes(b"an installer\n")
    plan = plan_for("almalinux10-x86_64", tmp_path, users=users, iso=str(local))
    assert prepare(plan, tmp_path / "stage").secret_env == {"ssh_password": ""}
