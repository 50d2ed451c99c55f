"""Output formats in the configuration, and what each engine is told about them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.errors import ConfigError
from pipeline.config import load
from pipeline.model import Format, Image
from pipeline.render import demo as render_demo
from pipeline.render import nix as render_nix
from pipeline.render.almalinux import source as alma_source

# someone can log in (config load refuses an image nobody can log in to: pipeline.contract)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def image(**body) -> Image:
    distro = body.pop("distro", "demo")
    body.setdefault("users", LOGIN)
    return load({"images": {"x": {"distro": distro, "arch": "x86_64", **body}}}, Path(".")).images["x"]


def problems(**body) -> str:
    with pytest.raises(ConfigError) as err:
        image(**body)
    return str(err.value)


def test_formats_default_to_the_primary_format():
    assert image().formats == (Format.QCOW2,) and image().format is Format.QCOW2
    assert image(format="raw").formats == (Format.RAW,)
    img = image(formats=["raw", "vmdk", "vhdx", "vdi", "qcow2"])
    assert img.format is Format.RAW and img.formats[1:] == (Format.VMDK, Format.VHDX, Format.VDI, Format.QCOW2)
    assert image(formats="qcow2").formats == (Format.QCOW2,)
    assert image(format="qcow2", formats=["qcow2", "vmdk"]).formats == (Format.QCOW2, Format.VMDK)


def test_a_directly_made_image_keeps_format_and_formats_consistent():
    assert Image("x", "demo", "x86_64", format=Format.RAW).formats == (Format.RAW,)  # type: ignore[arg-type]
    both = Image("x", "demo", "x86_64", formats=(Format.RAW, Format.VDI))  # type: ignore[arg-type]
    assert both.format is Format.RAW


@pytest.mark.parametrize(("body", "message"), [
    ({"formats": ["vmdk", "qcow2"]}, "images.x.formats: the first format is the one built and booted"),
    ({"formats": ["qcow2", "raw", "qcow2"]}, "images.x.formats: lists a format twice"),
    ({"formats": []}, "images.x.formats: expected a list of formats"),
    ({"formats": ["qcow2", "vhd"]}, "expected one of qcow2, raw, vmdk, vhdx, vdi, got 'vhd' (did you mean 'vhdx'?)"),
    ({"format": "vdi"}, "images.x.format: vdi cannot be built or booted directly"),
    ({"format": "raw", "formats": ["qcow2", "raw"]}, "images.x.format: raw is not the first of formats (qcow2)"),
    ({"compress_qcow2": "yes"}, "images.x.compress_qcow2: expected true or false"),
])
def test_bad_formats_are_one_line_each(body, message):
    assert message in problems(**body)


def test_compression_per_engine():
    """AlmaLinux keeps compressing by default; the demo does not; NixOS asks make-disk-image."""
    users = {"users": LOGIN}
    assert alma_source(image(distro="almalinux", **users), legacy=True,
                       artifact_name="test.qcow2").body["disk_compression"] is True
    assert alma_source(image(distro="almalinux", compress_qcow2=False, **users), legacy=True,
                       artifact_name="test.qcow2").body["disk_compression"] is False
    demo = image(compress_qcow2=True)
    src = next(b for b in render_demo.blocks(demo, legacy=True, artifact_name="test.qcow2") if b.type == "source")
    assert src.body["disk_compression"] is True and src.body["skip_compaction"] is False
    nixos = {"distro": "nixos", **users}
    assert render_nix.params(image(**nixos))["format"] == "qcow2"
    assert render_nix.params(image(compress_qcow2=True, **nixos))["format"] == "qcow2-compressed"
    assert render_nix.params(image(formats=["raw", "vdi"], compress_qcow2=True, **nixos))["format"] == "raw"


def test_the_demo_provisioner_writes_nothing_build_specific():
    """Reproducible: a fixed UUID and hash seed per image, the time from SOURCE_DATE_EPOCH, no
    build id, no mount (mke2fs -d), every file time set."""
    lines = render_demo.provision(image())
    text = "\n".join(lines)
    fsid = render_demo.fs_uuid(image())
    assert fsid == render_demo.fs_uuid(image()) != render_demo.fs_uuid(Image("y", "demo", "x86_64"))  # type: ignore[arg-type]
    assert f"-U {fsid} -E hash_seed={fsid},root_owner=0:0,nodiscard -d" in text
    assert 'E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH"' in text and "mount" not in text
    assert "BUILD_ID" not in text and "date" not in text
    for t in ("atime", "mtime", "ctime", "crtime"):
        assert t in text
    assert render_demo.marker_text(image()) == "imagepipe demo image x"
