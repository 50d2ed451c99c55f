"""Comparing two builds from their manifests (pure), and choosing which builds to compare."""

from __future__ import annotations

import json

import pytest

from pipeline.base.errors import UsageError
from pipeline.contents import diff
from pipeline.contents.packages import Package


def rpm(name: str, version: str, release: str = "1.el10", arch: str = "x86_64", epoch: str | None = None) -> dict:
    return Package("rpm", name, version, release, epoch, arch).as_manifest()


def manifest(build_id: str, pkgs: list[dict] | None, parts: dict, size: int = 100 << 20, sha: str = "a" * 64,
             extra_formats: dict | None = None) -> dict:
    art = {"file": "x.qcow2", "format": "qcow2", "size": size, "sha256": sha}
    m = {"image": "alma", "build_id": build_id, "artifact": art,
         "artifacts": [art] + [{"file": f"x.{f}", "format": f, "size": s, "sha256": "b" * 64}
                               for f, s in (extra_formats or {}).items()],
         "input_parts": parts}
    if pkgs is not None:
        m["packages"] = pkgs
    return m


OLD = manifest("20261101T000000Z-aaaa", [rpm("bash", "5.2.26"), rpm("openssl", "3.2.1"), rpm("vim", "9.1"),
                                         rpm("glibc", "2.39", arch="i686"), rpm("glibc", "2.39")],
               {"config": "1", "iso.lock": "x", "tool:packer": "1.6", "imagepipe": "0.1.0"})
NEW = manifest("20261108T000000Z-bbbb", [rpm("bash", "5.2.26"), rpm("openssl", "3.2.2", epoch="1"),
                                         rpm("nano", "8.0"), rpm("glibc", "2.39", arch="i686"),
                                         rpm("glibc", "2.40")],
               {"config": "1", "iso.lock": "y", "tool:packer": "1.6", "imagepipe": "0.1.0", "tool:qemu": "7"},
               size=(100 << 20) + (3 << 19), sha="c" * 64, extra_formats={"vmdk": 50 << 20})


def test_packages_added_removed_changed_per_name_and_arch():
    d = diff.compare(OLD, NEW)
    assert d.added == [("nano.x86_64", "8.0-1.el10")]
    assert d.removed == [("vim.x86_64", "9.1-1.el10")]
    assert [(c.name, c.old, c.new) for c in d.changed] == [
        ("glibc.x86_64", "2.39-1.el10", "2.40-1.el10"), ("openssl.x86_64", "3.2.1-1.el10", "1:3.2.2-1.el10")]
    assert d.inputs == ["iso.lock", "tool:qemu"]
    assert d.sizes == {"qcow2": (100 << 20, (100 << 20) + (3 << 19)), "vmdk": (None, 50 << 20)}
    assert not d.same_image and not d.unchanged


def test_text_and_json_say_the_same():
    d = diff.compare(OLD, NEW)
    text = diff.render(d)
    assert "build 20261101T000000Z-aaaa → 20261108T000000Z-bbbb" in text
    assert "packages: 1 added, 1 removed, 2 changed" in text
    assert "    + nano.x86_64 8.0-1.el10" in text and "    - vim.x86_64 9.1-1.el10" in text
    assert "    ~ openssl.x86_64 3.2.1-1.el10 → 1:3.2.2-1.el10" in text
    assert "inputs changed: iso.lock, tool:qemu" in text
    assert "size qcow2: 100.0 MiB → 101.5 MiB (+1.5 MiB)" in text and "size vmdk: - → 50.0 MiB" in text
    data = json.loads(json.dumps(d.as_json()))
    assert data["packages"]["changed"][1] == {"name": "openssl.x86_64", "old": "3.2.1-1.el10", "new": "1:3.2.2-1.el10"}
    assert data["sizes"]["qcow2"]["change"] == 3 << 19 and data["sizes"]["vmdk"]["change"] is None


def test_a_name_held_twice_compares_as_a_set_of_versions():
    """Nix closures may hold one name at two versions (python3-3.11 and -3.12)."""
    def nix(v: str) -> dict:
        return Package("nix", "python3", v, path=f"/nix/store/{'a' * 32}-python3-{v}").as_manifest()

    d = diff.compare(manifest("1", [nix("3.11.9"), nix("3.12.4")], {}), manifest("2", [nix("3.12.4")], {}))
    assert [(c.name, c.old, c.new) for c in d.changed] == [("python3", "3.11.9, 3.12.4", "3.12.4")]


def test_identical_builds_and_builds_without_a_package_list():
    same = diff.compare(OLD, {**OLD, "build_id": "later"})
    assert same.unchanged and same.same_image and "image: bit-for-bit the same" in diff.render(same)
    old = manifest("old", None, {"config": "1"})
    d = diff.compare(old, NEW)
    assert d.notes == ["no package list in build old (built before imagepipe recorded one)"]
    assert not d.added and d.inputs


def test_summary_is_short_and_has_one_text_line():
    s = diff.summary(diff.compare(OLD, NEW))
    assert s["packages"] == {"added": 1, "removed": 1, "changed": 2} and s["size_change"] == 3 << 19
    assert s["from"] == OLD["build_id"] and s["inputs_changed"] == ["iso.lock", "tool:qemu"]
    assert diff.summary_line(s) == ("since 20261101T000000Z-aaaa: packages +1 -1 ~2; inputs changed: "
                                    "iso.lock, tool:qemu, size +1.5 MiB")


def kept(tmp_path, *ids: str, current: str | None = None):
    image_dir = tmp_path / "alma"
    for i in ids:
        (image_dir / "builds" / i).mkdir(parents=True)
        (image_dir / "builds" / i / "manifest.json").write_text(json.dumps(manifest(i, [], {})))
    (image_dir / "builds" / "20261120T000000Z-broken").mkdir(parents=True)  # no manifest: not a build
    if current:
        (image_dir / "current").symlink_to(f"builds/{current}")
    return image_dir


def test_pick_defaults_to_the_last_two_and_names_what_exists(tmp_path):
    image_dir = kept(tmp_path, "20261101T000000Z-a", "20261108T000000Z-b", "20261115T000000Z-c",
                     current="20261108T000000Z-b")
    old, new = diff.pick(image_dir, "alma")
    assert (old["build_id"], new["build_id"]) == ("20261108T000000Z-b", "20261115T000000Z-c")
    old, new = diff.pick(image_dir, "alma", "20261101T000000Z-a")
    assert new["build_id"] == "20261108T000000Z-b", "one build named: compared with the published one"
    old, new = diff.pick(image_dir, "alma", "20261115T000000Z-c", "20261101T000000Z-a")
    assert (old["build_id"], new["build_id"]) == ("20261115T000000Z-c", "20261101T000000Z-a")
    with pytest.raises(UsageError) as err:
        diff.pick(image_dir, "alma", "20261102T000000Z-x")
    assert "no kept build '20261102T000000Z-x'" in err.value.message and "20261115T000000Z-c" in (err.value.hint or "")


def test_pick_needs_two_builds(tmp_path):
    with pytest.raises(UsageError) as err:
        diff.pick(kept(tmp_path, "20261101T000000Z-a"), "alma")
    assert "1 kept build(s)" in err.value.message and "--force" in (err.value.hint or "")
