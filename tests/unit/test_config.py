
import pytest
import yaml

from pipeline.base.errors import ConfigError, UsageError
from pipeline.config import load, load_file
from pipeline.model import Accel, Arch, Firmware
from tests.support import ROOT


def good() -> dict:
    return yaml.safe_load((ROOT / "invoke.yaml").read_text())


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(raw, ROOT)
    return exc.value.problems


def test_shipped_catalogue_loads_with_the_original_images():
    cfg = load_file(ROOT / "invoke.yaml")
    assert {"almalinux10-x86_64", "almalinux10-aarch64", "nixos-x86_64", "nixos-aarch64", "demo-x86_64"} <= set(cfg.images)
    alma = cfg.image("almalinux10-x86_64")
    assert alma.distro == "almalinux" and alma.arch is Arch.X86_64 and alma.ssh_port == 2222
    assert cfg.image("nixos-x86_64").ssh_port == 2223
    assert cfg.image("demo-x86_64").firmware is Firmware.BIOS
    assert cfg.defaults.accel is Accel.AUTO
    assert all(u.password_hash is None or u.password_hash.startswith("$6$") for i in cfg.images.values() for u in i.users)


def test_memory_as_string_names_the_key_path():
    raw = good()
    raw["images"]["almalinux10-x86_64"]["memory"] = "4G"
    assert problems(raw) == ['images.almalinux10-x86_64.memory: expected MiB as an integer, got \'4G\'']


def test_every_error_is_reported_at_once():
    raw = good()
    raw["images"]["almalinux10-x86_64"]["memory"] = "4G"
    raw["images"]["almalinux10-x86_64"]["cpu"] = 2
    raw["images"]["nixos-x86_64"]["arch"] = "arm64x"
    raw["defaults"]["accel"] = "kvn"
    raw["imagez"] = {}
    found = problems(raw)
    assert len(found) == 5
    text = "\n".join(found)
    assert "images.almalinux10-x86_64.cpu: unknown key (did you mean 'cpus'?)" in text
    assert "images.nixos-x86_64.arch: expected one of x86_64, aarch64" in text
    assert "defaults.accel: expected one of auto, kvm, hvf, tcg, got 'kvn' (did you mean 'kvm'?)" in text
    assert "imagez: unknown top-level key (did you mean 'images'?)" in text


def test_plaintext_password_is_refused_with_the_way_out():
    raw = good()
    raw["images"]["demo-x86_64"]["users"] = [{"name": "root", "password": "packer"}]
    (p,) = problems(raw)
    assert "users[0].password: unknown key" in p and "password_hash" in p


@pytest.mark.parametrize("name", ["../etc", "a/b", "has space", "x;rm -rf", "-dash"])
def test_hostile_image_names(name):
    raw = good()
    raw["images"][name] = raw["images"].pop("demo-x86_64")
    assert any(p.startswith(f"images.{name}:") for p in problems(raw))


def test_hostile_user_and_key():
    raw = good()
    users = raw["images"]["demo-x86_64"]["users"]
    users.append({"name": "evil\nroot"})
    users.append({"name": "ok", "public_keys": ["ssh-ed25519 AAAAC3Nza\nssh-rsa AAAA injected"]})
    found = "\n".join(problems(raw))
    assert "users[1].name: expected a user name" in found
    assert "users[2].public_keys[0]: expected one OpenSSH public key on one line" in found


def test_ssh_user_must_be_an_image_user():
    raw = good()
    raw["images"]["demo-x86_64"]["ssh_user"] = "nobody"
    assert problems(raw) == ["images.demo-x86_64.ssh_user: 'nobody' is not one of this image's users"]


def test_missing_required_keys():
    raw = good()
    raw["images"]["new"] = {"memory": 512}
    found = problems(raw)
    assert "images.new.distro: missing (required)" in found and "images.new.arch: missing (required)" in found


def test_unknown_image_lists_valid_names():
    cfg = load_file(ROOT / "invoke.yaml")
    with pytest.raises(UsageError) as exc:
        cfg.image("demo-x86")
    assert "did you mean 'demo-x86_64'" in exc.value.message
    assert "almalinux10-x86_64" in (exc.value.hint or "")


def test_config_is_frozen():
    cfg = load_file(ROOT / "invoke.yaml")
    with pytest.raises(AttributeError):
        cfg.image("demo-x86_64").memory = 1  # type: ignore[misc]


def test_invalid_yaml_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("images: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_file(bad)
    assert "not valid YAML" in exc.value.problems[0]
