"""Retention: what is kept (the published build always), what goes, and the logs that go with it."""

import json
import os
import time
from pathlib import Path

from pipeline import retention
from pipeline.history import History


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


def test_human_sizes():
    assert retention.human(512) == "512 B"
    assert retention.human(3 * 1024 * 1024) == "3.0 MiB"
