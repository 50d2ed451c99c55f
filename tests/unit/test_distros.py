"""Distro profiles: generic code asks the profile, so a new distro needs no change outside its module.

The fake distro below exists only in this test. It is registered at run time and driven through
the generic paths a real one takes: configuration, `invoke render`'s file set, the input hash and
the dry-run plan (with its Packer command line).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipeline import distros, inputs
from pipeline.base.errors import ConfigError
from pipeline.build import BuildOptions, build_image
from pipeline.committed import drift, rendered_files, write_all
from pipeline.config import load
from pipeline.distros.packer_base import PackerProfile
from pipeline.host import HostFacts, KvmFacts, ToolInfo
from pipeline.model import Arch, Image
from pipeline.render.hcl import Block, Expr
from pipeline.render.packer import common_variables, packer_block, variable

VERSIONS = {"packer": "1.6.6", "qemu-system-x86_64": "7.2.22"}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr0Y1JXb5EeMQr5MaZd8Plls6IbYjaUHXZzRAHy5MhV fake@test"


class FakeOS(PackerProfile):
    """A distro that installs from a seed file; everything else is inherited."""

    name = "fakeos"
    title = "FakeOS"

    def blocks(self, image: Image, legacy: bool) -> list[Block]:
        source = Block("source", ("qemu", image.name), {
            "accelerator": Expr("var.accelerator"),
            "iso_url": Expr("var.seed"),
            "iso_checksum": "none",
            "output_directory": Expr("var.output_dir"),
            "vm_name": self.artifact_name(image),
            "communicator": "none",
        })
        build = Block("build", body={"sources": [f"source.qemu.{image.name}"]})
        head = [] if legacy else [packer_block()]
        return head + common_variables() + [variable("seed", "the install seed")] + [source, build]

    def input_parts(self, root: Path, image: Image) -> dict[str, str]:
        return {"seed": "pinned-seed-1"}

    def prepared_variables(self, image: Image) -> list[str]:
        return ["seed"]


@pytest.fixture
def fakeos():
    profile = distros.register(FakeOS())
    yield profile
    distros.unregister("fakeos")


def config(root: Path) -> object:
    raw = {
        "defaults": {"output_dir": str(root / "output")},
        "images": {"fake-x86_64": {"distro": "fakeos", "arch": "x86_64", "version": "3", "firmware": "bios",
                                   "users": [{"name": "root", "public_keys": [KEY]}]}},
    }
    return load(raw, root)


def facts() -> HostFacts:
    return HostFacts("linux", "x86_64", KvmFacts(True, True, False), False,
                     tools={"packer": ToolInfo("packer", True, "1.6.6"),
                            "qemu-system-x86_64": ToolInfo("qemu-system-x86_64", True, "7.2.22"),
                            "qemu-img": ToolInfo("qemu-img", True, "7.2.22")})


def test_a_registered_profile_is_a_valid_distro(tmp_path, fakeos):
    assert "fakeos" in distros.names()
    cfg = config(tmp_path)
    image = cfg.image("fake-x86_64")
    assert image.distro == "fakeos" and distros.profile(image) is fakeos
    assert distros.artifact_name(image) == "fake-x86_64.qcow2"


def test_an_unknown_distro_is_a_config_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load({"images": {"x": {"distro": "almalinx", "arch": "x86_64"}}}, tmp_path)
    text = err.value.render()
    assert "images.x.distro" in text and "almalinux, debian, demo, nixos" in text and "did you mean 'almalinux'" in text


def test_render_dry_run_and_input_hash_of_a_new_distro(tmp_path, fakeos):
    cfg = config(tmp_path)
    image = cfg.image("fake-x86_64")
    # render: the generic file set holds its template, in the folder its family names
    files = rendered_files(cfg)
    template = tmp_path / "packer" / "fakeos" / "x86_64" / "fake-x86_64.pkr.hcl"
    assert list(files) == [template]
    assert 'source "qemu" "fake-x86_64"' in files[template] and "required_plugins" in files[template]
    assert write_all(files) == [template] and drift(files) == []
    # input hash: the template file and the profile's own part are in it
    ihash = inputs.compute(cfg, image, VERSIONS)
    assert set(ihash.parts) == {"file:packer/fakeos/x86_64/fake-x86_64.pkr.hcl", "seed", "config",
                                "tool:packer", "tool:qemu-system-x86_64", "imagepipe"}
    template.write_text(template.read_text() + "# edited\n")
    assert inputs.compute(cfg, image, VERSIONS).changed_parts(ihash.parts) == [
        "file:packer/fakeos/x86_64/fake-x86_64.pkr.hcl"]
    # dry run: the plan and the Packer command, nothing built
    said: list[str] = []
    result = build_image(cfg, image, BuildOptions(dry_run=True), facts=facts(), say=said.append)
    assert result.build_dir is None
    text = "\n".join(said)
    assert "distro  FakeOS 3" in text and f"template  {template}" in text
    lines = text.splitlines()
    command = lines[lines.index("  command") + 1]
    argv = shlex.split(command)
    assert argv[:3] == ["packer", "build", "-machine-readable"]
    assert "seed=<prepared at build time: seed>" in argv and "accelerator=tcg" in argv
    assert not (cfg.output_dir / "fake-x86_64" / "builds").exists()


def test_a_missing_tool_stops_the_build_before_anything_starts(tmp_path, fakeos):
    from pipeline.base.errors import ToolMissing

    cfg = config(tmp_path)
    bare = HostFacts("linux", "x86_64", KvmFacts(True, True, False), False,
                     tools={"packer": ToolInfo("packer", True, "1.6.6")})
    with pytest.raises(ToolMissing) as err:
        build_image(cfg, cfg.image("fake-x86_64"), BuildOptions(dry_run=True), facts=bare, say=lambda _m: None)
    assert "qemu-system-x86_64" in err.value.message and "apt-get install qemu-system-x86" in err.value.render()


def test_almalinux_latest_keeps_template_and_kickstart_in_one_family_folder(tmp_path):
    raw = {"images": {"alma": {"distro": "almalinux", "arch": "x86_64", "version": "latest",
                               "users": [{"name": "root", "public_keys": [KEY]}]}}}
    cfg = load(raw, tmp_path)
    image = cfg.image("alma")
    profile = distros.profile(image)
    files = rendered_files(cfg)
    assert sorted(str(p.relative_to(tmp_path)) for p in files) == [
        "kickstart/almalinux10/x86_64/alma/ks.cfg", "packer/almalinux10/x86_64/alma.pkr.hcl"]
    assert profile.template(tmp_path, image) in files
    write_all(files)
    parts = inputs.compute(cfg, image, {"packer": "1.6.6", "qemu-system-x86_64": "7.2"}).parts
    assert "file:kickstart/almalinux10/x86_64/alma/ks.cfg" in parts, "the kickstart is an input too"


@pytest.mark.parametrize("name, family, artifact, ephemeral, boots_kernel", [
    ("almalinux", "almalinux10", "i.qcow2", False, False),
    ("nixos", "nixos", "nixos.qcow2", False, False),
    ("demo", "demo", "i.qcow2", True, True),
])
def test_builtin_profiles(tmp_path, name, family, artifact, ephemeral, boots_kernel):
    image = load({"images": {"i": {"distro": name, "arch": "x86_64", "version": "10",
                                   "users": [{"name": "root", "public_keys": [KEY]}]}}}, tmp_path).image("i")
    profile = distros.profile(image)
    assert profile.family(image) == family and distros.artifact_name(image) == artifact
    assert profile.ephemeral_root is ephemeral and (profile.boot_info(image) is not None) is boots_kernel
    assert profile.driver.name in ("packer", "nix") and profile.driver.tools
    assert Arch.X86_64.qemu_binary in profile.needed_tools(image) or profile.driver.name == "nix"
