"""defaults.accel from invoke.yaml is the accelerator of every local task when --accel is not
given; --accel overrides it. Through the real CLI; what this host can do is probed, not assumed."""

import pytest

from pipeline.base.errors import AccelUnavailable
from pipeline.host import probe
from pipeline.model import Accel, Arch
from pipeline.plan import choose_accel
from tests.support import invoke, write_config

DEMO = "demo-x86_64"


def kvm_verdict() -> str | None:
    """None when this host can build the demo image with KVM, else the reason it cannot."""
    try:
        choose_accel(Accel.KVM, probe(tools=()), Arch.X86_64, purpose="build")
    except AccelUnavailable as exc:
        return exc.message
    return None


@pytest.fixture
def kvm_config(tmp_path):
    return write_config(tmp_path / "kvm.yaml", tmp_path / "out", {"defaults": {"accel": "kvm"}})


def test_build_dry_run_uses_defaults_accel(kvm_config):
    res = invoke(["build", DEMO, "--dry-run"], kvm_config, timeout=120)
    why_not = kvm_verdict()
    if why_not is None:  # a host with usable KVM: the plan uses it
        assert res.returncode == 0, res.stderr
        assert "accelerator  kvm (requested" in res.stdout
    else:  # KVM was asked for by invoke.yaml and cannot be had: the accelerator error, exit 3
        assert res.returncode == 3, res.stderr
        assert why_not in res.stderr and "--accel tcg" in res.stderr
        assert "a real build could not start" in res.stdout and "\n  command" not in res.stdout


def test_accel_option_overrides_defaults_accel(kvm_config):
    res = invoke(["build", DEMO, "--dry-run", "--accel", "tcg"], kvm_config, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "accelerator  tcg (requested with --accel tcg)" in res.stdout


def test_defaults_accel_typo_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", tmp_path / "out", {"defaults": {"accel": "kvn"}})
    res = invoke(["build", DEMO, "--dry-run", "--accel", "tcg"], cfg, timeout=60)
    assert res.returncode == 2 and "defaults.accel: expected one of auto, kvm, hvf, tcg" in res.stderr
