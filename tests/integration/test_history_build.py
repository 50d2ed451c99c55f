"""History, input-hash skip, locks, kills and retention around real demo builds (packer + QEMU/TCG)."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.output.artifacts import read_manifest, verify_published
from pipeline.output.history import History, is_locked
from tests.support import (
    ROOT,
    Background,
    invoke,
    live_processes_mentioning,
    published_copy,
    wait_gone,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow
IMAGE = "demo-x86_64"


def copy_output(demo_build, tmp_path: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """A private copy of the session's demo output with the guest cache (these tests build)."""
    return published_copy(demo_build, tmp_path, cache=True, extra=extra)


def rows(out: Path, image: str = IMAGE) -> list:
    with History(out) as h:
        return h.builds(image)


def history_json(cfg: Path, *args: str) -> list[dict]:
    res = invoke(["history", "--json", *args], cfg, check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_if_changed_skips_fast_when_nothing_changed(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path)
    manifest = read_manifest(out / IMAGE)
    assert manifest["input_hash"] and manifest["input_parts"]["config"]
    builds_before = sorted(os.listdir(out / IMAGE / "builds"))
    logs_before = sorted(os.listdir(out / IMAGE / "logs"))
    res = invoke(["build", IMAGE, "--if-changed"], cfg)
    assert res.returncode == 0, res.stderr
    assert f"up to date: built {manifest['finished']}, sha256 {manifest['artifact']['sha256'][:16]}" in res.stderr
    # fast because nothing ran: no packer log, no staging (the 0.5 s goal is bench/noop_rebuild.py's:
    # a wall-clock bound here would only measure how busy the machine is)
    assert sorted(os.listdir(out / IMAGE / "logs")) == logs_before and not (out / IMAGE / ".staging").exists()
    assert sorted(os.listdir(out / IMAGE / "builds")) == builds_before and len(rows(out)) == 1
    as_json = invoke(["build", IMAGE, "--if-changed", "--json"], cfg)
    event = json.loads(as_json.stdout.strip())
    assert event["kind"] == "skipped" and event["message"].startswith("up to date")


def test_a_no_op_run_removes_what_a_killed_build_left(demo_build, tmp_path):
    """A timer's `rebuild` with nothing changed, or `build --if-changed`, tidies .staging as the
    build's own start would (there may never be a next build to do it)."""
    cfg, out = copy_output(demo_build, tmp_path)
    for args in (["rebuild", "--image", IMAGE], ["build", IMAGE, "--if-changed"]):
        stale = out / IMAGE / ".staging" / "20261101T000000Z-dead"
        stale.mkdir(parents=True)
        (stale / "disk.qcow2").write_bytes(b"\0" * 4096)
        res = invoke(args, cfg)
        assert res.returncode == 0 and "up to date" in res.stderr, res.stderr
        assert "removing 20261101T000000Z-dead left by an interrupted build" in res.stderr, res.stderr
        assert not (out / IMAGE / ".staging").exists()


def test_a_config_change_rebuilds_then_retention_prunes(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path, {"images": {IMAGE: {"memory": 320, "retention": 1}}})
    old = read_manifest(out / IMAGE)
    res = invoke(["build", IMAGE, "--if-changed"], cfg, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "up to date" not in res.stderr and "retention removed 1 old build(s)" in res.stderr
    new = read_manifest(out / IMAGE)
    assert new["build_id"] != old["build_id"] and new["input_hash"] != old["input_hash"]
    assert verify_published(out / IMAGE) == new["artifact"]["sha256"]
    # retention 1: only the published build and its logs remain; the history keeps both rows
    assert os.listdir(out / IMAGE / "builds") == [new["build_id"]]
    assert os.listdir(out / IMAGE / "logs") == [new["build_id"]]
    hist = history_json(cfg, "--image", IMAGE)
    assert [(h["id"], h["status"]) for h in hist] == [(new["build_id"], "ok"), (old["build_id"], "ok")]
    assert hist[0]["input_hash"] == new["input_hash"] and hist[0]["sha256"] == new["artifact"]["sha256"]
    assert hist[1]["removed"] and hist[0]["removed"] is None
    table = invoke(["history", "--image", IMAGE], cfg, check=True).stdout
    assert "files removed" in table and new["build_id"] in table
    again = invoke(["build", IMAGE, "--if-changed"], cfg)
    assert "up to date" in again.stderr and read_manifest(out / IMAGE)["build_id"] == new["build_id"]


def test_touching_the_template_changes_the_hash_and_builds(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path)
    project = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    template = project / "packer/demo/x86_64/demo-x86_64.pkr.hcl"
    skip = invoke(["build", IMAGE, "--if-changed"], cfg, cwd=project)
    assert "up to date" in skip.stderr, skip.stderr  # the copy alone changes nothing
    template.write_text(template.read_text() + "# reviewed\n")
    res = invoke(["build", IMAGE, "--if-changed"], cfg, cwd=project, timeout=600)
    assert res.returncode == 0 and "up to date" not in res.stderr, res.stderr
    parts = read_manifest(out / IMAGE)["input_parts"]
    old_parts = json.loads((out / IMAGE / "builds" / rows(out)[1].id / "manifest.json").read_text())["input_parts"]
    assert [k for k in parts if parts[k] != old_parts.get(k)] == ["file:packer/demo/x86_64/demo-x86_64.pkr.hcl"]


@pytest.mark.parametrize("point", ["packer", "verify", "publish", "published"])
def test_kill_9_leaves_a_verifiable_image_an_abandoned_row_and_no_lock(demo_build, tmp_path, point):
    cfg, out = copy_output(demo_build, tmp_path)
    image_dir = out / IMAGE
    published_before = read_manifest(image_dir)
    build = Background(cfg, ["build", IMAGE, "--force"], pause_at=None if point == "packer" else point)
    proc = build.proc
    build.wait_for("Waiting for SSH" if point == "packer" else f"paused at {point}")
    if point == "packer":  # packer and its QEMU run in the staging folder
        staging = str(image_dir / ".staging")
        wait_until(lambda: [p for p in live_processes_mentioning(staging) if "qemu" in p], 120,
                   "packer's QEMU", lambda: "\n".join(live_processes_mentioning(staging)))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    assert not is_locked(image_dir)  # the kernel dropped the flock with the process
    manifest = read_manifest(image_dir)
    assert verify_published(image_dir) == manifest["artifact"]["sha256"]
    if point == "published":  # killed after the atomic swap: the new build is the published one
        assert manifest["build_id"] != published_before["build_id"]
    else:
        assert manifest == published_before
    killed = history_json(cfg, "--image", IMAGE)[0]  # this run marks the dead build
    assert killed["status"] == "abandoned" and "disappeared" in killed["error"], killed
    if point == "published":
        assert killed["id"] == manifest["build_id"]
    # the next run under the lock clears what the killed build left (an orphaned packer/QEMU included)
    res = invoke(["gc"], cfg)
    assert res.returncode == 0, res.stderr
    wait_gone(str(image_dir / ".staging"), timeout=10)
    assert not (image_dir / ".staging").exists()
    assert invoke(["build", IMAGE, "--if-changed"], cfg).stderr.count("up to date") == 1


def test_two_builds_of_one_image_take_turns_and_no_wait_fails_at_once(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path)
    first_build = Background(cfg, ["build", IMAGE, "--force"])
    first = first_build.proc
    first_build.wait_for("packer build")
    second_build = Background(cfg, ["build", IMAGE, "--force"])
    second_build.wait_for("waiting for the build held by", timeout=60)
    assert f"pid {first.pid}" in second_build.output()
    third = invoke(["build", IMAGE, "--force", "--no-wait"], cfg)
    assert third.returncode == 75 and f"is being built by pid {first.pid}" in third.stderr, third.stderr
    assert first.poll() is None, "--no-wait returned while the first build still ran (it did not wait)"
    assert first_build.finish(timeout=600) == 0, first_build.output()
    assert second_build.finish(timeout=600) == 0, second_build.output()
    newest, older = rows(out)[:2]
    assert newest.status == older.status == "ok" and newest.started >= older.finished
    assert read_manifest(out / IMAGE)["build_id"] == newest.id
    assert verify_published(out / IMAGE) == newest.sha256
    assert not (out / IMAGE / ".staging").exists() and not is_locked(out / IMAGE)
    # default retention (3): the original build plus two new ones are all kept
    assert len(os.listdir(out / IMAGE / "builds")) == 3
    # gc with retention 1: --dry-run reports, then gc frees the two older builds
    keep_one = write_config(tmp_path / "keep1.yaml", out, {"images": {IMAGE: {"retention": 1}}})
    dry = invoke(["gc", "--dry-run", "--json", "--image", IMAGE], keep_one, check=True)
    report = json.loads(dry.stdout)
    assert report["dry_run"] and len(report["builds"]) == 2 and newest.id not in report["builds"]
    assert report["bytes"] > 1_000_000 and len(os.listdir(out / IMAGE / "builds")) == 3
    done = invoke(["gc", "--image", IMAGE], keep_one, check=True)
    gone = sorted(report["builds"])
    assert f"{IMAGE}: keep 1; removed builds {', '.join(gone)}, 2 log folders (" in done.stderr, done.stderr
    assert "freed" in done.stderr
    assert os.listdir(out / IMAGE / "builds") == [newest.id]
    assert verify_published(out / IMAGE) == newest.sha256


def test_sigterm_is_recorded_as_interrupted(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path)
    build = Background(cfg, ["build", IMAGE, "--force"], pause_at="verify")
    build.wait_for("paused at verify")
    build.proc.send_signal(signal.SIGTERM)
    assert build.finish(timeout=60) == 130, build.output()
    last = history_json(cfg, "--image", IMAGE)[0]
    assert last["status"] == "interrupted" and "SIGTERM" in last["error"]
    assert not (out / IMAGE / ".staging").exists() and not is_locked(out / IMAGE)


BROKEN = {"distro": "demo", "version": "1", "arch": "x86_64", "disk_size": 64, "memory": 256,
          "cpus": 512, "ssh_user": "root",  # QEMU refuses 512 CPUs: packer fails in seconds
          "users": [{"name": "root", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForLogin t"]}]}


def test_rebuild_goes_on_after_a_failing_image(demo_build, tmp_path):
    cfg, out = copy_output(demo_build, tmp_path, {"images": {"demo-broken": BROKEN, IMAGE: {"memory": 300}}})
    old = read_manifest(out / IMAGE)
    res = invoke(["rebuild", "--image", "demo-broken", "--image", IMAGE, "--image", "almalinux10-aarch64", "--json"],
                 cfg, timeout=900)
    assert res.returncode == 1, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]  # every stdout line is JSON
    outcome = {e["image"]: e for e in events if e["kind"] in ("built", "failed", "skipped", "up-to-date")}
    assert outcome["demo-broken"]["kind"] == "failed" and "Qemu failed to start" in outcome["demo-broken"]["message"]
    assert outcome[IMAGE]["kind"] == "built" and "boot-tested" in outcome[IMAGE]["message"]
    assert any(e["kind"] == "step" and e["message"] == "boot test" for e in events if e["image"] == IMAGE)
    assert outcome["almalinux10-aarch64"]["kind"] == "skipped"
    assert "aarch64" in outcome["almalinux10-aarch64"]["message"]
    assert events[-1]["kind"] == "summary" and events[-1]["failed"] == 1 and events[-1]["built"] == 1
    assert "\x1b[" not in res.stderr  # no live progress off a TTY
    new = read_manifest(out / IMAGE)
    assert new["build_id"] == outcome[IMAGE]["build_id"] != old["build_id"]
    assert verify_published(out / IMAGE) == new["artifact"]["sha256"]
    assert [r.status for r in rows(out, "demo-broken")] == ["failed"]
    assert rows(out)[0].status == "ok" and rows(out)[0].id == new["build_id"]
    assert not (out / "demo-broken" / "current").exists()
    again = invoke(["rebuild", "--image", IMAGE, "--image", "almalinux10-aarch64", "--json"], cfg)
    assert again.returncode == 0, again.stderr  # skipped is not failed
    kinds = {json.loads(line)["image"]: json.loads(line)["kind"] for line in again.stdout.splitlines()
             if json.loads(line)["kind"] in ("up-to-date", "skipped")}
    assert kinds == {IMAGE: "up-to-date", "almalinux10-aarch64": "skipped"}
