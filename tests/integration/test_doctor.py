import json

from tests.conftest import invoke, write_config


def test_doctor_json_explains_the_accelerator(tmp_path):
    res = invoke(["doctor", "--json"], write_config(tmp_path / "c.yaml", tmp_path / "out"))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    tools = {t["name"]: t for t in report["tools"]}
    assert tools["packer"]["found"] and tools["packer"]["required"] and tools["packer"]["version"]
    assert tools["limactl"]["required"] is False
    # this machine: /dev/kvm exists but no vmx/svm → TCG, and doctor says why
    assert report["accel"] == "tcg" and "vmx/svm" in report["accel_reason"]
    assert report["firmware"]["x86_64"] and report["firmware"]["aarch64"]
    assert report["free_disk"] > 0 and report["ok"] is True
