"""The boot-test gate in a real build: a build whose boot test fails is not published."""

import dataclasses
import os
import shutil
import subprocess

import pytest
import yaml

from pipeline import artifacts
from pipeline.build import BuildOptions, build_image
from pipeline.config import load
from pipeline.errors import VerifyFailed
from pipeline.vm import boottest
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_failing_boot_test_leaves_the_last_good_image_published(demo_build, tmp_path, monkeypatch):
    _, out_src = demo_build
    out = tmp_path / "output"
    shutil.copytree(out_src, out, symlinks=True)
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    raw["defaults"]["output_dir"] = str(out)
    cfg = load(raw, ROOT)
    image_dir = out / "demo-x86_64"
    before = os.readlink(image_dir / "current")

    # The build bakes in the key it logs in with, so the boot test is pointed at another key:
    # a real SSH refusal from the real guest, not a stand-in failure.
    stranger = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    wrong = dataclasses.replace(cfg, defaults=dataclasses.replace(cfg.defaults, ssh_key=str(stranger)))
    real_boot_test = boottest.boot_test
    monkeypatch.setattr(boottest, "boot_test",
                        lambda _cfg, *args, **kw: real_boot_test(wrong, *args, **{**kw, "deadline": 25}))

    with pytest.raises(VerifyFailed) as exc:
        build_image(cfg, cfg.image("demo-x86_64"), BuildOptions(boot_test=True), say=lambda line: None)
    assert "console" in exc.value.render().lower()
    assert os.readlink(image_dir / "current") == before
    assert artifacts.verify_published(image_dir)
    assert not list(image_dir.glob(".staging/*"))
