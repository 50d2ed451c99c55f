"""Scheduled rebuilds: systemd service + timer units (or a crontab line) that run `invoke rebuild`.

One timer for the default calendar (`defaults.schedule`, or --on-calendar) runs
`rebuild --all --default-schedule --json`: every image without its own `schedule:`. Each image
with its own `schedule:` gets its own timer running `rebuild --image NAME --json`. Every job
runs under `flock --nonblock` on output/.rebuild.lock, so jobs never overlap: a job that finds
another one running exits 75 at once (systemd counts that as success; the next run catches up,
since the input hash says what is still to build).

Rendering is pure (`units`, `crontab_line`); installing talks to systemctl only when systemd is
actually running (PID 1), and says so otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.errors import UsageError
from pipeline.base.fsutil import atomic_write
from pipeline.base.run import run
from pipeline.base.text import has_control, visible
from pipeline.model import Config

PREFIX = "imagepipe-rebuild"
LOCK_FILE = ".rebuild.lock"
BUSY_EXIT = 75
RANDOM_DELAY = "30min"
CRON_SHORTHANDS = {"hourly", "daily", "weekly", "monthly", "yearly", "annually"}


@dataclass(frozen=True)
class Job:
    """One scheduled job: a unit name, its calendar and the rebuild arguments."""

    name: str                  # unit name without suffix
    calendar: str
    args: tuple[str, ...]      # arguments after `invoke`
    description: str


@dataclass(frozen=True)
class Unit:
    name: str                  # file name, e.g. imagepipe-rebuild.timer
    text: str


def jobs(cfg: Config, on_calendar: str | None = None) -> list[Job]:
    """The default job plus one per image with its own `schedule:`."""
    calendar = on_calendar or cfg.defaults.schedule
    out = [Job(PREFIX, calendar, ("rebuild", "--all", "--default-schedule", "--json"),
               f"rebuild changed images ({calendar})")]
    for name, image in sorted(cfg.images.items()):
        if image.schedule:
            out.append(Job(f"{PREFIX}-{name}", image.schedule, ("rebuild", "--image", name, "--json"),
                           f"rebuild {name} if changed ({image.schedule})"))
    return out


def invoke_argv(root: Path, config_file: Path | None = None) -> list[str]:
    """How a job starts invoke: the project's .venv if there is one, else this interpreter."""
    venv_invoke = root / ".venv" / "bin" / "invoke"
    argv = [str(venv_invoke)] if venv_invoke.exists() else [sys.executable, "-m", "invoke"]
    return argv + (["-f", str(config_file)] if config_file else [])


def command(cfg: Config, job: Job, flock: str, config_file: Path | None = None) -> list[str]:
    """flock --nonblock ... invoke [-f CONFIG] rebuild ...: the job's full argv (every word
    checked: a unit file or a crontab line cannot carry a line break or a control character)."""
    lock = cfg.output_dir / LOCK_FILE
    argv = [flock, "--nonblock", "--conflict-exit-code", str(BUSY_EXIT), str(lock),
            *invoke_argv(cfg.root, config_file), *job.args]
    renderable([*argv, str(cfg.root), str(cfg.output_dir)])
    return argv


def renderable(words: list[str]) -> None:
    """UsageError when a word would break the unit or crontab line it is written into."""
    for word in words:
        if has_control(word):
            raise UsageError(f"cannot schedule: the path {visible(word)!r} holds a line break or another control "
                             "character, which would end the systemd unit line or crontab line early",
                             "move the project (or the -f config file) to a path without such characters")


def systemd_quote(arg: str) -> str:
    """One argument for ExecStart= (systemd's own quoting; % and $ are specifiers there)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r'[\s"\'\\;]', arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_text(cfg: Config, job: Job, argv: list[str]) -> str:
    """The .service unit: a oneshot in the project directory, niced, with a generous timeout."""
    return "\n".join([
        "[Unit]",
        f"Description=imagepipe: {job.description}",
        f"Documentation=file://{cfg.root / 'README.md'}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"WorkingDirectory={systemd_quote(str(cfg.root))}",
        "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
        f"SuccessExitStatus={BUSY_EXIT}",
        "Nice=10",
        "IOSchedulingClass=idle",
        "TimeoutStartSec=12h",
        "",
    ])


def timer_text(job: Job) -> str:
    """The .timer unit: Persistent (a missed run happens at next boot), randomized delay."""
    return "\n".join([
        "[Unit]",
        f"Description=imagepipe: timer to {job.description}",
        "",
        "[Timer]",
        f"OnCalendar={job.calendar}",
        "Persistent=true",
        f"RandomizedDelaySec={RANDOM_DELAY}",
        f"Unit={job.name}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def units(cfg: Config, on_calendar: str | None = None, *, flock: str = "/usr/bin/flock",
          config_file: Path | None = None) -> list[Unit]:
    """Every unit file (service + timer per job), rendered."""
    out = []
    for job in jobs(cfg, on_calendar):
        out.append(Unit(f"{job.name}.service", service_text(cfg, job, command(cfg, job, flock, config_file))))
        out.append(Unit(f"{job.name}.timer", timer_text(job)))
    return out


def cron_schedule(calendar: str) -> str:
    """An OnCalendar shorthand as cron's @-form; a 5-field cron expression passes through."""
    if calendar in CRON_SHORTHANDS:
        return "@yearly" if calendar == "annually" else f"@{calendar}"
    if re.fullmatch(r"(\S+\s+){4}\S+", calendar.strip()) and not re.search(r"[:\-]\d", calendar):
        return " ".join(calendar.split())
    raise UsageError(
        f"--cron cannot express the calendar {calendar!r}",
        "use hourly, daily, weekly, monthly or yearly, or a cron expression such as '0 3 * * 1' with --on-calendar",
    )


def crontab_line(cfg: Config, job: Job, flock: str = "/usr/bin/flock", config_file: Path | None = None) -> str:
    """One crontab line running the job in the project directory, output appended to a log."""
    log = cfg.output_dir / "rebuild.log"
    argv = shlex.join(command(cfg, job, flock, config_file))
    cmd = f"cd {shlex.quote(str(cfg.root))} && {argv} >> {shlex.quote(str(log))} 2>&1"
    return f"{cron_schedule(job.calendar)} {cmd.replace('%', chr(92) + '%')}"


# --------------------------------------------------------------------------------- host side


def unit_dir(scope: str, override: Path | None = None) -> Path:
    """Where unit files go: ~/.config/systemd/user (user) or /etc/systemd/system (system)."""
    if override:
        return override
    if scope == "system":
        return Path("/etc/systemd/system")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 on this host (containers often have systemctl without it)."""
    return Path("/run/systemd/system").is_dir()


def validate_calendar(expr: str, where: str) -> str | None:
    """Check an OnCalendar expression with `systemd-analyze calendar` (when installed).

    Returns the next elapse time as systemd prints it, or None when systemd-analyze is absent.
    """
    if shutil.which("systemd-analyze") is None:
        return None
    res = run(["systemd-analyze", "calendar", expr], check=False, timeout=20)
    if not res.ok:
        raise UsageError(f"{where}: {expr!r} is not a valid systemd calendar expression: "
                         f"{(res.stderr or res.stdout).strip()}", "see: man systemd.time (CALENDAR EVENTS)")
    m = re.search(r"Next elapse:\s*(.+)", res.stdout)
    return m.group(1).strip() if m else None


def write_units(folder: Path, rendered: list[Unit]) -> list[Path]:
    """Write unit files atomically (never a half-written unit for systemd to read)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for unit in rendered:
        path = folder / unit.name
        atomic_write(path, unit.text)
        written.append(path)
    return written


def installed(folder: Path) -> list[Path]:
    """imagepipe's unit files in `folder`."""
    return sorted(folder.glob(f"{PREFIX}*.service")) + sorted(folder.glob(f"{PREFIX}*.timer")) if folder.is_dir() else []


def timer_calendar(path: Path) -> str | None:
    m = re.search(r"^OnCalendar=(.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return m.group(1).strip() if m else None


def systemctl(scope: str, *args: str, check: bool = True) -> str:
    argv = ["systemctl"] + (["--user"] if scope == "user" else []) + list(args)
    return run(argv, check=check, timeout=60).stdout


def next_elapse(scope: str, timer: str) -> str | None:
    """When systemd will next fire `timer` (`systemctl show`), None when unknown."""
    out = systemctl(scope, "show", timer, "--property=NextElapseUSecRealtime", "--value", check=False).strip()
    return out or None
