"""Scheduled rebuilds: units that systemd-analyze accepts, crontab lines that run, overlap lock."""

import fcntl
import json
import os
import subprocess
import time

import pytest

from tests.support import invoke, published_copy, require_tool, write_config

IMAGE = "demo-x86_64"


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = require_tool("systemd-analyze", "systemd")
    cfg = write_config(tmp_path / "t.yaml", tmp_path / "output", {"images": {IMAGE: {"schedule": "Mon *-*-* 03:00"}}})
    units = tmp_path / "units"
    res = invoke(["schedule-install", "--unit-dir", str(units)], cfg)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in units.iterdir())
    assert names == ["imagepipe-rebuild-demo-x86_64.service", "imagepipe-rebuild-demo-x86_64.timer",
                     "imagepipe-rebuild.service", "imagepipe-rebuild.timer"]
    check = subprocess.run([analyze, "verify", *[str(units / n) for n in names]], check=False, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and check.stderr.strip() == "", check.stderr
    service = (units / "imagepipe-rebuild-demo-x86_64.service").read_text()
    assert f"-f {cfg} rebuild --image {IMAGE} --json" in service  # the job loads the same config
    status = invoke(["schedule-status", "--unit-dir", str(units)], cfg, check=True).stdout
    assert "imagepipe-rebuild.timer: OnCalendar=weekly; next run: " in status
    assert "imagepipe-rebuild-demo-x86_64.timer: OnCalendar=Mon *-*-* 03:00" in status
    assert f"{IMAGE}: never built" in status
    removed = invoke(["schedule-remove", "--unit-dir", str(units)], cfg, check=True)
    assert removed.stderr.count("removed ") == 4 and list(units.iterdir()) == []


def test_without_systemd_the_units_are_written_and_the_user_is_told(tmp_path):
    cfg = write_config(tmp_path / "t.yaml", tmp_path / "output")
    home = tmp_path / "home"
    res = invoke(["schedule-install", "--on-calendar", "daily"], cfg, env={"XDG_CONFIG_HOME": str(home)})
    assert res.returncode == 0, res.stderr
    timer = home / "systemd" / "user" / "imagepipe-rebuild.timer"
    assert "OnCalendar=daily" in timer.read_text()
    if not os.path.isdir("/run/systemd/system"):
        assert "systemd is not running on this host" in res.stderr and "enable --now imagepipe-rebuild.timer" in res.stderr


def test_an_invalid_calendar_is_refused_before_anything_is_written(tmp_path):
    require_tool("systemd-analyze", "systemd")
    cfg = write_config(tmp_path / "t.yaml", tmp_path / "output", {"images": {IMAGE: {"schedule": "Moonday 25:00"}}})
    res = invoke(["schedule-install", "--unit-dir", str(tmp_path / "units")], cfg)
    assert res.returncode == 2 and f"images.{IMAGE}.schedule" in res.stderr and "not a valid" in res.stderr
    assert not (tmp_path / "units").exists()


@pytest.mark.slow
def test_the_crontab_line_runs_and_never_overlaps(demo_build, tmp_path):
    require_tool("flock", "util-linux")
    cfg, out = published_copy(demo_build, tmp_path, cache=True, extra={"images": {IMAGE: {"schedule": "daily"}}})
    res = invoke(["schedule-install", "--cron"], cfg, check=True)
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("@weekly ") and lines[1].startswith("@daily ")
    schedule_field, command = lines[1].split(" ", 1)
    assert schedule_field in {"@hourly", "@daily", "@weekly", "@monthly", "@yearly"}
    assert "%" not in command.replace("\\%", "")  # a bare % would end the command in crontab
    assert subprocess.run(["sh", "-n", "-c", command], check=False, timeout=10).returncode == 0
    # run it as cron would (sh -c): the demo image is up to date, the job says so in its log
    run = subprocess.run(["sh", "-c", command], check=False, timeout=120)
    assert run.returncode == 0, (out / "rebuild.log").read_text()
    events = [json.loads(line) for line in (out / "rebuild.log").read_text().splitlines() if line.startswith("{")]
    assert any(e["image"] == IMAGE and e["kind"] == "up-to-date" for e in events), events
    # while another job holds the rebuild lock, the next one exits 75 at once
    with open(out / ".rebuild.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        begin = time.monotonic()
        busy = subprocess.run(["sh", "-c", command], check=False, timeout=60)
        assert busy.returncode == 75 and time.monotonic() - begin < 5
