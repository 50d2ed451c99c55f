"""Scheduled rebuilds: `invoke schedule-install`, `schedule-status`, `schedule-remove`."""

from __future__ import annotations

import time
from pathlib import Path

from invoke import Context

from pipeline.base.errors import UsageError
from pipeline.tasks.common import load_config, say, task

SCOPE_HELP = {
    "user": "per-user units in ~/.config/systemd/user (default)",
    "system": "system units in /etc/systemd/system (needs root)",
    "unit_dir": "write the unit files into this folder instead (review, packaging, tests)",
}


def _scope(user: bool, system: bool) -> str:
    if user and system:
        raise UsageError("give --user or --system, not both")
    return "system" if system else "user"


def _config_file(c: Context) -> Path | None:
    """The -f file, which the scheduled job must load too."""
    runtime = getattr(c.config, "_runtime_path", None)
    return Path(runtime).resolve() if runtime else None


@task(help={
    "on_calendar": "systemd OnCalendar for images without their own schedule (default: defaults.schedule)",
    "cron": "print a crontab line instead of writing systemd units",
    **SCOPE_HELP,
})
def schedule_install(c: Context, on_calendar: str = "", user: bool = False, system: bool = False,
                     cron: bool = False, unit_dir: str = "") -> None:
    """Run `invoke rebuild` on a timer (systemd units, or a crontab line with --cron)."""
    from pipeline import schedule  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    scope = _scope(user, system)
    jobs = schedule.jobs(cfg, on_calendar or None)
    for job in jobs:
        where = "--on-calendar" if job.name == schedule.PREFIX and on_calendar else (
            "defaults.schedule" if job.name == schedule.PREFIX else f"images.{job.name[len(schedule.PREFIX) + 1:]}.schedule")
        schedule.validate_calendar(job.calendar, where)
    cfg_file = _config_file(c)
    if cron:
        for job in jobs:
            print(schedule.crontab_line(cfg, job, config_file=cfg_file))
        say("add the line(s) above with: crontab -e   (runs never overlap: flock on "
            f"{cfg.output_dir / schedule.LOCK_FILE})")
        return
    folder = schedule.unit_dir(scope, Path(unit_dir) if unit_dir else None)
    for path in schedule.write_units(folder, schedule.units(cfg, on_calendar or None, config_file=cfg_file)):
        say(f"wrote {path}")
    timers = [f"{job.name}.timer" for job in jobs]
    if unit_dir:
        say("units written for review; install them into a systemd unit folder to use them")
    elif not schedule.systemd_running():
        flag = "--user " if scope == "user" else ""
        say("systemd is not running on this host (no /run/systemd/system): the units are written but not "
            f"enabled; on a systemd host run: systemctl {flag}daemon-reload && systemctl {flag}enable --now "
            + " ".join(timers))
    else:
        schedule.systemctl(scope, "daemon-reload")
        schedule.systemctl(scope, "enable", "--now", *timers)
        say(f"enabled {', '.join(timers)}")


@task(help=SCOPE_HELP)
def schedule_status(c: Context, user: bool = False, system: bool = False, unit_dir: str = "") -> None:
    """Show the installed timers, their next run, and each image's last build."""
    from pipeline import schedule  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.output.history import History  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    scope = _scope(user, system)
    folder = schedule.unit_dir(scope, Path(unit_dir) if unit_dir else None)
    timers = [p for p in schedule.installed(folder) if p.suffix == ".timer"]
    if not timers:
        print(f"no imagepipe timers in {folder} (install with: invoke schedule-install)")
    running = schedule.systemd_running() and not unit_dir
    for timer in timers:
        calendar = schedule.timer_calendar(timer) or "?"
        if running:
            nxt = schedule.next_elapse(scope, timer.name) or "not scheduled (is the timer enabled?)"
        else:
            computed = schedule.validate_calendar(calendar, str(timer))
            nxt = f"{computed} (computed; systemd is not running here, the timer is inactive)" if computed else "unknown"
        print(f"{timer.name}: OnCalendar={calendar}; next run: {nxt}")
    wanted = {f"{j.name}.timer" for j in schedule.jobs(cfg)}
    for missing in sorted(wanted - {t.name for t in timers}):
        if timers:
            print(f"{missing}: configured in invoke.yaml but not installed (run: invoke schedule-install)")
    with History(cfg.output_dir, create=False) as hist:
        hist.reap()
        for name in sorted(cfg.images):
            last = hist.last(name)
            if last is None:
                print(f"{name}: never built")
                continue
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last.started))
            extra = f" ({last.error.splitlines()[0][:100]})" if last.error and last.status != "ok" else ""
            print(f"{name}: last build {last.id} {last.status} at {when}{extra}")


@task(help=SCOPE_HELP)
def schedule_remove(c: Context, user: bool = False, system: bool = False, unit_dir: str = "") -> None:
    """Stop and remove the imagepipe timers and services."""
    from pipeline import schedule  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    scope = _scope(user, system)
    folder = schedule.unit_dir(scope, Path(unit_dir) if unit_dir else None)
    paths = schedule.installed(folder)
    if not paths:
        say(f"nothing to remove: no imagepipe units in {folder}")
        return
    if schedule.systemd_running() and not unit_dir:
        schedule.systemctl(scope, "disable", "--now", *[p.name for p in paths if p.suffix == ".timer"], check=False)
    for path in paths:
        path.unlink()
        say(f"removed {path}")
    if schedule.systemd_running() and not unit_dir:
        schedule.systemctl(scope, "daemon-reload")
