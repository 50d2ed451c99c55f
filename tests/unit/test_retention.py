"""Retention: what is kept (the published build always), what goes, and the logs that go with it."""

import json
import os
import time
from pathlib import Path

from pipeline.output import retention
from pipeline.output.history import History
from tests.support import hold_image_lock


def ids(n: int) -> list[str]:
    return [f"20260101T00000{i}Z-000{i}" for i in range(n)]


def test_keeps_the_newest_n_and_always_the_published_one():
    b = ids(5)
    remove, _ = retention.choose(b, [], b[-1], {}, lambda _: True, keep=3)
    assert remove == set(b[:2])
    # the published build is old (a rollback): it stays, plus the newest others up to N in all
    remove, _ = retention.choose(b, [], b[0], {}, lambda _: True, keep=2)
    assert remove == set(b[1:4])
    remove, _ = retention.choose(b, [], b[4], {}, lambda _: True, keep=1)
    assert remove == set(b[:4])


def test_folders_without_a_manifest_are_not_builds_to_keep():
    b = ids(3)
    remove, _ = retention.choose(b, [], b[0], {}, lambda i: i != b[2], keep=3)
    assert remove == {b[2]}


def test_logs_follow_their_builds_and_failed_logs_keep_the_newest_n():
    b = ids(6)
    builds = [b[0], b[2], b[4]]
    statuses = {b[0]: "ok", b[1]: "failed", b[2]: "ok", b[3]: "abandoned", b[4]: "ok", b[5]: "running"}
    remove_builds, remove_logs = retention.choose(builds, b, b[4], statuses, lambda _: True, keep=2)
    assert remove_builds == {b[0]}
    # only b0's build goes; keep=2 keeps both failed builds' logs; b5 is still running
    assert remove_logs == {b[0]}
    _, remove_logs = retention.choose(builds, b, b[4], statuses, lambda _: True, keep=1)
    assert remove_logs == {b[0], b[1], b[2]}


def make_build(image_dir: Path, build_id: str, size: int = 1000) -> None:
    folder = image_dir / "builds" / build_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"build_id": build_id}))
    (folder / "disk.qcow2").write_bytes(b"x" * size)
    (image_dir / "logs" / build_id).mkdir(parents=True)
    (image_dir / "logs" / build_id / "build.log").write_text("log\n")


def test_apply_removes_files_and_marks_the_history(tmp_path):
    image_dir = tmp_path / "demo"
    b = ids(4)
    with History(tmp_path) as h:
        for i in b:
            make_build(image_dir, i)
            h.start(i, "demo")
            h.finish(i, "ok")
    os.symlink(f"builds/{b[1]}", image_dir / "current")
    dry = retention.apply(tmp_path, "demo", 2, dry_run=True)
    assert dry.removed == [b[0], b[2]] and dry.bytes >= 2000
    assert all(p.exists() for p in dry.paths)
    done = retention.apply(tmp_path, "demo", 2)
    assert done.removed == [b[0], b[2]]
    assert sorted(p.name for p in (image_dir / "builds").iterdir()) == [b[1], b[3]]
    assert sorted(p.name for p in (image_dir / "logs").iterdir()) == [b[1], b[3]]
    with History(tmp_path) as h:
        assert h.get(b[0]).removed and h.get(b[1]).removed is None


def test_a_build_a_running_vm_uses_is_kept_and_said(tmp_path):
    """`invoke run` boots builds/<id>/IMAGE (QEMU's command line names it); a newer publish
    and retention must not take that disk from under the VM's writes."""
    import subprocess
    import sys

    image_dir = tmp_path / "demo"
    b = ids(3)
    for i in b:
        make_build(image_dir, i)
    os.symlink(f"builds/{b[2]}", image_dir / "current")
    disk = image_dir / "builds" / b[0] / "demo.qcow2"
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"file={disk}"])
    try:
        cmdline = Path(f"/proc/{vm.pid}/cmdline")
        deadline = time.monotonic() + 30
        while str(disk).encode() not in cmdline.read_bytes():  # exec'd (before that: the parent's line)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gc = retention.apply(tmp_path, "demo", 1)
        assert gc.removed == [b[1]] and gc.in_use == {b[0]: [vm.pid]}
        assert (image_dir / "builds" / b[0]).is_dir() and (image_dir / "logs" / b[0]).is_dir()
        assert f"kept {b[0]}: in use by pid {vm.pid}" in gc.in_use_text()
    finally:
        vm.kill()
        vm.wait()
    assert retention.apply(tmp_path, "demo", 1).removed == [b[0]]  # once the VM is gone


def test_clean_stale_removes_staging_and_stops_its_processes(tmp_path):
    import subprocess
    import sys

    stage = tmp_path / "demo" / ".staging" / "20260101T000000Z-dead"
    stage.mkdir(parents=True)
    # a process still running "in" the staging folder, like an orphaned packer after kill -9
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(stage / "template.pkr.hcl")])
    # wait until the child has exec'd (before that, /proc shows the parent's command line)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 30
    while str(stage).encode() not in cmdline.read_bytes():
        assert time.monotonic() < deadline, f"child never showed {stage} in {cmdline}: {cmdline.read_bytes()!r}"
        time.sleep(0.01)
    (tmp_path / "demo" / ".current.tmp123").symlink_to("builds/x")
    said = []
    removed = retention.clean_stale(tmp_path / "demo", said.append)
    assert proc.wait(timeout=10) == -9
    assert not (tmp_path / "demo" / ".staging").exists() and not (tmp_path / "demo" / ".current.tmp123").is_symlink()
    assert len(removed) == 2 and "stopped 1 leftover process" in said[0]


def test_clean_stale_keeps_the_folder_its_caller_goes_on_with(tmp_path):
    staging = tmp_path / "demo" / ".staging"
    for name in ("fetch-20260101T000000Z-old", "fetch-20260102T000000Z-new", "20260102T000000Z-dead"):
        (staging / name).mkdir(parents=True)
        (staging / name / "demo.qcow2").write_bytes(b"x" * 10)
    said: list[str] = []
    # a build's start, a no-op run: an interrupted fetch's folder stays, for that fetch to resume
    retention.clean_stale(tmp_path / "demo", said.append)
    assert sorted(p.name for p in staging.iterdir()) == ["fetch-20260101T000000Z-old", "fetch-20260102T000000Z-new"]
    # a fetch (or gc): older fetches go too, the fetch's own folder stays
    retention.clean_stale(tmp_path / "demo", said.append, fetches=True, keep="fetch-20260102T000000Z-new")
    assert sorted(p.name for p in staging.iterdir()) == ["fetch-20260102T000000Z-new"]
    assert (staging / "fetch-20260102T000000Z-new" / "demo.qcow2").read_bytes() == b"x" * 10
    assert sorted(said) == ["demo: removing 20260102T000000Z-dead left by an interrupted build",
                            "demo: removing fetch-20260101T000000Z-old left by an interrupted fetch"]


def test_a_no_op_run_reaps_stale_staging_only_when_nothing_holds_the_lock(tmp_path):
    image_dir = tmp_path / "demo"
    said: list[str] = []
    retention.reap_when_idle(image_dir, said.append)  # no folder at all: nothing made, nothing said
    assert not image_dir.exists() and said == []
    stale = image_dir / ".staging" / "20260101T000000Z-dead"
    stale.mkdir(parents=True)
    resumable = image_dir / ".staging" / "fetch-20260101T000000Z-half"  # an interrupted fetch's
    resumable.mkdir()
    # a live build of the image holds its lock (in another process: flock is per open file)
    holder = hold_image_lock(image_dir, wait=False)
    try:
        retention.reap_when_idle(image_dir, said.append)
        assert stale.is_dir() and said == []  # its staging folder may be live: left alone
    finally:
        holder.kill()
        holder.wait()
    retention.reap_when_idle(image_dir, said.append)
    assert not stale.exists() and resumable.is_dir()  # kept for that fetch to resume
    assert said == ["demo: removing 20260101T000000Z-dead left by an interrupted build"]


def test_a_no_op_run_warns_instead_of_following_a_planted_link(tmp_path):
    victim = tmp_path / "home"
    (victim / "keep").mkdir(parents=True)
    image_dir = tmp_path / "out" / "demo"
    image_dir.mkdir(parents=True)
    (image_dir / ".staging").symlink_to(victim)
    said: list[str] = []
    retention.reap_when_idle(image_dir, said.append)
    assert (victim / "keep").is_dir()
    assert len(said) == 1 and "warning" in said[0] and ".staging" in said[0], said


def test_retention_after_a_publish_only_warns(tmp_path):
    """The new build is in place: a history it cannot write (here a planted link) is a warning."""
    (tmp_path / "demo" / "builds").mkdir(parents=True)
    (tmp_path / "history.db").symlink_to("/etc/passwd")
    said: list[str] = []
    retention.after_publish(tmp_path, "demo", 1, said.append)
    assert len(said) == 1 and said[0].startswith("demo: warning: retention could not remove old builds: ")
    assert "history.db is a symbolic link" in said[0]


def test_human_sizes():
    assert retention.human(512) == "512 B"
    assert retention.human(3 * 1024 * 1024) == "3.0 MiB"
