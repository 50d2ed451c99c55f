"""`invoke build IMAGE --dry-run`: the summary people read before a build, on stdout (or one JSON
object); it writes nothing and exits != 0 when a real build could not start."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from pipeline import summary
from pipeline.base.errors import AccelUnavailable
from pipeline.config import load_file
from pipeline.host import HostFacts, KvmFacts, ToolInfo
from pipeline.iso import MIRROR_ENV, VAULT_ENV, LockEntry, write_lock
from pipeline.model import Accel
from tests.almalinux_support import closed_port_url
from tests.integration.test_bad_input import path_without
from tests.support import ROOT, accel_here, invoke, project_copy, write_config

SHA = "ab" * 32


def command_of(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return shlex.split(lines[lines.index("  command") + 1])


def test_demo_summary_on_stdout_writes_nothing(tmp_path):
    out = tmp_path / "out"
    res = invoke(["build-demo", "--dry-run"], write_config(tmp_path / "c.yaml", out), timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith("demo-x86_64: dry run - nothing was built, written or downloaded")
    for section in ("  image", "  host", "  inputs", "  tools", "  build", "  command"):
        assert f"\n{section}\n" in text, section
    # which accelerator and why: what the decision gives for this host's probed facts
    choice = accel_here(Accel.AUTO, purpose="build")
    assert not isinstance(choice, AccelUnavailable), choice
    assert f"accelerator  {choice.accel.value}" in text and choice.reason in text
    assert "firmware  bios (no UEFI firmware needed)" in text and "cpu model  max" in text
    assert "steps  prepare inputs -> packer build -> verify -> package list and SBOM -> publish" in text
    if choice.accel is Accel.TCG:  # the loud note, only where the build would run under TCG
        assert "!! TCG: no hardware acceleration" in text and "10-20x slower" in text
    else:
        assert "!! TCG" not in text
    assert command_of(text)[:3] == ["packer", "build", "-machine-readable"]
    assert "ready: invoke build demo-x86_64" in text and res.stderr == ""
    assert not out.exists(), "a dry run writes nothing: no key, no cache, no lock, no history"


def test_json_is_one_object_with_the_same_facts(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build", "demo-x86_64", "-n", "--json", "--boot-test"], cfg, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # exactly one JSON document
    assert doc["image"] == "demo-x86_64" and doc["ok"] is True and doc["exit_code"] == 0
    choice = accel_here(Accel.AUTO, purpose="build")
    assert not isinstance(choice, AccelUnavailable), choice
    assert doc["accelerator"]["name"] == choice.accel.value and doc["accelerator"]["fallback"] is choice.fallback
    assert doc["steps"] == ["prepare inputs", "packer build", "verify", "boot test", "package list and SBOM", "publish"]
    assert {t["name"] for t in doc["tools"] if t["found"]} >= {"packer", "qemu-img", "qemu-system-x86_64"}
    assert doc["command"][:2] == ["packer", "build"] and doc["problems"] == []
    assert bool(doc["warnings"]) or not choice.fallback  # a fallback to TCG is warned about
    assert doc["outputs"]["build_log"].endswith("/logs/<build-id>/build.log")


def test_pinned_iso_is_resolved_without_downloading(tmp_path):
    """The command shows the pinned URL and sha256 in place of placeholders; the mirrors point at
    a closed port, so any network use would fail the run."""
    root = project_copy(tmp_path)
    url = "https://repo.almalinux.org/almalinux/10.1/isos/x86_64/AlmaLinux-10.1-x86_64-boot.iso"
    write_lock(root, {"almalinux10-x86_64": LockEntry("10", "10.1", "x86_64", "AlmaLinux-10.1-x86_64-boot.iso",
                                                      url, SHA, "repo")})
    dead = closed_port_url()
    res = invoke(["build-alma-x86", "--dry-run"], cwd=root, env={MIRROR_ENV: dead, VAULT_ENV: dead}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "AlmaLinux-10.1-x86_64-boot.iso (AlmaLinux 10.1, pinned in iso.lock.json)" in res.stdout
    assert f"url: {url}" in res.stdout and f"sha256: {SHA}" in res.stdout
    assert "cached: no: downloaded (and verified) when the build starts" in res.stdout
    argv = command_of(res.stdout)
    assert f"iso_url={url}" in argv and f"iso_checksum=sha256:{SHA}" in argv
    assert f"kickstart  {root}/kickstart/almalinux10/x86_64/almalinux10-x86_64/ks.cfg" in res.stdout
    assert not (root / "output").exists()


def test_missing_tool_is_listed_and_exits_127(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build-demo", "--dry-run"], cfg, env={"PATH": path_without(tmp_path, "packer")}, timeout=120)
    assert res.returncode == 127, res.stderr
    assert "packer  MISSING (building demo-x86_64)" in res.stdout
    assert "a real build could not start:" in res.stdout and "apt-get install packer" in res.stdout
    assert res.stderr.startswith("error: packer not found on PATH")


def test_foreign_arch_exits_3_with_the_routes(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build-alma-arm", "--dry-run"], cfg, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "accelerator  none: cannot build aarch64 natively here" in res.stdout
    assert "--accel tcg" in res.stdout and "remote-sync-build" in res.stdout
    res = invoke(["build-alma-arm", "--dry-run", "--accel", "tcg"], cfg, timeout=120)
    assert res.returncode == 0 and "An AlmaLinux installation takes hours this way" in res.stdout


# ---------------------------------------------------------------------------- pure summaries

CFG = load_file(ROOT / "invoke.yaml")
TOOLS = {t: ToolInfo(t, True, "9.9") for t in ("packer", "qemu-img", "qemu-system-x86_64", "nix")}
NO_FIRMWARE = HostFacts("linux", "x86_64", KvmFacts(True, True, True), False, tools=TOOLS)


def test_no_firmware_is_a_problem_with_exit_3():
    s = summary.summarize(CFG, CFG.image("almalinux10-x86_64"), NO_FIRMWARE)
    assert s.exit_code == 3 and "no UEFI firmware for x86_64" in s.problems[0].message
    assert s.accelerator["name"] == "kvm" and s.command is None  # no plan without firmware
    assert "apt-get install ovmf" in summary.format_text(s)


def test_a_cpu_below_the_guests_level_is_a_problem_and_the_v2_variant_fits():
    """A v2 host under KVM cannot build AlmaLinux 10 (v3): the dry run says so as a real build
    would (exit 3, no command); the x86_64_v2 variant runs on the Nehalem model and fits."""
    nehalem = "fpu cx8 cmov mmx fxsr sse sse2 syscall lm pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm"
    facts = dataclasses.replace(NO_FIRMWARE, firmware=load_facts_firmware(), cpu_flags=frozenset(nehalem.split(" ")))
    alma = CFG.image("almalinux10-x86_64")
    s = summary.summarize(CFG, alma, facts)
    assert s.exit_code == 3 and s.command is None
    assert "needs an x86-64-v3 CPU, but this host's CPU is x86-64-v2" in s.problems[0].message
    v2 = summary.summarize(CFG, dataclasses.replace(alma, variant="x86_64_v2"), facts)
    assert v2.ok and v2.cpu_model == "Nehalem" and "cpu_model=Nehalem" in v2.command


def test_a_configured_iso_that_is_missing_is_a_usage_problem(tmp_path):
    image = dataclasses.replace(CFG.image("almalinux10-x86_64"), iso=str(tmp_path / "gone.iso"))
    facts = dataclasses.replace(NO_FIRMWARE, firmware=load_facts_firmware())
    s = summary.summarize(CFG, image, facts)
    assert s.exit_code == 2 and f"{tmp_path / 'gone.iso'} does not exist" in s.problems[0].message
    assert "configured file" in s.as_json()["iso"]["summary"]


def load_facts_firmware():  # the firmware this machine really has (ovmf is installed by setup.sh)
    from pipeline.host import probe

    return probe(tools=[]).firmware


def test_the_profile_hook_feeds_the_text(tmp_path):
    s = summary.summarize(CFG, CFG.image("nixos-x86_64"), NO_FIRMWARE)
    text = summary.format_text(s)
    assert "flake output" in text and "#packages.x86_64-linux.nixos-x86_64-image" in text
    assert s.ok and s.exit_code == 0 and s.steps == ["nix build", "verify", "package list and SBOM", "publish"]
    assert Path(s.template).name == "flake.nix"


def test_debian_dry_run_names_the_mirror_and_builds_a_foreign_arch_without_tcg(tmp_path):
    """The mirror the host's apt sources name, in the mmdebstrap command itself; aarch64 on this
    x86_64 host is ready under auto (no build VM: only its boot test is emulated); a mirror that
    does not answer is the problem a real build would stop at. Nothing is written."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build", "debian13-aarch64", "--dry-run", "--json"], cfg, timeout=120)
    data = json.loads(res.stdout)
    if data["ok"]:  # root (CI): ready; anyone else: the one problem is that the build needs root
        assert res.returncode == 0 and data["suite"].startswith("trixie (Debian 13, arm64)")
        command = shlex.split(data["command"]) if isinstance(data["command"], str) else data["command"]
        assert f"deb {data['mirror'].split(' (')[0]} trixie main" in command
    else:
        assert [p["message"] for p in data["problems"]] == ["building debian13-aarch64 needs root: mmdebstrap "
                                                             "--mode=root installs the packages as root, and GRUB's "
                                                             "tools run inside the new root (chroot)"]
    away = write_config(tmp_path / "d.yaml", tmp_path / "out",
                        {"images": {"debian13-x86_64": {"mirror": closed_port_url() + "/debian"}}})
    res = invoke(["build", "debian13-x86_64", "--dry-run"], away, timeout=120)
    assert res.returncode == 1 and "does not answer" in res.stdout + res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "out").exists()
