"""Instances without a VM: the seed's rendering, shared folders (parsing, the host/guest decision,
virtiofsd), the port choice, the idle clock, records, retention's backing builds, the QEMU
devices an instance adds, and the builder-side `run` it asks for."""

from __future__ import annotations

import email
import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.base.errors import HostUnsuitable, UsageError
from pipeline.model import Accel, Arch, Firmware, Image
from pipeline.output import retention
from pipeline.plan import AccelChoice
from pipeline.vm import idle, instances, on_builder, seed, shares
from pipeline.vm.argv import Attached, RunOptions, ShareDevice, qemu_argv
from pipeline.vm.state import StatePaths

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoDemoDemoDemoDemoDemoDemoDemoDemoDemoDemo me@laptop"


def a_seed(**kw) -> seed.Seed:
    base = {"instance_id": "iid-imagepipe-1", "hostname": "web1", "user": "admin", "keys": (KEY,)}
    return seed.Seed(**{**base, **kw})


# ------------------------------------------------------------------------------- seed


def test_meta_data_and_plain_cloud_config():
    assert yaml.safe_load(seed.meta_data(a_seed())) == {"instance-id": "iid-imagepipe-1", "local-hostname": "web1"}
    text = seed.user_data(a_seed())
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["users"] == [{"name": "admin", "lock_passwd": False, "ssh_authorized_keys": [KEY]}]
    assert data["manage_etc_hosts"] == "localhost" and data["disable_root"] is False
    assert data["bootcmd"] == [["sh", "-c", seed.BOOTCMD]]
    assert f"  - {KEY}" in text.splitlines()  # one line per key: what the demo's init reads


def test_user_cloud_config_comes_first_and_ours_merges_into_it():
    mine = "#cloud-config\npackages: [git]\nhostname: override\n"
    msg = email.message_from_string(seed.user_data(a_seed(user_data=mine)))
    assert msg.get_content_type() == "multipart/mixed"
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/cloud-config"]
    assert parts[0].get_payload(decode=True).decode() == mine
    ours = yaml.safe_load(parts[1].get_payload(decode=True).decode())
    assert ours["merge_how"] == seed.MERGE_HOW and ours["users"][0]["name"] == "admin"


def test_a_script_is_its_own_part_and_other_kinds_are_refused(tmp_path):
    msg = email.message_from_string(seed.user_data(a_seed(user_data="#!/bin/sh\ntouch /x\n")))
    assert [p.get_content_type() for p in msg.walk() if not p.is_multipart()] == ["text/x-shellscript",
                                                                                 "text/cloud-config"]
    for text, why in (("#include http://x\n", "must start with"), ("#cloud-config\n- a\n- b\n", "mapping"),
                      ("#cloud-config\nkey: [unclosed\n", "not valid YAML")):
        path = tmp_path / "ud"
        path.write_text(text)
        with pytest.raises(UsageError, match=why):
            seed.check_user_data(path)
    with pytest.raises(UsageError, match="no such file"):
        seed.check_user_data(tmp_path / "missing")


def test_boot_script_mounts_each_share_by_its_kind():
    text = seed.boot_script("web1", (seed.SeedShare("src", "virtiofs"), seed.SeedShare("data", "9p")))
    assert text.startswith("#!/bin/sh\n")
    assert text.rstrip().splitlines()[-2:] == ["share virtiofs src", "share 9p data"]
    assert 'mount -t virtiofs "$2" "/mnt/$2"' in text and "trans=virtio,version=9p2000.L" in text


@pytest.mark.parametrize(("name", "host"), [("web1", "web1"), ("demo-x86_64", "demo-x86-64"), ("A.b_c", "a-b-c")])
def test_hostname_for(name, host):
    assert seed.hostname_for(name) == host


def test_names():
    assert instances.check_name("web-1.dev_x") == "web-1.dev_x"
    for bad in ("", "../x", ".hidden", "a/b", "a b", "-x", "x" * 64):
        with pytest.raises(UsageError):
            instances.check_name(bad)


# ------------------------------------------------------------------------------- shares


def test_share_specs(tmp_path):
    (tmp_path / "my src").mkdir()
    (tmp_path / "data").mkdir()
    got = shares.parse_shares([f"{tmp_path / 'my src'}", f"{tmp_path / 'data'}:store"])
    assert got == (shares.Share(str(tmp_path / "my src"), "my-src"), shares.Share(str(tmp_path / "data"), "store"))
    assert shares.parse_shares(["none"]) == ()
    assert shares.split_spec("/a:b/c") == ("/a:b/c", None)  # ':' inside a path is the path's
    with pytest.raises(UsageError, match="given twice"):
        shares.parse_shares([f"{tmp_path / 'data'}:t", f"{tmp_path / 'my src'}:t"])


def test_share_paths_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UsageError, match="does not exist"):
        shares.check_folder(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="not a folder"):
        shares.check_folder(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="symbolic link to /etc") as err:
        shares.check_folder(str(tmp_path / "link"))
    assert "share /etc itself" in (err.value.hint or "")


LINUX_VFS = shares.HostShares(Path("/usr/libexec/virtiofsd"), vhost_user_fs=True, virtio_9p=True)
LINUX_NO_VFSD = shares.HostShares(None, vhost_user_fs=True, virtio_9p=True)
MACOS = shares.HostShares(None, vhost_user_fs=False, virtio_9p=True, os="darwin")
VIRTIOFS = frozenset({"virtiofs"})
BOTH = frozenset({"virtiofs", "9p"})


@pytest.mark.parametrize(("host", "guest", "want"), [
    (LINUX_VFS, VIRTIOFS, "virtiofs"), (LINUX_VFS, BOTH, "virtiofs"),
    (LINUX_NO_VFSD, BOTH, "9p"), (MACOS, BOTH, "9p"),
])
def test_share_method(host, guest, want):
    assert shares.choose_method(host, guest, "img") == want


def test_a_share_that_cannot_work_says_which_side_lacks_what():
    with pytest.raises(HostUnsuitable) as mac:
        shares.choose_method(MACOS, VIRTIOFS, "debian13-x86_64")
    text = mac.value.message
    assert "no vhost-user" in text and "(debian13-x86_64) has no 9p" in text
    with pytest.raises(HostUnsuitable) as linux:
        shares.choose_method(LINUX_NO_VFSD, VIRTIOFS, "debian13-x86_64")
    assert "this host has no virtiofsd" in linux.value.message and "apt-get install virtiofsd" in linux.value.hint


def test_qemu_device_list_and_virtiofsd_kinds():
    listing = 'name "virtio-9p-pci", bus PCI\nname "vhost-user-fs-pci", bus PCI\nname "e1000"\n'
    assert shares.parse_devices(listing) == (True, True)
    assert shares.parse_devices('name "e1000"\n') == (False, False)
    assert shares.is_rust("Usage: virtiofsd [OPTIONS]\n      --shared-dir <SHARED_DIR>")
    assert not shares.is_rust("usage: virtiofsd [options]\n    -o source=PATH")
    assert shares.virtiofsd_argv(Path("/v"), True, Path("/s.sock"), "/d") == [
        "/v", "--socket-path=/s.sock", "--shared-dir=/d", "--cache=auto"]
    assert shares.virtiofsd_argv(Path("/v"), False, Path("/s.sock"), "/d") == [
        "/v", "--socket-path=/s.sock", "-o", "source=/d", "-o", "cache=auto"]


def test_finding_virtiofsd(tmp_path):
    none: dict[str, str] = {}
    assert shares.find_virtiofsd(which=lambda _n: "/bin/virtiofsd", exists=lambda _p: True) == Path("/bin/virtiofsd")
    old = shares.find_virtiofsd(which=lambda _n: None, exists=lambda p: p == "/usr/lib/qemu/virtiofsd",
                                descriptors=lambda: [])
    assert old == Path("/usr/lib/qemu/virtiofsd")
    assert shares.find_virtiofsd(which=lambda _n: None, exists=lambda p: p in none, descriptors=lambda: []) is None
    with pytest.raises(UsageError, match=r"defaults\.virtiofsd"):
        shares.find_virtiofsd(str(tmp_path / "missing"))
    desc = tmp_path / "50-fs.json"
    desc.write_text(json.dumps({"type": "fs", "binary": "/opt/vfsd"}))
    (tmp_path / "60-gpu.json").write_text(json.dumps({"type": "gpu", "binary": "/opt/gpu"}))
    assert shares.vhost_user_binaries([str(tmp_path)]) == ["/opt/vfsd"]


# ------------------------------------------------------------------------------- argv


def test_an_instance_adds_its_seed_after_the_disk_and_its_shares():
    image = Image(name="deb", distro="almalinux", arch=Arch.X86_64, firmware=Firmware.BIOS, memory=1024, cpus=2)
    state = StatePaths(Path("/out/instances/web1"))
    attached = Attached(Path("/out/instances/web1/seed.iso"), (
        ShareDevice("src", "virtiofs", socket=Path("/s/vfs-src.sock")), ShareDevice("data", "9p", path=Path("/d"))))
    argv = qemu_argv(image, AccelChoice(Accel.TCG, "t"), None, state.disk, state, 2230,
                     opts=RunOptions(isolated=True), attached=attached, name="web1")
    assert argv[argv.index("-name") + 1] == "web1"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == ["if=none,id=disk0,format=qcow2,file=/out/instances/web1/disk.qcow2",
                      "if=none,id=seed,format=raw,readonly=on,file=/out/instances/web1/seed.iso"]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("virtio-blk")]
    assert devices[0].startswith("virtio-blk-pci,drive=disk0,") and devices[1] == "virtio-blk-pci,drive=seed,id=seed-disk"
    assert "memory-backend-memfd,id=mem0,size=1024M,share=on" in argv and "node,memdev=mem0" in argv
    assert "vhost-user-fs-pci,chardev=vfs0,tag=src" in argv and "socket,id=vfs0,path=/s/vfs-src.sock" in argv
    assert "local,id=fs1,path=/d,mount_tag=data,security_model=none" in argv
    assert argv[argv.index("-netdev") + 1] == "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2230-:22"
    plain = qemu_argv(image, AccelChoice(Accel.TCG, "t"), None, state.disk, state, 2230)
    assert not any("memory-backend" in a or "seed.iso" in a for a in plain)
    assert "restrict=on" not in plain[plain.index("-netdev") + 1]


# ------------------------------------------------------------------------------- ports


def test_port_choice():
    free = {2224, 2230, 40000}.__contains__
    others = {2230: "web2"}
    assert instances.choose_port("a", None, None, 2224, others, free) == (2224, None)
    assert instances.choose_port("a", None, None, 2230, others, free, lambda: 40000) == (40000, None)
    assert instances.choose_port("a", None, 2224, 2222, others, free) == (2224, None)
    port, why = instances.choose_port("a", None, 2225, 2222, others, free, lambda: 40000)
    assert port == 40000 and why == "port 2225 is taken now: a moves to port 40000"
    assert instances.choose_port("a", 40000, 2224, 2222, others, free) == (40000, None)
    with pytest.raises(UsageError, match="SSH port of instance web2"):
        instances.choose_port("a", 2230, None, 2222, others, free)
    with pytest.raises(UsageError, match="taken by another program"):
        instances.choose_port("a", 2299, None, 2222, others, free)
    assert instances.choose_port("a", 0, 2224, 2222, others, free, lambda: 40000) == (40000, None)


# ------------------------------------------------------------------------------- idle


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:08C0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:08C0 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:08C1 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


def test_ssh_sessions_and_cpu_time():
    assert idle.sessions(0x08C0, [TCP, ""]) == 1    # the listening socket (0A) is no session
    assert idle.sessions(2230, [TCP]) == 0
    stat = "123 (qemu-system-x86) S " + " ".join(["0"] * 10) + " 250 150 0 0"
    assert idle.cpu_seconds(stat, 100) == 4.0


def test_idle_clock_restarts_on_activity():
    clock = idle.IdleClock(limit=6)
    assert not clock.sample(2, 0, 0.01) and not clock.sample(2, 0, 0.01)
    assert not clock.sample(2, 1, 0.0) and clock.idle_for == 0          # an SSH session
    assert not clock.sample(2, 0, 1.5) and clock.idle_for == 0          # a busy guest
    assert not clock.sample(2, 0, None)                                 # unknown: not idle
    assert [clock.sample(2, 0, 0.0) for _ in range(3)] == [False, False, True]
    assert idle.interval_for(6) == 1 and idle.interval_for(1800) == 15
    assert idle.minutes(30) == "30 min" and idle.minutes(0.5) == "0.5 min (30 s)"


# ------------------------------------------------------------------------------- records + retention


def test_record_round_trip_and_backing_builds_kept(tmp_path):
    rec = instances.Record(name="web1", image="demo", build_id="b1", backing="../../demo/builds/b1/demo.qcow2",
                           backing_format="qcow2", created=1.0, ssh_port=2230, instance_id="iid-1",
                           shares=(shares.Share("/src", "src"),), idle_stop=0.5, keys=(KEY,))
    assert instances.Record.from_json(json.loads(json.dumps(rec.as_json()))) == rec
    for name, build, on in (("web1", "b1", None), ("web2", "b1", None), ("far", "b0", "hal9000"), ("other", "b0", None)):
        folder = tmp_path / "instances" / name
        folder.mkdir(parents=True)
        image = "demo" if name != "other" else "nixos"
        (folder / "instance.json").write_text(json.dumps({"image": image, "build_id": build, "on": on}))
    (tmp_path / "instances" / "broken").mkdir()
    (tmp_path / "instances" / "broken" / "instance.json").write_text("{")
    assert retention.backed_builds(tmp_path, "demo") == {"b1": ["web1", "web2"]}
    image_dir = tmp_path / "demo"
    for build in ("b0", "b1", "b2", "b3"):
        (image_dir / "builds" / build).mkdir(parents=True)
        (image_dir / "builds" / build / "manifest.json").write_text("{}")
    os.symlink("builds/b3", image_dir / "current")
    gc = retention.plan(tmp_path, "demo", 1, {})
    assert gc.removed == ["b0", "b2"] and gc.backing == {"b1": ["web1", "web2"]}
    assert "kept b1: the disk of instances web1, web2 is an overlay on it" in gc.in_use_text()


# ------------------------------------------------------------------------------- on a builder


class Facts:
    def __init__(self, tools: set[str], firmware: set[Arch]) -> None:
        self.tools, self.firmware, self.package_manager = tools, dict.fromkeys(firmware, object()), "apt"

    def tool(self, name: str):  # type: ignore[no-untyped-def]
        return type("T", (), {"found": name in self.tools})()


def test_a_builder_without_qemu_or_firmware_is_refused_with_the_hint():
    from pipeline.builders.remote import Target

    target = Target("hal9000", "hal9000", "imagepipe")
    uefi = Image(name="deb", distro="almalinux", arch=Arch.X86_64, firmware=Firmware.UEFI)
    with pytest.raises(HostUnsuitable) as err:
        on_builder.check_builder(uefi, Facts({"qemu-img"}, {Arch.X86_64}), target)
    assert "has no qemu-system-x86_64" in err.value.message and "apt-get install qemu-system-x86" in err.value.hint
    with pytest.raises(HostUnsuitable) as err:
        on_builder.check_builder(uefi, Facts({"qemu-img", "qemu-system-x86_64"}, set()), target)
    assert "no UEFI firmware for x86_64" in err.value.message and "apt-get install ovmf" in err.value.hint
    on_builder.check_builder(uefi, Facts({"qemu-img", "qemu-system-x86_64"}, {Arch.X86_64}), target)


def test_the_builder_side_run():
    image = Image(name="demo-x86_64", distro="demo", arch=Arch.X86_64)
    req = instances.Request(name="web1", port=0, shares=("/srv/src:src",), idle_stop=0.5, network="isolated",
                            authorize=("ssh-ed25519 BBBB",))
    assert on_builder.run_args(image, req, "", "ssh-ed25519 AAAA") == [
        "run", "demo-x86_64", "--name", "web1", "--wait", "--authorize-key", "ssh-ed25519 AAAA",
        "--authorize-key", "ssh-ed25519 BBBB", "--network", "isolated", "--port", "0", "--share", "/srv/src:src",
        "--idle-stop", "0.5"]
