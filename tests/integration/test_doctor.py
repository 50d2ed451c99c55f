import json

from pipeline.base.errors import AccelUnavailable
from pipeline.model import Accel
from tests.support import accel_here, invoke, write_config


def test_doctor_json_explains_the_accelerator(tmp_path):
    res = invoke(["doctor", "--json"], write_config(tmp_path / "c.yaml", tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    tools = {t["name"]: t for t in report["tools"]}
    assert tools["packer"]["found"] and tools["packer"]["required"] and tools["packer"]["version"]
    assert tools["limactl"]["required"] is False
    # doctor reports what the decision gives for this host's probed facts (defaults.accel: auto),
    # with the reason (e.g. "no vmx/svm flag" where /dev/kvm exists but cannot run guests)
    choice = accel_here(Accel.AUTO)
    assert not isinstance(choice, AccelUnavailable), choice  # auto always settles (TCG at worst)
    assert report["accel"] == choice.accel.value and report["accel_reason"] == choice.reason
    assert report["firmware"]["x86_64"] and report["firmware"]["aarch64"]
    assert report["free_disk"] > 0 and report["ok"] is True


def test_doctor_says_where_packer_came_from_and_what_it_supports(tmp_path):
    """This host's packer is Debian 12's package (1.6.6): too old for required_plugins; a packer
    named by PACKER is reported as such."""
    import os
    import shutil
    import subprocess

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["doctor", "--json"], cfg)
    packer = json.loads(res.stdout)["packer"]
    packaged = subprocess.run(["dpkg-query", "-S", os.path.realpath(shutil.which("packer") or "")],
                              capture_output=True).returncode == 0
    if packaged:  # Debian 12: the distribution's package, 1.6.6
        assert packer["kind"] == "distribution" and packer["package"].startswith("packer 1.6.6"), packer
        assert "from the distribution's package (package packer 1.6.6" in invoke(["doctor"], cfg).stdout
    else:  # Debian 13 and later (the lanes): a binary placed on PATH
        assert packer["kind"] == "unpackaged", packer
    version = subprocess.run(["packer", "version"], capture_output=True, text=True).stdout
    assert ("predates required_plugins" in packer["plugins"]) is ("v1.6." in version), (packer, version)
    given = tmp_path / "opt" / "packer"
    given.parent.mkdir()
    shutil.copy2(os.path.realpath(shutil.which("packer") or "/usr/bin/packer"), given)
    res = invoke(["doctor", "--json"], cfg, env={"PACKER": str(given)})
    packer = json.loads(res.stdout)["packer"]
    assert packer["kind"] == "variable" and packer["path"] == str(given), packer
    res = invoke(["doctor"], cfg, env={"PACKER": str(tmp_path / "missing")})
    assert res.returncode == 127 and f"PACKER={tmp_path / 'missing'} is not an executable file" in res.stdout
