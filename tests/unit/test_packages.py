"""Package lists: the parsers of what each distro hands back, purls, and the CycloneDX SBOM
validated against the official JSON schema (shipped by cyclonedx-python-lib, a test dependency)."""

from __future__ import annotations

import json

import pytest

from pipeline.base.errors import BuildFailed
from pipeline.contents import packages, sbom
from pipeline.contents.packages import Package

RPM_LIST = (
    "bash\t(none)\t5.2.26\t4.el10\tx86_64\n"
    "gpg-pubkey\t(none)\tc2a1e572\t668fe8ef\t(none)\n"
    "shadow-utils\t2\t4.15.0\t5.el10\tx86_64\n"
    "glibc-langpack-en\t(none)\t2.39\t37.el10\tx86_64\n"
    "glibc\t(none)\t2.39\t37.el10\ti686\n"
    "glibc\t(none)\t2.39\t37.el10\tx86_64\n"
    "\n"
)


def test_rpm_list_parses_every_field_and_skips_signing_keys():
    pkgs = packages.parse_rpm_list(RPM_LIST)
    assert [p.name for p in pkgs] == ["bash", "glibc", "glibc", "glibc-langpack-en", "shadow-utils"]
    shadow = next(p for p in pkgs if p.name == "shadow-utils")
    assert (shadow.epoch, shadow.version, shadow.release, shadow.arch) == ("2", "4.15.0", "5.el10", "x86_64")
    assert shadow.full_version == "2:4.15.0-5.el10" and shadow.key == "shadow-utils.x86_64"
    bash = pkgs[0]
    assert bash.epoch is None and bash.full_version == "5.2.26-4.el10"
    assert bash.purl == "pkg:rpm/almalinux/bash@5.2.26-4.el10?arch=x86_64"
    assert shadow.purl == "pkg:rpm/almalinux/shadow-utils@4.15.0-5.el10?arch=x86_64&epoch=2"
    assert bash.as_manifest() == {"type": "rpm", "name": "bash", "version": "5.2.26", "release": "4.el10",
                                  "arch": "x86_64", "purl": bash.purl}


@pytest.mark.parametrize("line", ["bash\t5.2\tx86_64", "\t(none)\t1\t2\tx86_64", "a\tb\tc\td\te\tf"])
def test_a_malformed_rpm_line_is_refused_with_its_number(line):
    with pytest.raises(BuildFailed) as err:
        packages.parse_rpm_list("bash\t(none)\t5.2.26\t4.el10\tx86_64\n" + line + "\n")
    assert "malformed line 2" in err.value.message and "rpm -qa --qf" in (err.value.hint or "")


def test_a_missing_rpm_list_names_where_it_should_have_come_from(tmp_path):
    with pytest.raises(BuildFailed) as err:
        packages.read_rpm_list(tmp_path)
    assert packages.GUEST_RPM_LIST in err.value.message and "invoke render" in (err.value.hint or "")
    (tmp_path / packages.COLLECTED).mkdir()
    (tmp_path / packages.COLLECTED / packages.RPM_LIST).write_text(RPM_LIST)
    assert len(packages.read_rpm_list(tmp_path)) == 5


@pytest.mark.parametrize(("name", "expected"), [
    ("openssh-9.9p1", ("openssh", "9.9p1")),
    ("hello", ("hello", "")),
    ("nixos-system-nixos-x86_64-26.05", ("nixos-system-nixos-x86_64", "26.05")),
    ("python3.12-setuptools-69.1.1", ("python3.12-setuptools", "69.1.1")),
    ("glibc-2.39-52-bin", ("glibc", "2.39-52-bin")),
    ("unit-dbus.service", ("unit-dbus.service", "")),
    ("etc", ("etc", "")),
])
def test_store_path_names_split_as_nix_does(name, expected):
    """builtins.parseDrvName: the version starts at the first '-' not followed by a letter."""
    assert packages.split_drv_name(name) == expected


def test_path_info_json_of_old_and_new_nix():
    a = "/nix/store/" + "a" * 32 + "-openssh-9.9p1"
    b = "/nix/store/" + "b" * 32 + "-etc"
    old = json.dumps([{"path": a, "narSize": 1}, {"path": b, "narSize": 2}])
    new = json.dumps({a: {"narSize": 1}, b: {"narSize": 2}})
    for text in (old, new):
        pkgs = packages.parse_path_info(text)
        assert [(p.name, p.version, p.path) for p in pkgs] == [("etc", "", b), ("openssh", "9.9p1", a)]
    assert pkgs[1].purl == "pkg:nix/openssh@9.9p1" and pkgs[0].purl == "pkg:nix/etc"
    with pytest.raises(BuildFailed):
        packages.parse_path_info("error: not json")


def test_deb_purl_keeps_the_epoch_and_encodes_plus():
    p = packages.deb_package({"Package": "busybox-static", "Version": "1:1.35.0-4+b3", "Architecture": "amd64"})
    assert p.purl == "pkg:deb/debian/busybox-static@1:1.35.0-4%2Bb3?arch=amd64"
    assert p.full_version == "1:1.35.0-4+b3" and p.key == "busybox-static.amd64"


def test_deb_list_round_trips_through_the_stage(tmp_path):
    pkgs = [Package("deb", "dropbear-bin", "2022.83-1", arch="amd64"), Package("deb", "busybox-static", "1:1.35", arch="amd64")]
    packages.write_deb_list(tmp_path, pkgs)
    assert packages.read_deb_list(tmp_path) == sorted(pkgs)


# ------------------------------------------------------------------------------------------ SBOM


def validate(doc: dict) -> None:
    """The official CycloneDX 1.6 JSON schema (strict: no unknown properties)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    assert error is None, str(error)[:2000]


def manifest(**extra) -> dict:
    base = {"image": "demo-x86_64", "build_id": "20261123T210000Z-1a2b", "distro": "demo", "arch": "x86_64",
            "version": "1", "finished": "2026-11-23T21:00:00Z", "input_hash": "f" * 64,
            "artifact": {"file": "demo-x86_64.qcow2", "format": "qcow2", "sha256": "a" * 64, "size": 1}}
    return {**base, **extra}


def test_sbom_of_each_kind_of_package_validates_against_the_official_schema():
    nix_path = "/nix/store/" + "c" * 32 + "-openssh-9.9p1"
    pkgs = [*packages.parse_rpm_list(RPM_LIST),
            packages.deb_package({"Package": "busybox-static", "Version": "1:1.35.0-4+b3", "Architecture": "amd64"}),
            Package("nix", "openssh", "9.9p1", path=nix_path), Package("nix", "etc", "", path=nix_path + "-etc")]
    doc = sbom.document(manifest(), pkgs)
    validate(doc)
    assert doc["specVersion"] == "1.6" and doc["metadata"]["component"]["hashes"][0]["content"] == "a" * 64
    refs = [c["bom-ref"] for c in doc["components"]]
    assert len(refs) == len(set(refs)) == len(pkgs)
    assert doc["dependencies"][0] == {"ref": "image", "dependsOn": refs}
    nix = next(c for c in doc["components"] if c["name"] == "openssh")
    assert nix["bom-ref"] == nix_path and {"name": "nix:store_path", "value": nix_path} in nix["properties"]
    assert "version" not in next(c for c in doc["components"] if c["name"] == "etc")


def test_sbom_of_an_empty_package_list_validates_and_refs_repeat_safely():
    validate(sbom.document(manifest(), []))
    twice = [Package("deb", "a", "1", arch="amd64"), Package("deb", "a", "1", arch="amd64")]
    doc = sbom.document(manifest(), twice)
    validate(doc)
    assert [c["bom-ref"] for c in doc["components"]] == ["pkg:deb/debian/a@1?arch=amd64",
                                                          "pkg:deb/debian/a@1?arch=amd64#2"]


def test_sbom_serial_number_is_per_build():
    one, again = (sbom.document(manifest(), [])["serialNumber"] for _ in range(2))
    other = sbom.document(manifest(build_id="20261124T000000Z-ffff"), [])["serialNumber"]
    assert one == again != other and one.startswith("urn:uuid:")


def test_the_schema_check_catches_a_broken_document():
    """The validator really validates: a wrong field type fails."""
    doc = sbom.document(manifest(), [])
    doc["components"] = [{"type": "library", "name": 3}]
    with pytest.raises(AssertionError):
        validate(doc)
