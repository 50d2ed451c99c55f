"""Rendering of the timer jobs: systemd units, quoting, crontab lines (checked for real in integration)."""


import pytest
import yaml

from pipeline import schedule
from pipeline.base.errors import UsageError
from pipeline.config import load
from tests.support import ROOT


def cfg(**demo):
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    raw["images"]["demo-x86_64"].update(demo)
    raw["defaults"]["output_dir"] = "/srv/images out"
    return load(raw, ROOT)


def test_one_default_job_plus_one_per_image_schedule():
    jobs = schedule.jobs(cfg(schedule="Mon *-*-* 03:00"))
    assert [j.name for j in jobs] == ["imagepipe-rebuild", "imagepipe-rebuild-demo-x86_64"]
    assert jobs[0].calendar == "weekly" and jobs[0].args == ("rebuild", "--all", "--default-schedule", "--json")
    assert jobs[1].calendar == "Mon *-*-* 03:00" and jobs[1].args == ("rebuild", "--image", "demo-x86_64", "--json")
    assert schedule.jobs(cfg(), "daily")[0].calendar == "daily"


def test_units_have_persistent_randomized_timer_and_flock_guarded_oneshot():
    units = {u.name: u.text for u in schedule.units(cfg(), flock="/usr/bin/flock")}
    assert set(units) == {"imagepipe-rebuild.service", "imagepipe-rebuild.timer"}
    timer, service = units["imagepipe-rebuild.timer"], units["imagepipe-rebuild.service"]
    for line in ("OnCalendar=weekly", "Persistent=true", "RandomizedDelaySec=30min", "WantedBy=timers.target"):
        assert line in timer.splitlines()
    assert f"WorkingDirectory={ROOT}" in service.splitlines() and "Type=oneshot" in service
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith('ExecStart=/usr/bin/flock --nonblock --conflict-exit-code 75 "/srv/images out/.rebuild.lock" ')
    assert exec_start.endswith("rebuild --all --default-schedule --json")
    assert "SuccessExitStatus=75" in service


def test_systemd_quoting():
    assert schedule.systemd_quote("/usr/bin/flock") == "/usr/bin/flock"
    assert schedule.systemd_quote("a b") == '"a b"'
    assert schedule.systemd_quote('say "hi"') == '"say \\"hi\\""'
    assert schedule.systemd_quote("50%") == "50%%" and schedule.systemd_quote("$HOME") == "$$HOME"


def test_cron_schedules():
    assert schedule.cron_schedule("weekly") == "@weekly"
    assert schedule.cron_schedule("annually") == "@yearly"
    assert schedule.cron_schedule("0 3 * * 1") == "0 3 * * 1"
    with pytest.raises(UsageError, match="cannot express"):
        schedule.cron_schedule("Mon *-*-* 03:00")


def test_crontab_line_quotes_and_escapes_percent():
    c = cfg()
    line = schedule.crontab_line(c, schedule.jobs(c)[0])
    flock = "/usr/bin/flock --nonblock --conflict-exit-code 75 '/srv/images out/.rebuild.lock'"
    assert line.startswith(f"@weekly cd {ROOT} && {flock} ")
    assert line.endswith(">> '/srv/images out/rebuild.log' 2>&1") and "\n" not in line
    c2 = load({**yaml.safe_load((ROOT / "invoke.yaml").read_text()), "defaults": {"output_dir": "/tmp/50%"}}, ROOT)
    assert "/tmp/50\\%/.rebuild.lock" in schedule.crontab_line(c2, schedule.jobs(c2)[0])
