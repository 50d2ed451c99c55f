import json

from pipeline.config import Accel
from pipeline.errors import AccelUnavailable
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
