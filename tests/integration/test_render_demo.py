"""The demo template: committed == rendered, and the installed Packer accepts it."""

from pathlib import Path

import hcl2

from pipeline import distros
from pipeline.base.run import run
from pipeline.committed import render_text
from pipeline.config import load_file
from pipeline.host import probe
from pipeline.render.hcl import dumps
from pipeline.render.packer import supports_plugins
from tests.support import ROOT, keygen, require_tool

CFG = load_file(ROOT / "invoke.yaml")
DEMO = CFG.image("demo-x86_64")
PROFILE = distros.profile(DEMO)
DUMMY = {"accelerator": "tcg", "cpu_model": "max", "output_dir": "/nonexistent/out", "console_log": "/tmp/c.log",
         "ssh_private_key_file": "/tmp/key", "base_disk": "/tmp/base.qcow2", "kernel": "/tmp/vmlinuz",
         "initrd": "/tmp/initrd.img"}


def test_committed_template_matches_the_config():
    committed = PROFILE.template(ROOT, DEMO)
    assert committed.read_text() == render_text(DEMO), f"{committed} drifted: run `invoke render`"


def test_modern_rendering_declares_the_qemu_plugin_and_legacy_does_not():
    modern = hcl2.loads(render_text(DEMO))
    legacy = hcl2.loads(dumps(PROFILE.blocks(DEMO, True)))
    assert "packer" in modern and "packer" not in legacy
    src = legacy["source"][0]['"qemu"']['"demo-x86_64"']
    assert src["accelerator"] == "${var.accelerator}"
    assert ['"-netdev"', '"user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"'] in src["qemuargs"]


def test_installed_packer_validates_and_formats(tmp_path: Path):
    require_tool("packer", "packer")
    ver = probe(tools=["packer"]).version("packer")
    assert ver is not None
    text = dumps(PROFILE.blocks(DEMO, not supports_plugins(ver[:2])))
    tpl = tmp_path / "demo.pkr.hcl"
    tpl.write_text(text)
    key = tmp_path / "key"  # packer validate parses the key: a real throwaway one
    keygen(key)
    values = {**DUMMY, "ssh_private_key_file": str(key)}
    argv = ["packer", "validate"] + [a for k, v in sorted(values.items()) for a in ("-var", f"{k}={v}")] + [str(tpl)]
    res = run(argv, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert run(["packer", "fmt", "-check", str(PROFILE.template(ROOT, DEMO))], check=False).returncode == 0


def test_validate_without_the_accelerator_fails(tmp_path: Path):
    """The accelerator is required on purpose: Packer alone would pick a hanging KVM."""
    require_tool("packer", "packer")
    tpl = tmp_path / "demo.pkr.hcl"
    tpl.write_text(dumps(PROFILE.blocks(DEMO, True)))
    vars_ = {k: v for k, v in DUMMY.items() if k != "accelerator"}
    argv = ["packer", "validate"] + [a for k, v in sorted(vars_.items()) for a in ("-var", f"{k}={v}")] + [str(tpl)]
    res = run(argv, check=False)
    assert res.returncode != 0 and "accelerator" in res.stdout + res.stderr
