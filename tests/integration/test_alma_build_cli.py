"""`invoke build-alma-x86/-arm` on this offline machine: as far as it goes, with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.iso import MIRROR_ENV, VAULT_ENV
from tests.almalinux_support import closed_port_url
from tests.support import invoke, write_config


@pytest.mark.parametrize("task,extra", [("build-alma-x86", []), ("build-alma-arm", ["--accel", "tcg"])])
def test_offline_build_stops_with_one_line_naming_url_and_iso_override(task: str, extra: list[str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "t.yaml", tmp_path / "out")
    dead = closed_port_url()
    res = invoke([task, *extra], cfg, timeout=300, env={MIRROR_ENV: f"{dead}/almalinux", VAULT_ENV: dead})
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{dead}/almalinux/10/isos/" in errors[0] and "`iso:" in errors[0], res.stderr
    assert not list((tmp_path / "out").rglob("*.qcow2")), "nothing is published"


def test_dry_run_names_the_prepared_inputs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "t.yaml", tmp_path / "out")
    res = invoke(["build-alma-x86", "--dry-run"], cfg, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("iso_url", "iso_checksum", "kickstart_dir", "efi_firmware_code", "efi_firmware_vars"):
        assert f"{name}=<prepared at build time" in res.stdout  # no ISO pinned: resolved when it starts
    assert "NOT PINNED" in res.stdout and "invoke update-iso almalinux10-x86_64" in res.stdout
    assert "ssh_password" not in res.stdout + res.stderr
