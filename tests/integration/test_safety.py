"""Hostile input and faults through the real CLI: planted links, dry runs, config values, YAML and
INVOKE_* errors, corrupt state, builder folders, escape sequences, SIGKILL, full and read-only
disks. Each test checks that nothing outside the project's folders changed (a sentinel tree:
names, modes, sizes, mtimes, contents, link targets), that no traceback reaches the user, and
that the last good image is still published."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.base.errors import UnsafePath
from pipeline.builders import remote
from pipeline.output.artifacts import read_manifest, verify_published
from pipeline.output.history import History
from pipeline.vm import instances, qmp
from tests.support import (
    NEEDS_PTY,
    ROOT,
    Background,
    invoke,
    published_copy,
    require_tool,
    wait_gone,
    wait_until,
    write_config,
)
from tests.support import live_processes_mentioning as processes_mentioning
from tests.support.sshd import SshHost, fake_published

IMAGE = "demo-x86_64"


# ------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree that a write or delete would change (links are not followed)."""
    seen: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what: tuple = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                what = ("dir",)
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_size, *what)
    top = os.lstat(root)
    seen["."] = (top.st_mode, top.st_mtime_ns)
    return seen


@pytest.fixture
def sentinel(tmp_path: Path):
    """A folder outside every imagepipe folder, holding names imagepipe uses (pid, console.log,
    known_hosts, manifest.json, ...): links planted in the output folder point here. The test
    fails if anything in it changed."""
    root = tmp_path / "sentinel"
    (root / "sub").mkdir(parents=True)
    for name in ("keep.txt", "pid", "console.log", "known_hosts", "build_id", "accel", "ssh_port",
                 "efivars.fd", "history.db", "imagepipe_ed25519", "tool-versions.json", "sub/deep.txt", "seed.iso"):
        (root / name).write_text(f"precious {name}\n")
    os.chmod(root / "keep.txt", 0o600)
    (root / "sub" / "link").symlink_to("../keep.txt")
    build = root / "20260101T000000Z-0000"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({
        "image": IMAGE, "build_id": build.name,
        "artifact": {"file": "disk.qcow2", "format": "qcow2", "size": 1, "sha256": "0" * 64}}))
    (build / "disk.qcow2").write_text("not yours")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something outside the output folder changed"


def no_traceback(res: subprocess.CompletedProcess[str]) -> str:
    """The output, checked for a Python traceback."""
    out = res.stdout + res.stderr
    assert "Traceback" not in out and 'File "' not in out, out
    return out


def error_lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------ planted links


def _plant(out: Path, sentinel: Path, kind: str) -> None:
    image_dir = out / IMAGE
    if kind == "image-dir":
        shutil.rmtree(image_dir)
        image_dir.symlink_to(sentinel)
    elif kind in (".staging", "logs", "run", "builds", "boot-test"):
        if (image_dir / kind).exists():
            shutil.move(str(image_dir / kind), str(out / f"moved-{kind}"))
        (image_dir / kind).symlink_to(sentinel)
    elif kind == ".lock":
        (image_dir / ".lock").symlink_to(sentinel / "keep.txt")
    elif kind == "staging-entry":
        (image_dir / ".staging").mkdir()
        (image_dir / ".staging" / "20260101T000000Z-dead").symlink_to(sentinel)
    elif kind == "current":
        (image_dir / "current").unlink()
        (image_dir / "current").symlink_to(sentinel / "20260101T000000Z-0000")
    elif kind == "history.db":
        for name in ("history.db", "history.db-wal", "history.db-shm"):
            (out / name).unlink(missing_ok=True)
        (out / "history.db").symlink_to(sentinel / "history.db")
    elif kind in (".keys", ".cache"):
        if (out / kind).exists():
            shutil.rmtree(out / kind)
        (out / kind).symlink_to(sentinel)
    elif kind == "instances":
        (out / "instances").symlink_to(sentinel)
    elif kind == "instance-files":  # in the folder of an instance that exists (its record is real)
        for name in ("console.log", "known_hosts", "pid", "build_id", "efivars.fd", "accel", "ssh_port", "seed.iso"):
            (out / "instances" / IMAGE / name).unlink(missing_ok=True)
            (out / "instances" / IMAGE / name).symlink_to(sentinel / name)
    else:
        raise AssertionError(kind)


# plant → [(command, expected exit code)]; refusals name the path and touch nothing
PLANTS = {
    ".staging": [(["gc"], 1), (["build-demo"], 1)],
    "builds": [(["gc"], 1), (["build-demo"], 1), (["run-demo", "--snapshot"], 2)],
    "logs": [(["gc"], 1), (["build-demo"], 1)],
    ".lock": [(["gc"], 1), (["build-demo"], 1)],
    "image-dir": [(["gc"], 1), (["build-demo"], 1), (["run-demo"], 2), (["status"], 0)],
    "run": [(["status"], 0), (["stop", IMAGE], 0)],  # a VM an earlier imagepipe started (output/IMAGE/run)
    "instances": [(["run-demo", "--snapshot"], 1), (["status"], 0), (["instances"], 0), (["stop", IMAGE], 0),
                  (["rm", IMAGE], 1)],
    "boot-test": [(["test-image", IMAGE], 1)],
    "current": [(["run-demo"], 2), (["test-image", IMAGE], 2), (["gc"], 0)],
    "history.db": [(["history"], 1), (["gc"], 1), (["build-demo"], 1)],
    ".keys": [(["build-demo"], 1), (["build-demo", "--dry-run"], 0)],
    ".cache": [(["build-demo"], 1)],
    "staging-entry": [(["gc"], 0)],
}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_planted_links_are_refused_never_followed(demo_build, tmp_path, sentinel, kind):
    cfg, out = published_copy(demo_build, tmp_path)
    _plant(out, sentinel, kind)
    for args, code in PLANTS[kind]:
        res = invoke(args, cfg, timeout=120)
        text = no_traceback(res)
        assert res.returncode == code, f"{args}: {text}"
        if code == 1:
            assert len(error_lines(res)) == 1, text
            assert "refusing to touch" in res.stderr or "symbolic link" in res.stderr, text
    if kind == "staging-entry":
        assert not (out / IMAGE / ".staging").exists()  # the planted link itself went, its target stayed
    if kind not in ("image-dir", "builds", "current"):
        assert verify_published(out / IMAGE)  # the last good image is untouched


def test_links_planted_in_the_vm_state_folder_are_replaced_not_written_through(demo_build, tmp_path, sentinel):
    cfg, out = published_copy(demo_build, tmp_path)
    assert invoke(["run-demo", "--snapshot", "--network", "isolated"], cfg, timeout=120).returncode == 0
    assert invoke(["stop", IMAGE, "--force"], cfg, timeout=120).returncode == 0
    _plant(out, sentinel, "instance-files")
    folder = out / "instances" / IMAGE
    try:
        res = invoke(["run-demo", "--snapshot"], cfg, timeout=120)
        assert res.returncode == 0, no_traceback(res)
        for name in ("console.log", "known_hosts", "build_id", "ssh_port", "accel", "seed.iso"):
            assert not (folder / name).is_symlink(), name
    finally:
        assert invoke(["stop", IMAGE, "--force"], cfg, timeout=120).returncode == 0
    # the instance's disk planted as a link: refused, the link's target untouched
    (folder / "disk.qcow2").unlink()
    (folder / "disk.qcow2").symlink_to(sentinel / "keep.txt")
    res = invoke(["run-demo"], cfg, timeout=120)
    assert res.returncode == 1 and "disk.qcow2: it is a symbolic link" in no_traceback(res), res.stderr


# ------------------------------------------------------------------------------ dry runs


def test_dry_runs_write_nothing(demo_build, tmp_path, sentinel):
    fresh = write_config(tmp_path / "fresh.yaml", tmp_path / "new-output")
    for args in (["build-demo", "--dry-run"], ["gc", "--dry-run"], ["history"], ["status"]):
        res = invoke(args, fresh, timeout=120)
        assert res.returncode == 0, no_traceback(res)
        assert not (tmp_path / "new-output").exists(), args
    cfg, out = published_copy(demo_build, tmp_path)
    before = snapshot(out)
    for args in (["build-demo", "--dry-run"], ["gc", "--dry-run"], ["build", IMAGE, "--dry-run", "--json"]):
        assert invoke(args, cfg, timeout=120).returncode == 0, args
    assert snapshot(out) == before


@pytest.mark.parametrize("where,why", [
    ("/", "it is the root folder /"),
    ("~", "your home folder"),
    (str(ROOT), "the project folder"),
    (str(ROOT.parent), "a folder above the project folder"),
    ("{sentinel}/keep.txt", "exists and is not a folder"),
    ("{tmp}/out,x", "must not contain ','"),
    ("{tmp}/out\nx", "without control characters"),
])
def test_output_dir_must_be_a_folder_of_its_own(tmp_path, sentinel, where, why):
    top = set(os.listdir("/"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"output_dir": where.format(sentinel=sentinel, tmp=tmp_path)}}))
    if Path(where).expanduser().resolve() == Path.home().resolve():  # e.g. a checkout at ~/imagepipe
        why = "your home folder"
    for args in (["build-demo", "--dry-run"], ["gc"], ["history"], ["run-demo"]):
        res = invoke(args, cfg, timeout=120)
        assert res.returncode == 2 and why in no_traceback(res), (args, res.stderr)
    assert set(os.listdir("/")) == top and not Path("/history.db").exists() and not Path("/.keys").exists()
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "sentinel"]


# ------------------------------------------------------------------------------ config values


HOSTILE = [
    ({"defaults": {"lang": "en_US\nrootpw --plaintext x"}}, "defaults.lang: expected a locale"),
    ({"images": {IMAGE: {"version": "1\n"}}}, "version: expected a version"),
    ({"images": {IMAGE: {"timezone": "UTC\x1b[2J"}}}, "timezone: expected a zoneinfo name"),
    ({"images": {IMAGE: {"memory": 10**25}}}, "memory: expected MiB between"),
    ({"images": {IMAGE: {"memory": "²"}}}, "memory: expected MiB as an integer"),
    ({"images": {IMAGE: {"cpus": "٣"}}}, "cpus: expected a CPU count as an integer"),
    ({"images": {IMAGE: {"iso": "/isos/a,b.iso"}}}, "iso: an ISO path must not contain ','"),
    ({"images": {IMAGE: {"flake": "path:/x\n/y"}}}, "flake: expected a string without control characters"),
    ({"defaults": {"ssh_key": "/k\r"}}, "ssh_key: expected a string without control"),
    ({"defaults": {"schedule": "weekly\n* * * * * rm -rf ~"}}, "defaults.schedule"),
    ({"builders": {"b1": {"host": "a" * 64}}}, "at most 63 characters"),
    ({"builders": {"b1": {"host": "builder\n"}}}, "builders.b1.host"),
    ({"builders": {"b1": {"dir": "x\ny"}}}, "builders.b1.dir"),
    ({"images": {IMAGE: [1, 2]}}, "images.demo-x86_64 is a list here but a mapping in"),
    ({"images": {IMAGE: 5}}, "images.demo-x86_64 is a number here but a mapping in"),
    ({"images": {"other": [1]}}, "images.other: expected a mapping, got list"),
]


@pytest.mark.parametrize("extra,expected", HOSTILE, ids=[e for _, e in HOSTILE])
def test_hostile_config_values_are_refused_with_their_key(tmp_path, extra, expected):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out", extra)
    res = invoke(["build-demo", "--dry-run"], cfg, timeout=120)
    assert res.returncode == 2 and expected in no_traceback(res), res.stderr
    assert "\x1b" not in res.stderr and not (tmp_path / "out").exists()


def test_a_config_path_with_a_newline_never_reaches_a_unit_or_crontab_line(tmp_path):
    cfg = write_config(tmp_path / "c\nExecStartPre=touch owned\n.yaml", tmp_path / "out")
    units = tmp_path / "units"
    for args in (["schedule-install", "--unit-dir", str(units)], ["schedule-install", "--cron"]):
        res = invoke(args, cfg, timeout=120)
        assert res.returncode == 2 and "holds a line break" in no_traceback(res), res.stderr
        assert not res.stdout.strip()
    assert not units.exists() or not list(units.iterdir())


# ------------------------------------------------------------------------------ YAML and INVOKE_*


def _project_with(tmp_path: Path, text: str) -> Path:
    """A project folder (this project's tasks.py) whose invoke.yaml is `text`."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "tasks.py", project / "tasks.py")
    (project / "invoke.yaml").write_text(text)
    return project


@pytest.mark.parametrize("text,where,problem", [
    ("defaults:\n  output_dir: out\n   bad: 1\n", ":3:7:", "mapping values are not allowed"),
    ("defaults: !!python/object/apply:os.system [touch /tmp/owned]\n", ":1:11:", "could not determine a constructor"),
    ("images: [unclosed\n", ":2:1:", "expected ',' or ']'"),
    ("- a\n- b\n", ":1:1:", "expected a mapping"),
])
def test_yaml_errors_are_one_line_for_every_command(tmp_path, text, where, problem):
    project = _project_with(tmp_path, text)
    for args in (["--list"], ["history"], ["build-demo", "--dry-run"], ["doctor"], ["gc"]):
        res = subprocess.run([sys.executable, "-m", "invoke", "-r", str(project), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {project / 'invoke.yaml'}{where}"), lines
        assert problem in lines[0] and not res.stdout.strip()
    runtime = tmp_path / "runtime.yaml"
    runtime.write_text(text)
    res = invoke(["history"], runtime)
    assert res.returncode == 2 and res.stderr.startswith(f"error: {runtime}{where}"), res.stderr
    assert not Path("/tmp/owned").exists()


@pytest.mark.parametrize("var,value,expected", [
    ("INVOKE_DEFAULTS_RETENTION", "x", "INVOKE_DEFAULTS_RETENTION='x': expected a whole number"),
    ("INVOKE_DEFAULTS_RETENTION", "٣", "INVOKE_DEFAULTS_RETENTION='٣': expected a whole number"),
    ("INVOKE_DEFAULTS_RETENTION", "9" * 25, "INVOKE_DEFAULTS_RETENTION"),
    ("INVOKE_DEFAULTS_RETENTION", "5000", ("INVOKE_DEFAULTS_RETENTION: 1 problem in the configuration:\n"
                                           "  defaults.retention: expected a build count between 1 and 1000")),
    ("INVOKE_DEFAULTS_ACCEL", "kvmm", "INVOKE_DEFAULTS_ACCEL: 1 problem"),
    ("INVOKE_IMAGES_DEMO-X86_64_USERS", "root", "cannot be set from an environment variable"),
])
def test_invoke_variables_are_named_in_errors(tmp_path, var, value, expected):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build-demo", "--dry-run"], cfg, env={var: value}, timeout=120)
    assert res.returncode == 2 and expected in no_traceback(res), res.stderr


# ------------------------------------------------------------------------------ corrupt state


def test_an_unreadable_history_is_moved_aside_and_kept(demo_build, tmp_path, sentinel):
    cfg, out = published_copy(demo_build, tmp_path)
    (out / "history.db").write_bytes(b"\x00garbage" * 4096)
    res = invoke(["history"], cfg)
    assert res.returncode == 0 and "moved to history.db.unreadable-" in no_traceback(res)
    kept = list(out.glob("history.db.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"\x00garbage")
    assert invoke(["history"], cfg).returncode == 0


@pytest.mark.parametrize("damage,expected", [
    (lambda text: text[: len(text) // 2], "is not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "artifact": {**json.loads(text)["artifact"], "file": "../../x"}}),
     "artifact.file: expected a plain file name"),
    (lambda text: "[]", "expected a JSON object"),
    (lambda text: json.dumps({**json.loads(text), "boot": "vmlinuz"}), "boot: expected an object"),
])
def test_a_damaged_published_manifest_is_refused_with_what_is_wrong(demo_build, tmp_path, sentinel, damage,
                                                                     expected):
    cfg, out = published_copy(demo_build, tmp_path)
    manifest = (out / IMAGE / "current").resolve() / "manifest.json"
    manifest.write_text(damage(manifest.read_text()))
    for args in (["run-demo", "--snapshot"], ["test-image", IMAGE]):
        res = invoke(args, cfg, timeout=120)
        assert res.returncode == 1 and expected in no_traceback(res), res.stderr
        assert len(error_lines(res)) == 1 and "hint: rebuild" in res.stderr


def test_garbage_in_state_files_reads_as_unknown(demo_build, tmp_path):
    cfg, out = published_copy(demo_build, tmp_path)
    run = out / IMAGE / "run"
    run.mkdir()
    for name, text in (("pid", "²"), ("ssh_port", "٣"), ("started_at", "1e400"), ("accel", "\x1b[2J")):
        (run / name).write_text(text)
    (out / IMAGE / ".lock").write_text("[1, 2, 3]")
    (out / ".cache").mkdir()
    (out / ".cache" / "tool-versions.json").write_text("{broken")
    for args in (["status"], ["status", "--json"], ["stop", IMAGE], ["gc", "--dry-run"], ["build-demo", "--dry-run"]):
        res = invoke(args, cfg, timeout=120)
        assert res.returncode == 0, (args, no_traceback(res))


# ------------------------------------------------------------------------------ builders


@pytest.fixture(scope="module")
def builder_host(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on loopback (alias hal9000) with a known host key."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("sshd not found: install it with `sudo apt-get install openssh-server` (.ci/run does)")
    require_tool("rsync", "rsync")
    base = tmp_path_factory.mktemp("builder-host")
    host = SshHost(base / "sshd").start()
    known = base / "known_hosts"
    known.write_text(host.known_hosts_line())
    yield {"host": host, "base": base, "ssh_config": host.client_config(base / "ssh_config", known)}
    host.stop()


def _target(builder_host: dict, raw_dir: str) -> remote.Target:
    return remote.Target("hal9000", "hal9000", remote.check_dir(raw_dir), None, builder_host["ssh_config"])


def _small_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "pipeline").mkdir(parents=True)
    (project / "tasks.py").write_text("# tasks\n")
    (project / "pipeline" / "x.py").write_text("x = 1\n")
    return project


# the test sshd logs in the user running the tests: their home is the builder's home
BUILDER_HOME = pwd.getpwuid(os.geteuid()).pw_dir


@pytest.mark.parametrize("raw_dir,why", [("~", "is the home folder"), ("/", "is the root folder /"),
                                         (BUILDER_HOME, "is the home folder")])
def test_the_builder_dir_is_never_home_or_root(builder_host, tmp_path, raw_dir, why):
    home_before = sorted(os.listdir(BUILDER_HOME))
    conn = remote.connect(_target(builder_host, raw_dir))
    try:
        with pytest.raises(UnsafePath, match=why):
            remote.sync(conn, _target(builder_host, raw_dir), _small_project(tmp_path))
    finally:
        conn.close()
    assert sorted(os.listdir(BUILDER_HOME)) == home_before and not Path("/.imagepipe-builder").exists()


def test_a_foreign_builder_dir_is_refused_and_a_new_one_claimed(builder_host, tmp_path, sentinel):
    project = _small_project(tmp_path)
    foreign = _target(builder_host, str(sentinel))
    conn = remote.connect(foreign)
    try:
        with pytest.raises(UnsafePath) as exc:
            remote.sync(conn, foreign, project)
        assert "has no .imagepipe-builder marker" in exc.value.message and "touch" in exc.value.hint
        fresh = _target(builder_host, str(tmp_path / "builder"))
        remote.sync(conn, fresh, project)
        marker = tmp_path / "builder" / ".imagepipe-builder"
        assert marker.is_file() and (tmp_path / "builder" / "pipeline" / "x.py").is_file()
        (tmp_path / "builder" / "stale.txt").write_text("ours to delete")
        (project / "pipeline" / "x.py").unlink()
        remote.sync(conn, fresh, project)  # the mirror deletes inside our own folder, marker kept
        assert marker.is_file() and not (tmp_path / "builder" / "stale.txt").exists()
        assert not (tmp_path / "builder" / "pipeline" / "x.py").exists()
    finally:
        conn.close()


def test_a_damaged_builder_manifest_is_refused(builder_host, tmp_path):
    require_tool("qemu-img", "qemu-utils")
    builder = tmp_path / "builder"
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, timeout=60)
    fake_published(builder, "20260101T000000Z-beef", disk)
    manifest = builder / "output" / IMAGE / "builds" / "20260101T000000Z-beef" / "manifest.json"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out", {
        "ssh_config_path": str(builder_host["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder)}}})
    good = manifest.read_text()
    for damaged, expected in ((good[:30], "is not JSON"),
                              (good.replace('"file": "demo-x86_64.qcow2"', '"file": "../../../etc/passwd"'),
                               "artifact.file: expected a plain file name"),
                              (json.dumps({**json.loads(good), "artifact": {**json.loads(good)["artifact"],
                                                                            "size": "3"}}), "artifact.size"),
                              ("[1]", "expected a JSON object"),
                              # a string where a mapping belongs: named, not an internal error
                              (json.dumps({**json.loads(good), "host": "builder-1"}),
                               "host: expected an object of text values, got 'builder-1'"),
                              (json.dumps({**json.loads(good), "files": ["vmlinuz"]}), "files: expected"),
                              # junk after the document: the manifest is blamed, not SHA256SUMS
                              (good + "\njunk\n", "manifest.json has more after its JSON document")):
        manifest.write_text(damaged)
        res = invoke(["remote-fetch", "hal9000", IMAGE], cfg, timeout=120)
        assert res.returncode == 1 and expected in no_traceback(res), res.stderr
        assert not (tmp_path / "out" / IMAGE / "current").exists()


@NEEDS_PTY
def test_escape_sequences_from_a_builder_are_shown_not_interpreted(builder_host, tmp_path, capfd):
    """The builder is the attacker here: its `invoke` (a stand-in for a compromised builder,
    labelled as such) prints escape sequences in plain lines and inside JSON events."""
    builder = tmp_path / "builder"
    (builder / ".venv" / "bin").mkdir(parents=True)
    fake = builder / ".venv" / "bin" / "invoke"
    hostile_event = json.dumps({"image": IMAGE, "kind": "step", "message": "ok\x1b]0;owned\x07\x1b[2J",
                                "source": "x\x1b[31m", "ts": "soon"})
    fake.write_text("#!/bin/sh\n# stand-in for a compromised builder's imagepipe\n"
                    "printf 'plain \\033[2J\\033]0;title\\007 line\\n'\n"
                    f"printf '%s\\n' '{hostile_event}'\n"
                    "printf '{\"kind\": [\"not\", \"a\", \"str\"]}\\n'\n"
                    "printf '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\n'\nexit 3\n")
    fake.chmod(0o755)
    target = _target(builder_host, str(builder))
    said: list[str] = []
    conn = remote.connect(target)
    try:
        code = remote.remote_build(conn, target, IMAGE, None, said.append)
    finally:
        conn.close()
    shown = "\n".join(said) + capfd.readouterr().err
    assert code == 3
    assert "\x1b" not in shown and "\x07" not in shown
    assert "plain ^[[2J^[]0;title^G line" in shown and "ok^[]0;owned^G^[[2J" in shown


# ------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("point,whom", [
    ("packer", "group"), ("packer", "pid"), ("boot-test", "group"), ("verify", "group"), ("publish", "pid"),
])
def test_sigkill_leaves_no_process_of_the_build_behind(demo_build, tmp_path, sentinel, point, whom):
    cfg, out = published_copy(demo_build, tmp_path, cache=True)
    image_dir = out / IMAGE
    before = read_manifest(image_dir)
    args = ["build", IMAGE, "--force"] + (["--boot-test"] if point == "boot-test" else [])
    build = Background(cfg, args, pause_at=point if point in ("verify", "publish") else None)
    try:
        if point == "packer":
            build.wait_for("Waiting for SSH")
        elif point == "boot-test":
            build.wait_for("] boot test")  # "==> [N/M] boot test"
            deadline = time.monotonic() + 60
            while not processes_mentioning(str(image_dir / "boot-test")):
                assert time.monotonic() < deadline, build.output()
                time.sleep(0.1)
        else:
            build.wait_for(f"paused at {point}")
        if point in ("packer", "boot-test"):
            assert processes_mentioning(str(out)), "packer and QEMU should be running"
        if whom == "group":
            os.killpg(build.proc.pid, signal.SIGKILL)
        else:
            os.kill(build.proc.pid, signal.SIGKILL)
        build.proc.wait(timeout=30)
        wait_gone(str(out))  # no packer, no QEMU, no leash: nothing of the build is left
        wait_gone(str(cfg))
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(build.proc.pid, signal.SIGKILL)
    assert read_manifest(image_dir) == before and verify_published(image_dir)
    res = invoke(["history", "--json", "--image", IMAGE], cfg)
    assert json.loads(res.stdout.splitlines()[0])["status"] == "abandoned", res.stdout


@pytest.mark.slow
def test_the_next_command_stops_what_a_killed_build_and_its_leash_left(demo_build, tmp_path):
    """If the leash dies with imagepipe (both SIGKILLed), packer and QEMU are orphaned; the next
    command finds their process group in the history and stops it."""
    cfg, out = published_copy(demo_build, tmp_path, cache=True)
    build = Background(cfg, ["build", IMAGE, "--force"])
    try:
        build.wait_for("Waiting for SSH")
        leash = [int(line.split(":")[0]) for line in processes_mentioning("-I -S -c")
                 if str(out) in line or _parent(int(line.split(":")[0])) == build.proc.pid]
        assert leash, processes_mentioning(str(out))
        os.kill(build.proc.pid, signal.SIGKILL)
        for pid in leash:
            os.kill(pid, signal.SIGKILL)
        build.proc.wait(timeout=30)
        time.sleep(0.5)  # a fixed pause only to show that the orphans really stay without the reaper
        orphaned = processes_mentioning(str(out / IMAGE / ".staging"))
        res = invoke(["history"], cfg)
        assert res.returncode == 0, no_traceback(res)
        if orphaned:  # the usual case: the next command finds them and stops them
            assert "left by the abandoned build" in res.stderr, (orphaned, res.stderr)
        # else packer wrote a line into its closed pipe first and died of SIGPIPE (taking QEMU
        # with it): under load that can come first; either way nothing of the build stays
        wait_gone(str(out / IMAGE / ".staging"), timeout=15)
    finally:
        for line in processes_mentioning(str(out)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)


def _parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------ full and read-only disks


# mount(8) of a tmpfs needs root (an unprivileged user namespace would not give the test's real
# user a full disk); CI runs these as root.
TMPFS = pytest.mark.needs_root("mounts a small tmpfs (an honest full or read-only disk)")


@pytest.fixture
def tmpfs(tmp_path: Path):
    """mount(size=...) → a fresh tmpfs of that size under tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "disk") -> Path:
        where = tmp_path / name
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                       check=True, timeout=30)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the file system holding `disk` until `leave` bytes are free (an honest full disk)."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / ".filler", "wb") as f:
        chunk = b"\0" * (1 << 20)
        while free > 0:
            try:
                free -= f.write(chunk[: min(len(chunk), free)])
                f.flush()
            except OSError:
                break


def _fault_copy(demo_build, disk: Path, *, cache: bool) -> tuple[Path, Path]:
    """The published demo build copied onto `disk`, with a config pointing there."""
    cfg, out = published_copy(demo_build, disk, cache=cache)
    return cfg, out


@pytest.mark.slow
@TMPFS
def test_disk_full_during_a_build_is_one_line_and_keeps_the_last_good_image(demo_build, tmp_path, tmpfs, sentinel):
    disk = tmpfs("120M")
    cfg, out = _fault_copy(demo_build, disk, cache=True)
    before = read_manifest(out / IMAGE)
    # room for a few small files, not for the image: the guest's kernel and initrd are hard links
    # into the guest cache on the same disk, so they take no room of their own
    fill(disk, leave=256 << 10)
    res = invoke(["build-demo", "--force"], cfg, timeout=600)
    text = no_traceback(res)
    assert res.returncode == 1 and len(error_lines(res)) == 1, text
    assert "no space left" in res.stderr and "free on" in res.stderr, text
    assert read_manifest(out / IMAGE) == before and verify_published(out / IMAGE)
    assert not (out / IMAGE / ".staging").exists()
    with History(out, create=False) as h:
        assert h.builds(IMAGE)[0].status == "failed"


@pytest.mark.slow
@TMPFS
@pytest.mark.parametrize("leave, who", [
    (400 << 10, "packer"),          # Packer's own copy of the blank disk finds the disk full
    (700 << 10, "the build VM"),    # the guest's writes do: QEMU would pause it, Packer would wait
])
def test_disk_full_inside_packer_build_fails_at_once_with_the_cause(demo_build, tmp_path, tmpfs, sentinel, leave,
                                                                     who):
    """A full disk in the middle of `packer build` fails the build within seconds with the one
    "ran out of disk space" line: not Packer's command line, and no build VM paused on ENOSPC
    while Packer waits for it (imagepipe watches the VM's QMP socket for BLOCK_IO_ERROR)."""
    disk = tmpfs("120M")
    cfg, out = _fault_copy(demo_build, disk, cache=True)
    before = read_manifest(out / IMAGE)
    fill(disk, leave=leave)
    started = time.monotonic()
    res = invoke(["build-demo", "--force"], cfg, timeout=300)
    text = no_traceback(res)
    assert res.returncode == 1 and len(error_lines(res)) == 1, text
    assert f"error: {who} ran out of disk space writing {out / IMAGE / '.staging'}" in res.stderr, text
    assert "free on" in res.stderr and "packer build -machine-readable" not in res.stderr, text
    if who == "packer":  # Packer's own words for it, not its argv
        assert "no space left on device" in error_lines(res)[0].lower(), text
    assert time.monotonic() - started < 120, "the build waited on a paused VM"
    assert read_manifest(out / IMAGE) == before and verify_published(out / IMAGE)
    assert not (out / IMAGE / ".staging").exists()
    assert not processes_mentioning(str(out)), "a QEMU or packer of the build is still running"
    with History(out, create=False) as h:
        assert h.builds(IMAGE)[0].status == "failed"


@pytest.mark.slow
@TMPFS
def test_a_running_vm_that_fills_the_disk_pauses_and_ssh_says_why(demo_build, tmp_path, tmpfs, sentinel):
    """`invoke run` (no -snapshot: writes go into the instance's disk, in the output folder): a write that finds the host's
    disk full pauses the guest (werror=enospc: its file systems stay whole) and the next `ssh`
    says so in one line at once, instead of waiting out its deadline for a banner."""
    disk = tmpfs("120M")
    cfg, out = _fault_copy(demo_build, disk, cache=False)
    invoke(["run", IMAGE], cfg, timeout=120, check=True)
    writer = None
    try:
        invoke(["ssh", IMAGE, "--", "true"], cfg, timeout=200, check=True)
        fill(disk)
        writer = subprocess.Popen([sys.executable, "-m", "invoke", "-f", str(cfg), "ssh", IMAGE, "--", "dd",
                                   "if=/dev/urandom", "of=/dev/vda", "bs=65536", "count=512", "conv=fsync"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = instances.paths(out, IMAGE)
        wait_until(lambda: qmp.disk_full(state.qmp) is not None, 120, "the guest paused on the full disk",
                   lambda: state.console.read_text(errors="replace")[-500:])
        started = time.monotonic()
        res = invoke(["ssh", IMAGE, "--", "true"], cfg, timeout=120)
        text = no_traceback(res)
        assert res.returncode == 1 and len(error_lines(res)) == 1, text
        assert f"{IMAGE}: the VM ran out of disk space" in res.stderr and "paused the guest" in res.stderr, text
        assert time.monotonic() - started < 30
        res = invoke(["status"], cfg, timeout=120, check=True)
        row = next(line for line in res.stdout.splitlines() if line.startswith(IMAGE))
        assert "paused: disk full" in row and f"{IMAGE}: paused: the host disk is full" in res.stderr, res.stdout
        res = invoke(["status", "--json"], cfg, timeout=120, check=True)
        mine = next(i for i in json.loads(res.stdout)["images"] if i["image"] == IMAGE)
        assert mine["state"] == "running" and "disk is full" in (mine["paused"] or "")
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        invoke(["stop", IMAGE, "--force"], cfg, timeout=120)


@pytest.mark.slow
@TMPFS
def test_a_package_download_on_a_full_disk_leaves_no_partial_deb(demo_build, tmp_path, tmpfs, sentinel):
    """The demo guest's .deb files are downloaded (apt-get download, from Debian's mirror) onto
    a disk with room for a few of them: one line, and nothing half-written left in the cache for
    the next build to take for a good package."""
    disk = tmpfs("64M")
    cfg, out = _fault_copy(demo_build, disk, cache=False)  # no guest cache: every .deb is fetched
    fill(disk, leave=6 << 20)
    res = invoke(["build-demo", "--force"], cfg, timeout=600)
    text = no_traceback(res)
    assert res.returncode == 1 and len(error_lines(res)) == 1, text
    assert "ran out of disk space" in res.stderr or "no space left" in res.stderr, text
    debs = out / ".cache" / "debs"
    assert not list(debs.glob(".download-*")), "apt-get's download folder was left behind"
    for deb in debs.glob("*.deb"):  # only whole packages (none, when apt-get failed as a whole)
        check = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, timeout=60, check=False)
        assert check.returncode == 0, f"a partial package was kept: {deb.name}"


@pytest.mark.slow
@TMPFS
def test_disk_full_while_publishing_is_one_line_and_recorded_as_failed(demo_build, tmp_path, tmpfs, sentinel):
    disk = tmpfs("120M")
    cfg, out = _fault_copy(demo_build, disk, cache=True)
    before = read_manifest(out / IMAGE)
    resume = tmp_path / "resume"
    build = Background(cfg, ["build", IMAGE, "--force"], pause_at="verify", resume=resume)
    build.wait_for("paused at verify")
    fill(disk)
    resume.touch()
    assert build.proc.wait(timeout=300) == 1, build.output()
    text = build.output()
    assert "Traceback" not in text and "no space left on the device" in text and "free on" in text, text
    assert read_manifest(out / IMAGE) == before and verify_published(out / IMAGE)
    assert not (out / IMAGE / ".staging").exists()
    with History(out, create=False) as h:  # the staging folder went first: there was room to record it
        last = h.builds(IMAGE)[0]
    assert last.status == "failed" and "no space left" in (last.error or ""), last


@TMPFS
def test_full_disk_under_the_history_is_one_line(demo_build, tmp_path, tmpfs, sentinel):
    disk = tmpfs("64M")
    cfg, out = _fault_copy(demo_build, disk, cache=False)
    before = read_manifest(out / IMAGE)
    (out / IMAGE / ".lock").write_text(" " * 200)  # an earlier build's lock: rewriting it needs no new space
    fill(disk)
    res = invoke(["build-demo", "--force"], cfg, timeout=300)
    text = no_traceback(res)
    assert res.returncode == 1 and len(error_lines(res)) == 1, text
    assert f"writing {out / 'history.db'}: the disk is full (0 B free on {disk})" in res.stderr, text
    assert read_manifest(out / IMAGE) == before and verify_published(out / IMAGE)


@TMPFS
def test_a_read_only_output_folder_is_one_line_per_command(demo_build, tmp_path, tmpfs, sentinel):
    disk = tmpfs("64M")
    cfg, out = _fault_copy(demo_build, disk, cache=False)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=30)
    for args in (["build-demo"], ["gc"], ["run-demo", "--snapshot"]):
        res = invoke(args, cfg, timeout=120)
        text = no_traceback(res)
        assert res.returncode == 1 and len(error_lines(res)) == 1 and "read-only" in res.stderr, (args, text)
    res = invoke(["history"], cfg)  # reading still works
    assert res.returncode == 0 and IMAGE in no_traceback(res), res.stderr
    assert verify_published(out / IMAGE)
