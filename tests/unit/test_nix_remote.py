"""Pure parts of NixOS builds through nix's own remote builds: machines parsing, builder choice,
derivation needs, the ssh-ng argv, NIX_SSHOPTS, the lock a builder wrote, doctor's listing."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from pipeline import distros, doctor
from pipeline.base.errors import BuildFailed, HostUnsuitable, MachinesError, UsageError
from pipeline.builders import rsync
from pipeline.builders.remote import Target
from pipeline.config import load
from pipeline.distros import nixos
from pipeline.drivers import nix, nixlog, nixremote
from pipeline.host import HostFacts, KvmFacts
from pipeline.model import Accel
from pipeline.nixmachines import (
    DISK_IMAGE_FEATURES,
    Machine,
    check_store_path,
    configured,
    file_refs,
    fitting,
    parse,
    parse_line,
    parse_show_derivation,
    physical,
    store_root,
)
from pipeline.plan import make_build_plan

ROOT = Path("/srv/project")
HAL = Target("hal9000", "hal9000", "imagepipe", None, Path("/cfg/ssh_config"))


# someone other than the build key can log in (the guest contract, checked at config load)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def config():
    return load({"images": {
        "nixos-x86_64": {"distro": "nixos", "arch": "x86_64", "firmware": "bios", "users": LOGIN},
        "nixos-aarch64": {"distro": "nixos", "arch": "aarch64", "users": LOGIN},
        "demo-x86_64": {"distro": "demo", "arch": "x86_64", "users": LOGIN},
    }}, root=ROOT)


def facts(machine: str = "x86_64", os_: str = "linux", builders: tuple[Machine, ...] = (),
          features: str = "kvm") -> HostFacts:
    from pipeline.host import ToolInfo

    return HostFacts(os=os_, machine=machine, kvm=KvmFacts(True, True, True), hvf=False,
                     tools={"nix": ToolInfo("nix", True, "2.8.0")},
                     nix_config={"system": f"{machine}-linux", "system-features": features, "store": "auto"},
                     nix_builders=builders)


# --------------------------------------------------------------------------------- machines


def test_a_full_line_and_every_default():
    m = parse_line("ssh-ng://builder@hal9000 x86_64-linux,aarch64-linux /k/id 8 2 kvm,big-parallel benchmark "
                   "c3NoLWVkMjU1MTkgQUFBQQ==", "x86_64-darwin")
    assert m.uri == "ssh-ng://builder@hal9000" and m.systems == ("x86_64-linux", "aarch64-linux")
    assert (m.ssh_key, m.max_jobs, m.speed) == ("/k/id", 8, 2.0)
    assert m.supported == {"kvm", "big-parallel"} and m.mandatory == {"benchmark"}
    assert m.host_key == "c3NoLWVkMjU1MTkgQUFBQQ=="
    bare = parse_line("hal9000", "aarch64-darwin")
    assert bare.uri == "ssh://hal9000" and bare.systems == ("aarch64-darwin",)   # nix's defaults
    assert (bare.ssh_key, bare.max_jobs, bare.speed, bare.supported, bare.host_key) == (None, 1, 1.0, frozenset(), None)
    dashes = parse_line("ssh://h - - - - kvm", "x86_64-linux")
    assert dashes.systems == ("x86_64-linux",) and dashes.supported == {"kvm"} and dashes.max_jobs == 1


def test_inline_builders_files_and_comments():
    files = {
        "/etc/nix/machines": "# the linux builder\nssh-ng://linux-builder aarch64-linux /etc/nix/builder_ed25519 4 1 "
                             "kvm,benchmark,big-parallel\n\n@/etc/nix/more # nested\n",
        "/etc/nix/more": "ssh://old x86_64-linux",
    }
    setting = "ssh-ng://a x86_64-linux - 2 1 kvm ; @/etc/nix/machines ; @/missing/file"
    machines = parse(setting, "x86_64-linux", files.get)
    assert [m.uri for m in machines] == ["ssh-ng://a", "ssh-ng://linux-builder", "ssh://old"]
    assert [m.source for m in machines] == ["builders", "/etc/nix/machines", "/etc/nix/more"]
    assert file_refs(setting) == ["/etc/nix/machines", "/missing/file"]
    assert configured({"system": "x86_64-linux", "builders": "@/etc/nix/machines"}, files.get)[0].systems == ("aarch64-linux",)
    assert configured(None, files.get) == [] and configured({"builders": ""}, files.get) == []


def test_a_machines_file_naming_itself_stops():
    loop = {"/m": "@/m\nssh://h"}
    assert [m.uri for m in parse("@/m", "x86_64-linux", loop.get)] == ["ssh://h"] * 8


@pytest.mark.parametrize("line,why", [
    ("ssh://h x86_64-linux - many", "column 4"),
    ("ssh://h x86_64-linux - 1 fast", "column 5"),
    ("ssh://h x86_64-linux - -3", "negative"),
    ("ssh://h x86_64-linux - 1 1 kvm - not*base64", "base64"),
    ("- x86_64-linux", "no store URI"),
])
def test_lines_nix_rejects_are_refused(line, why):
    with pytest.raises(MachinesError, match=why):
        parse_line(line, "x86_64-linux")


def test_which_builder_can_take_a_derivation():
    kvm = parse_line("ssh-ng://a x86_64-linux - 1 1 kvm,big-parallel", "")
    plain = parse_line("ssh-ng://b x86_64-linux - 1 3 big-parallel", "")
    strict = parse_line("ssh-ng://c x86_64-linux - 1 9 kvm benchmark", "")
    arm = parse_line("ssh-ng://d aarch64-linux - 1 1 kvm", "")
    assert kvm.lacks("x86_64-linux", {"kvm"}) is None
    assert plain.lacks("x86_64-linux", {"kvm"}) == "lacks the feature kvm"
    assert strict.lacks("x86_64-linux", {"kvm"}) == "only takes derivations that require benchmark"
    assert strict.can_build("x86_64-linux", {"kvm", "benchmark"})  # mandatory features count as offered
    assert arm.lacks("x86_64-linux", set()) == "builds aarch64-linux, not x86_64-linux"
    assert fitting([kvm, plain, strict, arm], "x86_64-linux", set()) == [plain, kvm]  # fastest first
    assert fitting([kvm, plain, strict, arm], "x86_64-linux", DISK_IMAGE_FEATURES) == [kvm]


def test_derivation_needs_from_show_derivation():
    out = {"/nix/store/aaaa-img.drv": {"system": "aarch64-linux", "env": {"requiredSystemFeatures": "kvm big-parallel"},
                                       "outputs": {"out": {"path": "/nix/store/bbbb-img"}}}}
    needs = parse_show_derivation(json.dumps(out))
    assert (needs.system, needs.features, needs.drv) == ("aarch64-linux", {"kvm", "big-parallel"}, "/nix/store/aaaa-img.drv")
    assert needs.describe() == "aarch64-linux with big-parallel, kvm"
    structured = {"/nix/store/c.drv": {"system": "x86_64-linux",
                                       "env": {"__json": json.dumps({"requiredSystemFeatures": ["kvm"]})}}}
    assert parse_show_derivation(json.dumps(structured)).features == {"kvm"}
    plain = parse_show_derivation(json.dumps({"/nix/store/d.drv": {"system": "x86_64-linux", "env": {}}}))
    assert plain.features == frozenset() and plain.describe() == "x86_64-linux"
    with pytest.raises(ValueError):
        parse_show_derivation(json.dumps({**out, **structured}))


def test_chroot_store_paths_and_store_path_checks():
    assert store_root("/home/u/nixroot") == Path("/home/u/nixroot")
    assert store_root("local?root=/srv/n&state=/x") == Path("/srv/n")
    assert store_root("auto") is None and store_root("daemon") is None and store_root(None) is None
    assert physical("/nix/store/abc-x", "/r") == Path("/r/nix/store/abc-x")
    assert physical("/nix/store/abc-x", "auto") == Path("/nix/store/abc-x")
    good = "/nix/store/" + "a" * 32 + "-fixture-nixos-image"
    assert check_store_path(good) == good
    for bad in ("/nix/store/short-x", good + "; rm -rf /", "relative/" + "a" * 32 + "-x", "/nix/../" + "a" * 32 + "-x"):
        with pytest.raises(ValueError):
            check_store_path(bad)


# --------------------------------------------------------------------------------- ssh-ng route


def route(features: str = "kvm big-parallel", systems: tuple[str, ...] = ("x86_64-linux", "i686-linux")) -> nixremote.SshNg:
    return nixremote.SshNg(HAL, systems, frozenset(features.split()), eval_store="auto", nix_version="2.8.0")


def test_nix_sshopts_carry_our_ssh_config_and_strict_host_keys():
    opts = nixremote.nix_sshopts(Path("/cfg/ssh_config"), "-C")
    assert opts.split() == ["-F", "/cfg/ssh_config", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-C"]
    assert route().env() == {"NIX_SSHOPTS": "-F /cfg/ssh_config -o StrictHostKeyChecking=yes -o BatchMode=yes"}
    with pytest.raises(UsageError, match="whitespace"):
        nixremote.nix_sshopts(Path("/my cfg/ssh_config"))


def test_builder_settings_and_fit():
    systems, features = nixremote.parse_builder_nix(
        {"system": "x86_64-linux", "extra-platforms": "i686-linux aarch64-linux", "system-features": "kvm nixos-test"})
    assert systems == ("x86_64-linux", "i686-linux", "aarch64-linux") and features == {"kvm", "nixos-test"}
    image = config().image("nixos-x86_64")
    nixremote.check_fit(route(), parse_show_derivation(json.dumps({"/d.drv": {
        "system": "x86_64-linux", "env": {"requiredSystemFeatures": "kvm"}}})), image)
    with pytest.raises(HostUnsuitable) as err:
        nixremote.check_fit(route("big-parallel"), parse_show_derivation(json.dumps({"/d.drv": {
            "system": "x86_64-linux", "env": {"requiredSystemFeatures": "kvm"}}})), image)
    assert "needs x86_64-linux with kvm: hal9000's nix lacks the feature kvm" in err.value.message


def test_ssh_ng_build_argv_evaluates_here_and_builds_there(tmp_path):
    cfg = config()
    image = cfg.image("nixos-aarch64")
    plan = make_build_plan(cfg, image, distros.profile(image), facts(), Accel.AUTO, tmp_path / "k",
                           route=route(systems=("aarch64-linux",)))
    # the same staged copy of nixos/ (with the build key) as a local build: evaluated here
    staged = f"path:{nixos.staged_flake(tmp_path / 'stage')}"
    argv = nix.build_argv(plan, tmp_path / "stage", flake=staged)
    assert argv[:5] == ["nix", "--extra-experimental-features", "nix-command flakes", "build",
                        f"{staged}#packages.aarch64-linux.nixos-aarch64-image"]
    i = argv.index("--store")
    assert argv[i + 1] == "ssh-ng://hal9000" and argv[argv.index("--eval-store") + 1] == "auto"
    assert "--no-link" in argv and "--json" in argv and "--out-link" not in argv and "--impure" not in argv
    # a foreign-arch image built elsewhere is planned, not refused; its accelerator is only a boot test's
    assert plan.accel.accel is Accel.TCG and plan.route is not None
    shown = nix.NixDriver(distros.profile(plan.image)).command(plan, tmp_path / "stage")
    assert shown[4] == "<prepared at build time: flake>#packages.aarch64-linux.nixos-aarch64-image"
    assert shown[:4] + shown[5:] == argv[:4] + argv[5:]


def test_result_line_of_nix_build_json():
    path = "/nix/store/" + "q" * 32 + "-fixture-nixos-image"
    line = json.dumps([{"drvPath": "/nix/store/x.drv", "outputs": {"out": path}}], separators=(",", ":"))
    assert nixremote.out_path(line) == path
    assert nixremote.out_path("@nix {}") is None and nixremote.out_path('[{"drvPath": 1}]') is None
    evil = json.dumps([{"drvPath": "d", "outputs": {"out": "/tmp/$(touch x)"}}], separators=(",", ":"))
    assert nixremote.out_path(evil) is None


def test_pick_image_of_a_folder_output():
    image = config().image("nixos-x86_64")
    assert nix.pick_image(["nix-support", "nixos.qcow2"], image, "/o") == "nixos.qcow2"
    assert nix.pick_image(["disk.qcow2", "readme"], image, "/o") == "disk.qcow2"
    with pytest.raises(BuildFailed, match="no single qcow2 image"):
        nix.pick_image(["a.qcow2", "b.qcow2"], image, "/o")


# --------------------------------------------------------------------------------- configured builders


ARM = parse_line("ssh-ng://linux-builder aarch64-linux - 4 1 kvm,big-parallel", "")
X86_NO_KVM = parse_line("ssh://x86 x86_64-linux - 1 1 big-parallel", "")


def test_a_foreign_image_goes_to_a_fitting_configured_builder_instead_of_being_refused():
    cfg = config()
    arm = cfg.image("nixos-aarch64")
    profile = nixos.PROFILE
    assert profile.host_problem(arm, facts(builders=(ARM,)), cfg) is None
    got = profile.engine_route(arm, facts(builders=(ARM, X86_NO_KVM)), cfg, None)
    assert isinstance(got, nixremote.NixBuilders) and got.machines == (ARM,) and got.where == "ssh-ng://linux-builder"
    assert got.as_manifest()["route"] == "nix-builders"
    # the host can build it itself: nix builds here (and uses its builders as it sees fit)
    assert profile.engine_route(cfg.image("nixos-x86_64"), facts(builders=(ARM,)), cfg, None) is None


X86_KVM = parse_line("ssh-ng://hal9000 x86_64-linux - 2 1 kvm,big-parallel", "")


def test_a_host_whose_nix_lacks_kvm_hands_its_own_arch_to_a_configured_builder():
    cfg = config()
    x86 = cfg.image("nixos-x86_64")
    no_kvm = facts(builders=(X86_NO_KVM, X86_KVM), features="big-parallel")
    got = nixos.PROFILE.engine_route(x86, no_kvm, cfg, None)
    assert isinstance(got, nixremote.NixBuilders) and got.machines == (X86_KVM,)
    # no builder with kvm: nix builds here, with the kvm warning
    assert nixos.PROFILE.engine_route(x86, facts(builders=(X86_NO_KVM,), features=""), cfg, None) is None
    plan = make_build_plan(cfg, x86, distros.profile(x86), no_kvm, Accel.AUTO, Path("/k"), route=got)
    assert nixos.PROFILE.announce(plan, no_kvm).splitlines()[0] == (  # type: ignore[union-attr]
        "nix builds it on nix's configured builders: " + X86_KVM.describe())


def test_macos_with_a_linux_builder():
    cfg = config()
    mac = facts("arm64", "darwin", builders=(ARM,))
    assert nixos.PROFILE.host_problem(cfg.image("nixos-aarch64"), mac, cfg) is None
    problem = nixos.PROFILE.host_problem(cfg.image("nixos-x86_64"), mac, cfg)
    assert isinstance(problem, HostUnsuitable)
    assert "nix's configured builders cannot: ssh-ng://linux-builder builds aarch64-linux, not x86_64-linux" in problem.render()


def test_no_builder_names_the_nix_setting():
    cfg = config()
    problem = nixos.PROFILE.host_problem(cfg.image("nixos-aarch64"), facts(builders=(X86_NO_KVM,)), cfg)
    assert problem is not None and "ssh://x86 builds x86_64-linux, not aarch64-linux" in problem.render()
    problem = nixos.PROFILE.host_problem(cfg.image("nixos-aarch64"), facts(), cfg)
    assert problem is not None and "`builders` in nix.conf or /etc/nix/machines" in problem.render()


def test_builder_option_is_for_nix_images_only():
    cfg = config()
    from pipeline import distros

    with pytest.raises(UsageError) as err:
        distros.profile(cfg.image("demo-x86_64")).engine_route(cfg.image("demo-x86_64"), facts(), cfg, HAL)
    assert "remote-sync-build hal9000 --image demo-x86_64" in (err.value.hint or "")


def test_doctor_lists_builders_and_what_they_can_build():
    cfg = config()
    report = doctor.report(cfg, facts(builders=(ARM, X86_NO_KVM)))
    rows = {b["uri"]: b for b in report.nix_builders}
    assert rows["ssh-ng://linux-builder"]["usable_for"] == ["nixos-aarch64"]
    assert rows["ssh://x86"]["not_usable"]["nixos-x86_64"] == "lacks the feature kvm"
    text = doctor.format_text(report)
    assert "ssh-ng://linux-builder  aarch64-linux; big-parallel, kvm  [builders]" in text
    assert "usable for: nixos-aarch64" in text and "demo" not in text.split("nix's remote builders")[1]
    assert "none configured" in doctor.format_text(doctor.report(cfg, facts()))


def test_log_names_the_builder_nix_sent_a_build_to():
    line = ('@nix {"action":"start","fields":["/nix/store/4ix9cy6xnsabca920qwwd4g8mb3vf77s-hello-2.12.1.drv",'
            '"ssh-ng://hal9000",1,1],"id":7,"level":3,"text":"building","type":105}')
    ev = nixlog.LogParser().feed(line)
    assert ev is not None and ev.message == "building hello-2.12.1 on ssh-ng://hal9000"


# --------------------------------------------------------------------------------- flake.lock


def test_sync_protects_a_lock_the_builder_wrote():
    argv = rsync.push_argv(Path("/src"), "hal9000", "imagepipe", None)
    assert "--filter=P flake.lock" in argv and "--delete" in argv
    assert argv.index("--filter=P flake.lock") < argv.index("/src/")


LOCK = {"nodes": {"nixpkgs": {"locked": {"rev": "0123456789abcdef0123"}}, "root": {"inputs": {"nixpkgs": "nixpkgs"}}},
        "root": "root", "version": 7}


def test_a_fetched_lock_becomes_the_project_lock_only_when_there_is_none(tmp_path):
    fetched = tmp_path / "build" / "flake.lock"
    fetched.parent.mkdir()
    fetched.write_text(json.dumps(LOCK))
    local = tmp_path / "nixos" / "flake.lock"
    local.parent.mkdir()
    said = nix.adopt_lock(fetched, local, tmp_path)
    assert said == ("nixos/flake.lock written from the lock the builder's nix wrote for this build "
                    "(nixpkgs 0123456789ab): commit it")
    assert local.read_text() == fetched.read_text()
    assert nix.adopt_lock(fetched, local, tmp_path) is None  # the same lock: nothing to say
    other = {**LOCK, "nodes": {**LOCK["nodes"], "nixpkgs": {"locked": {"rev": "fedcba9876543210"}}}}
    local.write_text(json.dumps(other))
    said = nix.adopt_lock(fetched, local, tmp_path)
    assert said is not None and said.startswith("warning:") and "fedcba987654 here" in said
    assert json.loads(local.read_text()) == other  # never overwritten
    local.unlink()
    local.symlink_to(tmp_path / "elsewhere")
    assert "not a regular file" in (nix.adopt_lock(fetched, local, tmp_path) or "")
    assert not (tmp_path / "elsewhere").exists()  # nothing written through the link
    assert nix.adopt_lock(tmp_path / "none", local, tmp_path) is None


def test_the_describe_lines_stay_short():
    m = parse_line("ssh-ng://h x86_64-linux,i686-linux - 4 1 kvm", "")
    assert m.describe() == "ssh-ng://h (x86_64-linux, i686-linux; kvm; 4 jobs)"
    assert shlex.split(route().env()["NIX_SSHOPTS"])[0] == "-F"


def test_a_custom_image_is_pointed_at_the_builder_option():
    cfg = load({"images": {"edge": {"distro": "nixos", "arch": "aarch64", "flake": "./infra"}}}, root=ROOT)
    problem = nixos.PROFILE.host_problem(cfg.image("edge"), facts(), cfg)
    assert problem is not None and "invoke build edge --builder HOST" in problem.render()


def test_a_builder_whose_kvm_gives_no_kvm_is_warned_about():
    """nix-darwin's linux-builder lists kvm but runs under Apple's hypervisor (no KVM inside):
    make-disk-image's QEMU falls back to TCG. Read over ssh for --builder, inferred for nix's
    configured builders on a Mac."""
    image = config().image("nixos-aarch64")
    with_kvm = dataclasses.replace(route(systems=("aarch64-linux",)), kvm="imagepipe-kvm: missing no-virt")
    said = nixremote.tcg_warning(with_kvm, image, "darwin")
    assert said and "will run under TCG" in said and "read on hal9000: its nix lists kvm, but it has no /dev/kvm" in said
    good = dataclasses.replace(with_kvm, kvm="imagepipe-kvm: present no-virt")  # arm: /dev/kvm is the answer
    assert nixremote.tcg_warning(good, image, "darwin") is None
    x86 = config().image("nixos-x86_64")
    hang = dataclasses.replace(route(), kvm="imagepipe-kvm: present no-virt")
    assert "CPU has no vmx/svm flag" in (nixremote.tcg_warning(hang, x86, "linux") or "")
    assert nixremote.tcg_warning(dataclasses.replace(route(), kvm="imagepipe-kvm: present virt"), x86, "linux") is None
    assert nixremote.tcg_warning(dataclasses.replace(route(), kvm=None), x86, "linux") is None  # not read: no claim
    vm = Machine("ssh-ng://builder@linux-builder", ("aarch64-linux",), supported=frozenset({"kvm", "benchmark"}))
    said = nixremote.tcg_warning(nixremote.NixBuilders((vm,)), image, "darwin")
    assert said and "inferred, not read" in said and "ssh-ng://builder@linux-builder" in said
    assert nixremote.tcg_warning(nixremote.NixBuilders((vm,)), image, "linux") is None
    far = Machine("ssh-ng://arm.example.org", ("aarch64-linux",), supported=frozenset({"kvm"}))
    assert nixremote.tcg_warning(nixremote.NixBuilders((far,)), image, "darwin") is None  # a real machine: no guess


def test_the_builder_probe_reads_kvm_from_this_machine():
    """BUILDER_PROBE's kvm line, run here by sh (the builder side is a POSIX shell)."""
    import subprocess

    out = subprocess.run(["sh", "-c", nixremote.BUILDER_PROBE.split("nix --version; ", 1)[1].split("; nix ", 1)[0]],
                         capture_output=True, text=True, timeout=30).stdout
    found = nixremote.KVM_LINE.search(out)
    assert found, out
    assert (found.group(1) == "present") == Path("/dev/kvm").exists()
