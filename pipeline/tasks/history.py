"""History, garbage collection and the unattended rebuild: `invoke history`, `gc`, `rebuild`."""

from __future__ import annotations

import contextlib
import json as json_mod
import os
import sys
import time
from typing import TYPE_CHECKING

from invoke import Context

from pipeline.base.errors import LockBusy
from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.options import LOCAL_ACCEL_HELP, accel_option, remote_accel_option

if TYPE_CHECKING:
    from pipeline.output.history import Build, Event


@task(help={
    "image": "only this image's builds",
    "limit": "at most this many rows (newest first; default 20, 0 = all)",
    "json": "one JSON object per build on stdout",
    "instances": "instead of builds, what happened to instances (created, started, stopped, idle-stop, "
                 "rebased, removed); with --image: this instance's",
})
def history(c: Context, image: str = "", limit: int = 20, json: bool = False, instances: bool = False) -> None:
    """Show past builds: id, image, where, start, duration, status, sha256, size, error.

    With --instances: the instances' events instead (docs/running.md#instances).
    """
    from pipeline.output.history import History  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    if instances:
        with History(cfg.output_dir, create=False) as hist:
            events = hist.events(image or None, limit or None)
        if json:
            for ev in events:
                print(json_mod.dumps(ev.as_json()), flush=True)
        elif events:
            print(_events_table(events))
        else:
            say(f"no instance events recorded yet in {cfg.output_dir / 'history.db'}")
        return
    if image:
        cfg.image(image)  # unknown names fail with the list of valid ones
    with History(cfg.output_dir, create=False) as hist:  # reading creates nothing
        hist.reap()
        rows = hist.builds(image or None, limit or None)
    if json:
        try:
            for row in rows:
                print(json_mod.dumps(row.as_json()), flush=True)
        except BrokenPipeError:  # `invoke history --json | head`: the reader has all it wanted

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if not rows:
        say(f"no builds recorded yet in {cfg.output_dir / 'history.db'}")
        return
    print(_table(rows))


def _table(rows: list[Build]) -> str:
    """Rows as an aligned text table; the last column (the note) is not padded."""
    from pipeline.base.units import mib  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    header = ("BUILD", "IMAGE", "WHERE", "STARTED (UTC)", "TOOK", "STATUS", "SHA256", "SIZE", "NOTE")
    lines = [header]
    for b in rows:
        took = f"{b.finished - b.started:.0f}s" if b.finished else "-"
        note = (b.error or "").splitlines()[0][:60] if b.error else ("files removed" if b.removed else "")
        lines.append((b.id, b.image, b.location, _when(b.started), took, b.status,
                      (b.sha256 or "-")[:12], mib(b.size) if b.size else "-", note))
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in lines).rstrip()


def _events_table(events: list[Event]) -> str:
    """WHEN (UTC), INSTANCE, EVENT, IMAGE, BUILD, DETAIL as aligned columns (the detail not padded)."""
    lines = [("WHEN (UTC)", "INSTANCE", "EVENT", "IMAGE", "BUILD", "DETAIL")]
    lines += [(_when(e.at), e.instance, e.event, e.image or "-", e.build_id or "-", e.detail or "") for e in events]
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join(("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1]).rstrip()
                     for r in lines)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@task(help={
    "dry_run": "only report what would be removed and how much it frees",
    "image": "only this image (default: every configured image)",
    "json": "one JSON object per image on stdout",
})
def gc(c: Context, dry_run: bool = False, image: str = "", json: bool = False) -> None:
    """Apply retention now: keep each image's last N builds (never the published one, nor one an instance or a VM uses).

    It also removes what interrupted builds and fetches left in `.staging`, and says what it
    frees (docs/scheduling.md#history-and-retention).
    """
    from pipeline.base.units import mib  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.output import retention  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.output.history import History, image_lock  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    names = [cfg.image(image).name] if image else sorted(cfg.images)
    total = 0
    if not dry_run:  # a dry run writes nothing
        with History(cfg.output_dir) as hist:
            hist.reap()
    for name in names:
        img = cfg.images[name]
        if not (cfg.output_dir / name).is_dir():
            continue
        try:
            with contextlib.nullcontext() if dry_run else image_lock(cfg.output_dir / name, wait=False):
                if not dry_run:
                    retention.clean_stale(cfg.output_dir / name, say, fetches=True)
                plan = retention.apply(cfg.output_dir, name, img.retention, dry_run=dry_run)
        except LockBusy as exc:
            say(f"{name}: left alone ({exc.message})")
            continue
        total += plan.bytes
        verb = "would remove" if dry_run else "removed"
        if json:
            print(json_mod.dumps({"image": name, "dry_run": dry_run, "builds": plan.removed,
                                  "paths": [str(p) for p in plan.paths], "bytes": plan.bytes,
                                  "in_use": plan.in_use, "backing": plan.backing}), flush=True)
        else:
            what = f"build{'s' if len(plan.removed) > 1 else ''} {', '.join(plan.removed)}" if plan.removed else "no builds"
            logs = len(plan.paths) - len(plan.removed)  # the removed builds' logs and old failed builds' logs
            what += f", {logs} log folder{'s' if logs != 1 else ''}" if logs else ""
            kept = f"; {plan.in_use_text()}" if plan.in_use or plan.backing else ""
            say(f"{name}: keep {img.retention}; {verb} {what} ({mib(plan.bytes)}){kept}")
    if not json:
        say(f"{'would free' if dry_run else 'freed'} {mib(total)} in total")


@task(help={
    "all": "every configured image",
    "image": "this image (repeatable: --image a --image b)",
    "remote": "run the rebuild on this builder (from invoke.yaml builders) instead of here",
    "json": "one JSON object per event on stdout (for timers and scripts)",
    "force": "build even when the inputs did not change",
    "accel": LOCAL_ACCEL_HELP + "; with --remote it is sent to the builder only when given",
    "default_schedule": "with --all: only images without their own `schedule:` (those have their own timer)",
}, iterable=["image"])
def rebuild(c: Context, all: bool = False, image: list[str] | None = None, remote: str = "", json: bool = False,
            force: bool = False, accel: str = "", default_schedule: bool = False) -> None:
    """Rebuild what changed (the timer's job): refresh ISO pins, build, test, publish, record, prune.

    Images this host cannot build are `skipped`; the exit code is non-zero only when an image
    failed. With --remote the build runs on the builder and the result is fetched. Each built
    image's report line says what changed against the build before it (docs/scheduling.md).
    """
    from pipeline import rebuild as rb  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    images = rb.select(cfg, image or [], all, default_schedule)
    if remote:
        from pipeline.builders.remote import ssh_config_path  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        outcomes = rb.delegate_remote(cfg, remote, images, json, accel=remote_accel_option(accel),
                                      ssh_config=ssh_config_path(c.config))
    else:
        outcomes = rb.rebuild(cfg, images, accel=accel_option(accel, cfg), json_lines=json, force=force)
    rb.check(outcomes)
