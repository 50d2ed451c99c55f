"""Lima tasks. limactl cannot run here (no macOS, no Lima package): a FAKE `limactl` script that
only records its argv stands in for it, first on PATH. The cloud image digest comes from a real
HTTP server on loopback serving an AlmaLinux-style CHECKSUM file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.iso import MIRROR_ENV
from pipeline.render.lima import vm_type
from tests.almalinux_support import serve
from tests.support import invoke, project_copy

FAKE_LIMACTL = """#!/bin/sh
# FAKE limactl for tests: records its arguments, does nothing else.
python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$FAKE_LIMACTL_LOG"
echo "fake limactl: $*"
"""
CLOUD = "AlmaLinux-10-GenericCloud-latest.{arch}.qcow2"


@pytest.fixture()
def lima_env(tmp_path: Path):  # type: ignore[no-untyped-def]
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    fake = bindir / "limactl"
    fake.write_text(FAKE_LIMACTL)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    site = tmp_path / "site"
    digests = {}
    for arch in ("x86_64", "aarch64"):
        folder = site / "almalinux" / "10" / "cloud" / arch / "images"
        folder.mkdir(parents=True)
        name = CLOUD.format(arch=arch)
        digests[arch] = hashlib.sha256(arch.encode()).hexdigest()
        (folder / "CHECKSUM").write_text(f"# {name}: 1 bytes\nSHA256 ({name}) = {digests[arch]}\n")
    (tmp_path / "proj").mkdir()
    proj = project_copy(tmp_path / "proj")
    log = tmp_path / "limactl.log"
    with serve(site) as (base, _):
        env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_LIMACTL_LOG": str(log),
               MIRROR_ENV: f"{base}/almalinux"}
        yield proj, env, log, digests, base


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_lima_start_renders_a_pinned_config_and_starts_it(lima_env) -> None:  # type: ignore[no-untyped-def]
    proj, env, log, digests, base = lima_env
    res = invoke(["lima-start", "-i", "almalinux10-aarch64"], cwd=proj, env=env)
    assert res.returncode == 0, res.stderr
    [argv] = calls(log)
    assert argv[:3] == ["start", "--name=almalinux10-aarch64", "--tty=false"]
    conf = yaml.safe_load(Path(argv[3]).read_text())
    assert conf["vmType"] == "qemu"  # Linux host; vz is for macOS >= 13
    assert conf["images"] == [{"location": f"{base}/almalinux/10/cloud/aarch64/images/{CLOUD.format(arch='aarch64')}",
                               "arch": "aarch64", "digest": f"sha256:{digests['aarch64']}"}]
    assert (conf["cpus"], conf["memory"], conf["disk"]) == (2, "4096MiB", "20480MiB")
    assert conf["ssh"] == {"localPort": 0}


def test_lima_shell_runs_limactl_shell(lima_env) -> None:  # type: ignore[no-untyped-def]
    proj, env, log, _, _ = lima_env
    res = invoke(["lima-shell", "-i", "almalinux10-x86_64"], cwd=proj, env=env)
    assert res.returncode == 0, res.stderr
    assert calls(log) == [["shell", "almalinux10-x86-64"]]  # instance names: lowercase, digits, dashes


def test_missing_limactl_is_a_clear_error(lima_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proj, env, log, _, _ = lima_env
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**env, "PATH": os.pathsep.join([str(empty), str(Path(sys.executable).parent), "/usr/bin", "/bin"])}
    assert shutil.which("limactl", path=env["PATH"]) is None
    res = invoke(["lima-start", "-i", "almalinux10-aarch64"], cwd=proj, env=env)
    assert res.returncode == 127, res.stderr
    assert "limactl not found" in res.stderr and "lima-vm.io/docs/installation" in res.stderr
    assert "brew" not in res.stderr  # the hint fits this Linux host (apt), not macOS
    assert not log.exists()


def test_non_almalinux_image_is_refused(lima_env) -> None:  # type: ignore[no-untyped-def]
    proj, env, log, _, _ = lima_env
    res = invoke(["lima-start", "-i", "nixos-x86_64"], cwd=proj, env=env)
    assert res.returncode != 0 and "Lima runs the AlmaLinux cloud image" in res.stderr
    assert not log.exists()


def test_vm_type_choice() -> None:
    assert vm_type("darwin", "13.0") == "vz" and vm_type("darwin", "14.5") == "vz"
    assert vm_type("darwin", "12.7") == "qemu" and vm_type("linux") == "qemu"


def test_lima_start_offline_is_one_line(lima_env) -> None:  # type: ignore[no-untyped-def]
    from tests.almalinux_support import closed_port_url

    proj, env, log, _, _ = lima_env
    dead = closed_port_url()
    res = invoke(["lima-start", "-i", "almalinux10-aarch64"], cwd=proj, env={**env, MIRROR_ENV: dead})
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1 and dead in errors[0] and "Lima" in errors[0], res.stderr
    assert not log.exists()
