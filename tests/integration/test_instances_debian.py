"""Two instances of the Debian 13 image at once, for real (the session's one Debian build, made by
conftest's debian_build): each with its own hostname and the user's own key from its NoCloud
seed (read by the image's cloud-init), a user-data file on one of them, and a shared folder that
works both ways, through this host's own virtiofsd (Debian 12's, the C one) for one and Debian
13's (the Rust one, from a Debian 13 root) for the other. The published build's sha256 still
verifies afterwards. Both guests run isolated (restrict=on): they reach nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.output import artifacts
from tests.support import invoke, keygen, published_copy, require_tool, wait_until, write_config
from tests.support.virtiofsd import from_debian13

IMAGE = "debian13-x86_64"
FIRST_BOOT = 1200  # two full Debian first boots at once under TCG, cloud-init included


def login(cfg: Path, name: str, command: str) -> str:
    """`invoke ssh NAME -- COMMAND`, once the seed's key is in place (cloud-init writes it during
    the first boot, so the first tries may be refused)."""
    def attempt() -> str | None:
        res = invoke(["ssh", name, "--", command], cfg, timeout=FIRST_BOOT)
        return res.stdout if res.returncode == 0 else None

    return wait_until(attempt, FIRST_BOOT, f"a login to {name} with the user's own key", interval=5)


@pytest.mark.slow
def test_two_debian_instances_at_once(debian_build, tmp_path):
    require_tool("xorriso", "xorriso")
    user_key = keygen(tmp_path / "me_ed25519", "me@laptop")  # not the key the image was built with
    rust_virtiofsd = from_debian13(tmp_path / "virtiofsd")
    cfg_a, out = published_copy(debian_build, tmp_path, extra={"defaults": {"ssh_key": str(user_key)}})
    cfg_b = write_config(tmp_path / "b.yaml", out, {"defaults": {"ssh_key": str(user_key),
                                                                 "virtiofsd": str(rust_virtiofsd)}})
    sha = artifacts.verify_published(out / IMAGE)
    shares = {}
    for name in ("deb-a", "deb-b"):
        shares[name] = tmp_path / f"share-{name}"
        shares[name].mkdir()
        (shares[name] / "hello.txt").write_text(f"from the host to {name}\n")
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nwrite_files:\n  - path: /etc/imagepipe-test\n    content: from user-data\n")
    try:
        res = invoke(["run", IMAGE, "--name", "deb-a", "--network", "isolated", "--share", f"{shares['deb-a']}:work",
                      "--user-data", str(user_data)], cfg_a, timeout=300)
        assert res.returncode == 0, res.stderr
        assert f"{shares['deb-a']} at /mnt/work (virtiofs, /usr/lib/qemu/virtiofsd)" in res.stderr, res.stderr
        res = invoke(["run", IMAGE, "--name", "deb-b", "--network", "isolated", "--share", f"{shares['deb-b']}:work"],
                     cfg_b, timeout=300)
        assert res.returncode == 0, res.stderr
        assert f"(virtiofs, {rust_virtiofsd})" in res.stderr, res.stderr
        running = json.loads(invoke(["instances", "--json"], cfg_a, check=True).stdout)["instances"]
        assert [i["state"] for i in running] == ["running", "running"]
        assert running[0]["ssh_port"] != running[1]["ssh_port"]

        for name, cfg in (("deb-a", cfg_a), ("deb-b", cfg_b)):
            said = login(cfg, name, "cloud-init status --wait >/dev/null; hostname; id -un; cat /mnt/work/hello.txt; "
                                    f"echo from {name} | sudo tee /mnt/work/back.txt >/dev/null; "
                                    "cat /etc/imagepipe-test 2>/dev/null || echo no user-data").splitlines()
            assert said[:3] == [name, "admin", f"from the host to {name}"], said
            assert said[3] == ("from user-data" if name == "deb-a" else "no user-data"), said
            assert (shares[name] / "back.txt").read_text() == f"from {name}\n"
    finally:
        for name, cfg in (("deb-a", cfg_a), ("deb-b", cfg_b)):
            invoke(["stop", name], cfg, timeout=300)
    assert artifacts.verify_published(out / IMAGE) == sha  # neither guest wrote into the build
    for name in ("deb-a", "deb-b"):
        assert invoke(["rm", name], cfg_a, timeout=120).returncode == 0
