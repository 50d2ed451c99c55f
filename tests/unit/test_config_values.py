"""Config values that land in generated files and in the guest's paths: only what their target
names things by (a zoneinfo name, a locale, a keymap) passes, at config load."""

import pytest
import yaml

from pipeline.base import validate
from pipeline.base.errors import ConfigError
from pipeline.config import load
from tests.support import ROOT


def problems_with(key: str, value: str, where: str = "defaults") -> list[str]:
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    target = raw["defaults"] if where == "defaults" else raw["images"][where]
    target[key] = value
    try:
        load(raw, ROOT)
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("key, value", [
    ("timezone", "../../etc/shadow"), ("timezone", "/etc/shadow"), ("timezone", "Europe/../../x"),
    ("timezone", "Europe/./Berlin"), ("timezone", "UTC\nx"), ("timezone", ".hidden"),
    ("lang", "../../etc/shadow"), ("lang", "en_US/../x"), ("lang", "en US"), ("lang", "en_US.UTF-8 --x"),
    ("keyboard", "../us"), ("keyboard", "us/../../x"), ("keyboard", "de latin1"), ("keyboard", "-us"),
])
def test_values_with_paths_or_options_are_refused_at_load(key, value):
    found = problems_with(key, value)
    assert len(found) == 1 and found[0].startswith(f"defaults.{key}: expected"), found
    found = problems_with(key, value, where="almalinux10-x86_64")
    assert len(found) == 1 and found[0].startswith(f"images.almalinux10-x86_64.{key}: expected"), found


@pytest.mark.parametrize("key, value", [
    ("timezone", "UTC"), ("timezone", "Europe/Berlin"), ("timezone", "America/Argentina/Buenos_Aires"),
    ("timezone", "Etc/GMT+5"), ("timezone", "America/Port-au-Prince"),
    ("lang", "en_US.UTF-8"), ("lang", "C.UTF-8"), ("lang", "POSIX"), ("lang", "sr_RS@latin"), ("lang", "de_DE"),
    ("lang", "es_419.UTF-8"),
    ("keyboard", "us"), ("keyboard", "de-latin1-nodeadkeys"), ("keyboard", "fr_CH"), ("keyboard", "mac-us"),
])
def test_real_names_pass(key, value):
    assert problems_with(key, value) == []


def test_a_timezone_this_hosts_database_lacks_is_refused_with_a_suggestion():
    found = problems_with("timezone", "Europe/Berln")
    assert len(found) == 1 and "did you mean 'Europe/Berlin'" in found[0], found


def test_without_a_zoneinfo_database_the_shape_alone_decides(monkeypatch, tmp_path):
    monkeypatch.setattr(validate, "zoneinfo_dirs", lambda: (str(tmp_path / "none"),))
    assert problems_with("timezone", "Mars/Olympus_Mons") == []
    assert problems_with("timezone", "../../etc/shadow") != []
