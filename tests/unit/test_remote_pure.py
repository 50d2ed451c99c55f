import shlex
from pathlib import Path

import pytest

from pipeline import fetch
from pipeline.base.errors import (
    BuilderUnreachable,
    BuildFailed,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnsuitable,
    UsageError,
)
from pipeline.base.events import Outcome
from pipeline.builders import dispatch, openssh, remote, rsync, transfer
from pipeline.config import load
from pipeline.model import Arch, Builder

STATS = """
Number of files: 57 (reg: 45, dir: 12)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 1
Total file size: 1,073,741,824 bytes
Total transferred file size: 2,345 bytes
Literal data: 1,234 bytes
Matched data: 1,111 bytes
File list size: 0
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 1,903
Total bytes received: 35

sent 1,903 bytes  received 35 bytes  3,876.00 bytes/sec
"""


def test_parse_stats():
    s = rsync.parse_stats(STATS)
    assert (s.files, s.transferred, s.total_size, s.literal, s.sent, s.received) == (57, 1, 1 << 30, 1234, 1903, 35)
    assert s.matched == 1111
    assert s.wire == 1938
    assert rsync.parse_stats("garbage") == rsync.Stats()


def test_ssh_command_for_rsync_is_a_quoted_argv():
    argv = rsync.pull_argv("hal9000", ["dir with space/x.qcow2"], Path("/tmp/st"), Path("/cfg/my ssh config"))
    e = argv[argv.index("-e") + 1]
    assert shlex.split(e) == ["ssh", "-F", "/cfg/my ssh config", "-o", "BatchMode=yes",
                              "-o", "StrictHostKeyChecking=yes"]
    assert "hal9000:dir with space/x.qcow2" in argv and "--append-verify" in argv and "--inplace" in argv
    fresh = rsync.pull_argv("h", ["x"], Path("/d"), None, resume=False, ssh_extra=["-o", "ControlPath=/t/cm"])
    assert "--append-verify" not in fresh and "--whole-file" in fresh and "--inplace" in fresh
    assert shlex.split(fresh[fresh.index("-e") + 1])[-2:] == ["-o", "ControlPath=/t/cm"]
    # a follower hashes what rsync writes in order: nothing may be seeked over (see pipeline.builders.follow)
    assert not any(a.startswith(("--sparse", "-S", "--preallocate")) for a in argv + fresh)
    push = rsync.push_argv(Path("/src"), "hal9000", "imagepipe", None)
    assert push[-2:] == ["/src/", "hal9000:imagepipe/"] and "--delete" in push and "--exclude=/.git" in push
    assert "-F" not in shlex.split(push[push.index("-e") + 1])


@pytest.mark.parametrize("host", ["hal9000", "builder-1.example.org", "root@hal9000", "a_b"])
def test_good_hosts(host):
    assert remote.check_host(host) == host


@pytest.mark.parametrize("host,why", [
    ("-oProxyCommand=x", "starts with '-'"), ("a b", "whitespace"), ("a;b", "shell operator"),
    ("$(id)", "command substitution"), ("`id`", "command substitution"), ("a\nb", "line break"),
    ("'a'", "quote"), ("a:b", "':'"), ("", "empty"), ("root@-x", "only letters"),
])
def test_bad_hosts(host, why):
    with pytest.raises(UsageError) as exc:
        remote.check_host(host)
    assert why in exc.value.message


@pytest.mark.parametrize("raw,expected", [("~/imagepipe", "imagepipe"), ("~", "."), ("/srv/b", "/srv/b"),
                                          ("rel/dir", "rel/dir"), ("/a/./b", "/a/./b")])
def test_good_dirs(raw, expected):
    assert remote.check_dir(raw) == expected


@pytest.mark.parametrize("raw", ["..", "../x", "/a/../../b", "~/x/../..", "-x", "~root", "a\nb", " "])
def test_bad_dirs(raw):
    with pytest.raises(UsageError):
        remote.check_dir(raw)


def test_in_dir_keeps_the_directory_out_of_the_script():
    argv = remote.in_dir("/tmp/x; rm -rf /", ["invoke", "build", "demo"])
    assert argv[:3] == ["sh", "-c", remote.IN_DIR] and argv[4] == "/tmp/x; rm -rf /"
    assert shlex.split(shlex.join(argv)) == argv


# someone can log in (config load refuses an image nobody can log in to: pipeline.contract)
LOGIN = [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin test"]}]


def test_resolve_configured_and_alias(tmp_path):
    raw = {"images": {"demo": {"distro": "demo", "arch": "x86_64", "users": LOGIN}},
           "builders": {"big": {"host": "hal9000", "dir": "~/b", "arch": "aarch64"}}}
    cfg = load(raw, tmp_path)
    t = remote.resolve(cfg, "big")
    assert (t.host, t.dir, t.arch, t.ssh_config) == ("hal9000", "b", Arch.AARCH64, None)
    alias = remote.resolve(cfg, "other-host")
    assert (alias.host, alias.dir, alias.arch) == ("other-host", "imagepipe", None)
    with pytest.raises(UsageError):
        remote.resolve(cfg, "big", str(tmp_path / "missing_ssh_config"))


def test_known_hosts_files_from_ssh_config():
    assert remote.known_hosts_files({"userknownhostsfile": "/a/kh /b/kh"}) == [Path("/a/kh"), Path("/b/kh")]
    assert remote.known_hosts_files({}) == [Path("~/.ssh/known_hosts").expanduser()]


def test_line_sink_splits_lines():
    got = []
    sink = remote.LineSink(got.append)
    sink.write("a\nb")
    sink.write("c\r\nd")
    sink.close()
    assert got == ["a", "bc", "d"]


def test_parse_sums_refuses_paths():
    h = "a" * 64
    assert fetch.parse_sums(f"{h}  vmlinuz\n{h}  *initrd.img\n") == {"vmlinuz": h, "initrd.img": h}
    assert fetch.parse_sums(f"{h}  vmlinuz\n") == {"vmlinuz": h}
    for bad in (f"{h}  ../../etc/passwd", f"{h}  /etc/passwd", "zz  file", f"{h}  a/b"):
        with pytest.raises(BuildFailed):
            fetch.parse_sums(bad)


def _img(name: str, arch: str):
    return load({"images": {name: {"distro": "almalinux", "arch": arch, "users": LOGIN}}}, Path("/")).images[name]


def test_assign_spreads_by_arch_and_load():
    x1, x2, a1 = _img("x1", "x86_64"), _img("x2", "x86_64"), _img("a1", "aarch64")
    builders = {"b1": Builder("b1", "h1", arch=Arch.X86_64), "b2": Builder("b2", "h2", arch=Arch.X86_64),
                "arm": Builder("arm", "h3", arch=Arch.AARCH64)}
    assert dispatch.assign([x1, x2, a1], builders) == {"b1": ["x1"], "b2": ["x2"], "arm": ["a1"]}
    assert dispatch.assign([x1, a1], builders, host="one") == {"one": ["x1", "a1"]}
    with pytest.raises(HostUnsuitable):
        dispatch.assign([a1], {"b1": builders["b1"]})
    assert dispatch.assign([a1], {"any": Builder("any", "h")}) == {"any": ["a1"]}


def test_summary_table():
    rows = [Outcome("demo-x86_64", "ok", builder="hal9000", exit_code=0, seconds=31.2),
            Outcome("nixos-aarch64", "not run", "cannot connect", builder="arm", exit_code=4)]
    text = dispatch.summary(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["image", "builder", "status", "exit", "time"]
    assert lines[2].split() == ["demo-x86_64", "hal9000", "ok", "0", "31s"]
    assert "nixos-aarch64 on arm: cannot connect" in text


def test_one_pass_accepts_exactly_the_new_bytes_once():
    grown = {"img": 100, "vmlinuz": 10}
    assert transfer.one_pass(rsync.Stats(literal=110), {}, grown)
    assert transfer.one_pass(rsync.Stats(literal=60), {"img": 50}, grown)        # resumed after 50 bytes
    assert transfer.one_pass(rsync.Stats(), {"img": 100, "vmlinuz": 10}, grown)  # nothing to send
    assert not transfer.one_pass(rsync.Stats(literal=60, matched=100), {"img": 50}, grown)  # a second pass
    assert not transfer.one_pass(rsync.Stats(literal=170), {"img": 50}, grown)
    assert not transfer.one_pass(rsync.Stats(literal=100), {}, grown)


SSH_CHANGED = """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
Host key for [127.0.0.1]:2222 has changed and you have requested strict checking.
Host key verification failed.
"""


@pytest.mark.parametrize("stderr,kind,words", [
    (SSH_CHANGED, HostKeyChanged, "CHANGED"),
    (("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n"
      "Host key verification failed.\n"), HostKeyUnknown, "not in known_hosts"),
    ("root@127.0.0.1: Permission denied (publickey).\n", BuilderUnreachable, "authentication"),
    ("ssh: connect to host 127.0.0.1 port 9: Connection refused\n", BuilderUnreachable, "Connection refused"),
    ("", BuilderUnreachable, "without a message"),
])
def test_ssh_failures_become_typed_errors(stderr, kind, words):
    target = remote.Target("hal9000", "hal9000", "imagepipe")
    err = openssh.connection_error(target, stderr)
    assert type(err) is kind and words in err.message and err.hint and err.exit_code == 4
    assert "\n" not in err.message  # one line
