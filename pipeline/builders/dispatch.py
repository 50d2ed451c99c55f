"""Builds on builders: which images go where (pure), one thread per builder, a summary table.

Each builder gets the project synced once, its venv checked once, then builds its images one
after the other (two packer builds on one builder would fight over its CPUs and ports); different
builders work in parallel. Output lines carry the builder's name as prefix.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from pipeline.base.crash import unexpected
from pipeline.base.errors import HostUnsuitable, ImagepipeError
from pipeline.base.events import Outcome
from pipeline.builders import remote
from pipeline.model import Builder, Config, Image


def assign(images: Sequence[Image], builders: Mapping[str, Builder], host: str = "") -> dict[str, list[str]]:
    """builder name → images it builds. With `host` all go there; else spread by arch, least loaded first."""
    if host:
        return {host: [i.name for i in images]}
    plan: dict[str, list[str]] = {}
    for img in images:
        fits = [b for b in sorted(builders) if builders[b].arch in (None, img.arch)]
        if not fits:
            raise HostUnsuitable(
                f"no configured builder can build {img.name} ({img.arch.value})",
                hint=f"add a builder with arch: {img.arch.value} under `builders:` in invoke.yaml, or name one")
        chosen = min(fits, key=lambda b: len(plan.get(b, [])))
        plan.setdefault(chosen, []).append(img.name)
    return plan


def sync_and_build(cfg: Config, target: remote.Target, images: Sequence[str], accel: str | None,
                   accept_new_host_key: bool, say: Callable[[str], None]) -> list[Outcome]:
    """Connect, sync, venv, then build each image on one builder; never raises for a failed build."""
    rows: list[Outcome] = []
    try:
        conn = remote.connect(target, accept_new_host_key=accept_new_host_key)
        try:
            prepare(conn, target, cfg, say)
            mine = remote.local_public_key(cfg)
            for name in images:
                started = time.monotonic()
                code = remote.remote_build(conn, target, name, accel, say, authorize=mine)
                rows.append(Outcome(name, "ok" if code == 0 else "failed", builder=target.name, exit_code=code,
                                    seconds=time.monotonic() - started))
        finally:
            conn.close()
    except ImagepipeError as exc:
        say(f"{target.prefix}error: {exc.render()}")
        rows += _not_run(images, rows, target.name, exc.exit_code, exc.message.splitlines()[0])
    except Exception as exc:  # noqa: BLE001 — a bug must not silently drop this builder's rows from the summary
        err = unexpected(exc, cfg.output_dir if cfg.output_dir.is_dir() else None, f"builder-{target.name}")
        say(f"{target.prefix}error: {err.message}")
        rows += _not_run(images, rows, target.name, 1, err.message)
    return rows


def _not_run(images: Sequence[str], rows: list[Outcome], builder: str, code: int, detail: str) -> list[Outcome]:
    done = len(rows)
    return [Outcome(n, "not run", detail, builder=builder, exit_code=code) for n in images[done:]]


def prepare(conn: object, target: remote.Target, cfg: Config, say: Callable[[str], None]) -> None:
    """Sync the project to the builder and make sure its venv is current."""
    started = time.monotonic()
    stats = remote.sync(conn, target, cfg.root, remote.local_excludes(cfg))
    say(f"{target.prefix}synced {cfg.root} → {target.host}:{target.dir}: {stats.transferred} files, "
        f"{stats.literal} bytes file data, {stats.sent} bytes sent, {stats.how} ({time.monotonic() - started:.1f}s)")
    remote.ensure_venv(conn, target, cfg.root, say)


def run_parallel(cfg: Config, plan: Mapping[str, list[str]], targets: Mapping[str, remote.Target], accel: str | None,
                 accept_new_host_key: bool, say: Callable[[str], None]) -> list[Outcome]:
    """One thread per builder; returns every outcome (in plan order)."""
    results: dict[str, list[Outcome]] = {}
    lock = threading.Lock()

    def locked_say(line: str) -> None:
        with lock:
            say(line)

    def work(name: str) -> None:
        results[name] = sync_and_build(cfg, targets[name], plan[name], accel, accept_new_host_key, locked_say)

    threads = [threading.Thread(target=work, args=(n,), name=f"builder-{n}", daemon=True) for n in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [row for name in plan for row in results.get(name, [])]


def summary(rows: Sequence[Outcome]) -> str:
    """The table printed after a multi-image remote build."""
    header = ("image", "builder", "status", "exit", "time")
    lines = [header] + [(r.image, r.builder, r.status, str(r.exit_code), f"{r.seconds:.0f}s") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out += [f"  {r.image} on {r.builder}: {r.message}" for r in rows if r.message]
    return "\n".join(out)
