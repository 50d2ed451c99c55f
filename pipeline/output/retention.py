"""Retention: keep the last N builds of each image, never the published one; clean up after kills.

Kept per image: the published build (`current`) plus the newest complete builds (builds/<id>
holding a manifest: only verified builds get there) up to N in all, and beyond that every build
an instance is backed by (its disk is an overlay on that build's file) or a running process
names (a boot test's VM). Removed: older builds and
incomplete folders. Logs of kept
builds stay; logs of removed builds go; logs of failed builds are kept for the newest N of them
(they are what a person reads after a failure) and pruned beyond that.

Everything here runs while the image's lock is held, so no build of that image is in flight.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.base.errors import ImagepipeError, LockBusy
from pipeline.base.fsutil import check_dir, safe_rmtree
from pipeline.base.procs import pids_mentioning, stop_processes_in
from pipeline.base.units import mib
from pipeline.output import artifacts, history

INSTANCES = "instances"  # output/instances/<name>/instance.json: pipeline.vm.instances' records
FETCH_PREFIX = "fetch-"  # .staging/fetch-<build id>: a remote-fetch's, kept between tries to resume


@dataclass
class GcPlan:
    """What retention removes for one image, and how much that frees."""

    image: str
    removed: list[str] = field(default_factory=list)      # build ids whose builds/<id> goes
    paths: list[Path] = field(default_factory=list)       # every folder that goes
    bytes: int = 0
    in_use: dict[str, list[int]] = field(default_factory=dict)  # build id -> pids: kept though due
    backing: dict[str, list[str]] = field(default_factory=dict)  # build id -> instances: kept though due

    def in_use_text(self) -> str:
        """`kept 20261101T000000Z-ab12: the disk of instance web1 (…)` for every build kept because
        an instance is backed by it, and `kept …: in use by pid 123 (…)` for one a process uses."""
        backed = [f"kept {b}: the disk of instance{'s' if len(names) > 1 else ''} {', '.join(names)} is an overlay "
                  f"on it (invoke rm {names[0]}, or run it with --rebase, lets it go)" for b, names in self.backing.items()]
        used = [f"kept {b}: in use by pid {', '.join(map(str, pids))} (a running VM? stop it, then invoke gc)"
                for b, pids in self.in_use.items()]
        return "; ".join(backed + used)

    @property
    def human_bytes(self) -> str:
        return human(self.bytes)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def choose(build_ids: list[str], log_ids: list[str], current: str | None, statuses: Mapping[str, str],
           has_manifest: Callable[[str], bool], keep: int) -> tuple[set[str], set[str]]:
    """Pure decision: (build ids to remove, log ids to remove). Ids sort by time."""
    good = [b for b in sorted(build_ids) if has_manifest(b)]
    kept = {current} if current else set()
    for b in reversed(good):
        if len(kept) >= keep:
            break
        kept.add(b)
    remove_builds = set(build_ids) - kept
    failed_logs = [i for i in sorted(log_ids) if statuses.get(i) not in ("ok", "running", None)]
    kept_failed = set(failed_logs[-keep:])
    remove_logs = {
        i for i in log_ids
        if i not in kept and statuses.get(i) != "running" and i not in kept_failed
        and (i in remove_builds or i in failed_logs or statuses.get(i) == "ok")
    }
    return remove_builds, remove_logs


def plan(output_dir: Path, image: str, keep: int, statuses: Mapping[str, str]) -> GcPlan:
    """What `apply` would remove for `image` (nothing is touched)."""
    image_dir = output_dir / image
    builds_dir, logs_dir = image_dir / "builds", image_dir / "logs"
    for folder in (image_dir, builds_dir, logs_dir):  # a planted link is refused, never followed
        check_dir(folder, output_dir)
    build_ids = _children(builds_dir)
    log_ids = _children(logs_dir)
    current = artifacts.current_build(image_dir)
    remove_builds, remove_logs = choose(
        build_ids, log_ids, current.name if current else None, statuses,
        lambda b: (builds_dir / b / artifacts.MANIFEST).is_file(), keep)
    # A build an instance is backed by stays (its disk is an overlay on the build's file), and so
    # does one a process still names (a boot test's VM): removing it would break that disk.
    backed = backed_builds(output_dir, image)
    backing = {b: backed[b] for b in sorted(remove_builds) if b in backed}
    remove_builds -= backing.keys()
    in_use = {b: pids for b in sorted(remove_builds) if (pids := pids_mentioning(f"{builds_dir / b}/"))}
    remove_builds -= in_use.keys()
    remove_logs -= in_use.keys() | backing.keys()
    gc = GcPlan(image, sorted(remove_builds), in_use=in_use, backing=backing)
    gc.paths = [builds_dir / b for b in sorted(remove_builds)] + [logs_dir / i for i in sorted(remove_logs)]
    gc.bytes = sum(du(p) for p in gc.paths)
    return gc


def after_publish(output_dir: Path, image: str, keep: int, say: Callable[[str], None]) -> None:
    """`apply` once a new build is published (built here or fetched), said in one line; a failure
    here is only a warning: the new build is already in place."""
    try:
        freed = apply(output_dir, image, keep)
    except (ImagepipeError, OSError) as exc:  # e.g. a history.db this user cannot write
        say(f"{image}: warning: retention could not remove old builds: "
            f"{exc.message if isinstance(exc, ImagepipeError) else exc}")
        return
    if freed.removed:
        say(f"{image}: retention removed {len(freed.removed)} old build(s), freed {mib(freed.bytes)}")
    if freed.in_use or freed.backing:
        say(f"{image}: retention {freed.in_use_text()}")


def apply(output_dir: Path, image: str, keep: int, *, dry_run: bool = False) -> GcPlan:
    """Remove what `plan` names (the caller holds the image lock) and note it in the history."""
    with history.History(output_dir, readonly=dry_run) as hist:
        statuses = {b.id: b.status for b in hist.builds(image)}
        gc = plan(output_dir, image, keep, statuses)
        if dry_run:
            return gc
        for path in gc.paths:
            safe_rmtree(path, output_dir / image)
        hist.mark_removed(gc.removed)
    return gc


def backed_builds(output_dir: Path, image: str) -> dict[str, list[str]]:
    """build id -> the instances of `image` here whose disk is an overlay on that build (read
    from output/instances/*/instance.json, never through a link; a record that cannot be read
    names no build)."""
    out: dict[str, list[str]] = {}
    folder = output_dir / INSTANCES
    if folder.is_symlink() or not folder.is_dir():
        return out
    for record in sorted(folder.glob("*/instance.json")):
        if record.parent.is_symlink() or record.is_symlink() or record.parent.name.startswith("."):
            continue
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("image") == image and not data.get("on") \
                and isinstance(data.get("build_id"), str):
            out.setdefault(data["build_id"], []).append(record.parent.name)
    return out


def _children(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink()) if folder.is_dir() else []


def du(path: Path) -> int:
    """Bytes used by the files under `path` (apparent size; links are not followed)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):  # os.walk does not descend into linked folders
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


# --------------------------------------------------------------------------------- after a kill


def reap_when_idle(image_dir: Path, say: Callable[[str], None]) -> None:
    """A no-op run's tidy-up (`build --if-changed`, `rebuild` with nothing changed): what a
    killed build left in .staging goes, as a build's start would remove it (an interrupted
    fetch's folder stays, for that fetch to resume). Only when
    nothing holds the image's lock (a holder's staging folder is live), and free when there is
    no .staging folder, the usual case. Trouble here is said as a warning: nothing was asked."""
    if not (image_dir / ".staging").is_dir():
        return
    try:
        with history.image_lock(image_dir, wait=False):
            clean_stale(image_dir, say)
    except LockBusy:
        return
    except (ImagepipeError, OSError) as exc:
        say(f"{image_dir.name}: warning: could not remove what an interrupted run left in .staging: "
            f"{exc.message if isinstance(exc, ImagepipeError) else exc}")


def clean_stale(image_dir: Path, say: Callable[[str], None] | None = None, *, fetches: bool = False,
                keep: str | None = None) -> list[Path]:
    """Remove what a killed build left behind (the caller holds the lock, so it is all stale):
    staging folders (after stopping any tool still running in them) and half-made symlinks.
    An interrupted fetch's folder is kept for that fetch to resume unless `fetches` (gc; a fetch,
    which keeps `keep`, its own)."""
    removed: list[Path] = []
    staging = image_dir / ".staging"
    check_dir(image_dir, image_dir.parent)
    check_dir(staging, image_dir)  # `.staging -> /home/me` is refused, never emptied
    for stage in sorted(staging.iterdir()) if staging.is_dir() else []:
        if stage.name == keep or (stage.name.startswith(FETCH_PREFIX) and not fetches):
            continue
        stopped = stop_processes_in(stage) if stage.is_dir() and not stage.is_symlink() else []
        if say:
            extra = f", stopped {len(stopped)} leftover process(es)" if stopped else ""
            left_by = "fetch" if stage.name.startswith(FETCH_PREFIX) else "build"
            say(f"{image_dir.name}: removing {stage.name} left by an interrupted {left_by}{extra}")
        safe_rmtree(stage, image_dir, ignore_errors=True)
        removed.append(stage)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    for tmp in image_dir.glob(".*.tmp*"):  # artifacts' atomic-symlink temporaries
        if tmp.is_symlink():
            tmp.unlink()
            removed.append(tmp)
    return removed
