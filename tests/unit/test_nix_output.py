"""What imagepipe reads from nix, tested with what nix 2.8 and nix 2.34 really print.

tests/fixtures/nix-output/<version>/ was captured by tests/fixtures/nix-output/capture.py: nix
2.8.0 is Debian 12's nix-bin, nix 2.34.8 the one in the current lane's root. Each format nix has
changed is read by its shape (or, for flags, chosen by the version), and both shapes are here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.contents.packages import parse_path_info
from pipeline.drivers.nix import path_info_argv
from pipeline.drivers.nixcli import json_flags, nix_error, parse_nix_version
from pipeline.drivers.nixremote import out_path
from pipeline.nixmachines import parse_show_derivation

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "nix-output"
VERSIONS = sorted(p.name for p in CAPTURED.iterdir() if p.is_dir())


def read(version: str, name: str) -> str:
    return (CAPTURED / version / name).read_text(encoding="utf-8")


def test_both_an_old_and_a_new_nix_were_captured():
    numbers = [parse_nix_version(read(v, "version.txt")) for v in VERSIONS]
    assert any(n and n < (2, 33) for n in numbers) and any(n and n >= (2, 34) for n in numbers), VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_derivation_show_is_read_by_its_shape(version):
    text = read(version, "derivation-show.json")
    data = json.loads(text)
    wrapped = "derivations" in data  # 2.34: {"derivations": {...}, "version": 4}
    assert wrapped == (parse_nix_version(version) >= (2, 34))
    needs = parse_show_derivation(text)
    assert needs.system == "x86_64-linux" and needs.features == {"kvm"}
    assert needs.drv.startswith("/nix/store/") and needs.drv.endswith("-fixture-kvm-image.drv")


def test_both_versions_name_the_same_derivation():
    drvs = {parse_show_derivation(read(v, "derivation-show.json")).drv for v in VERSIONS}
    assert len(drvs) == 1, drvs  # the same fixture flake: the store prefix is put back on 2.34's key


def test_more_than_one_derivation_is_refused_in_either_shape():
    old = json.loads(read(VERSIONS[0], "derivation-show.json"))
    body = next(iter(old.values()))
    with pytest.raises(ValueError, match="exactly one derivation, found 2"):
        parse_show_derivation(json.dumps({"/nix/store/a-x.drv": body, "/nix/store/b-y.drv": body}))
    with pytest.raises(ValueError, match="found 2"):
        parse_show_derivation(json.dumps({"derivations": {"a-x.drv": body, "b-y.drv": body}, "version": 4}))


@pytest.mark.parametrize(("version", "name"), [(v, n) for v in VERSIONS for n in
                                               ("path-info.json", "path-info-format1.json", "path-info-format2.json")
                                               if (CAPTURED / v / n).is_file()])
def test_path_info_is_read_in_every_format(version, name):
    packages = parse_path_info(read(version, name))
    assert {(p.name, p.version) for p in packages} == {
        ("hello", "2.12.1"), ("openssh", "9.9p1"), ("nixos-system-nixos-x86_64", "26.05")}
    assert all(p.path and p.path.startswith("/nix/store/") for p in packages)


def test_json_format_is_given_only_to_the_nix_that_knows_it():
    for version in VERSIONS:
        number = parse_nix_version(version)
        flags = json_flags(number)
        if number < (2, 33):
            # the old nix refuses the flag...
            assert "unrecognised flag '--json-format'" in read(version, "path-info-format1.stderr")
            assert "--json-format" not in flags
        else:
            # ...the new one warns without it
            assert "'--json' without '--json-format' is deprecated" in read(version, "path-info.stderr")
            assert flags == ["--json", "--json-format", "1"]
    assert "--json-format" not in path_info_argv("f#x", version=(2, 8, 0))
    assert path_info_argv("f#x", version=(2, 34, 8))[-4:] == ["--json", "--json-format", "1", "f#x"]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_built_path_is_read_from_nix_build_json(version):
    line = read(version, "build.json").strip()
    assert out_path(line) == json.loads(line)[0]["outputs"]["out"]


@pytest.mark.parametrize("version", VERSIONS)
def test_an_error_is_its_cause_and_location_not_the_trace(version):
    throw = nix_error(read(version, "eval-throw.stderr"))
    assert throw.startswith("error: fixture: broken outputs")
    assert "while calling" not in throw and "|" not in throw
    if parse_nix_version(version) >= (2, 34):  # the trace says where: the flake's own file, not the store copy
        assert throw == "error: fixture: broken outputs (at flake.nix:1:36)"
    else:
        assert throw == "error: fixture: broken outputs"


def test_a_misspelt_option_is_one_cause_whatever_the_trace():
    """lint evaluates two outputs; newer nix reaches the same cause through different traces."""
    causes = {nix_error(read(v, f"eval-misspelt-option-{output}.stderr"))
              for v in VERSIONS for output in ("nixosConfigurations", "packages")}
    assert causes == {"error: The option `boot.growPartiton' does not exist. Definition values: "
                      "- In `modules/disk.nix'"}


def test_text_without_an_error_line_is_kept_short():
    assert nix_error("warning: something\nboom\n") == "boom"
    assert len(nix_error("x" * 1000)) == 300
