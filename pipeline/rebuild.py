"""The unattended rebuild (what a timer runs): for each image, refresh its ISO pin, compute the
input hash, build only if it changed, boot-test where possible, publish, record, apply retention.

Outcomes per image: `built`, `up-to-date`, `skipped` (this host cannot build it: foreign arch
without emulation, no firmware, nix cross-arch — not a failure, so `--all` on any machine is
meaningful) or `failed`. One failing image never stops the others; the exit code is non-zero
when any image failed.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import distros, fetch, inputs
from pipeline.base import events
from pipeline.base.crash import unexpected
from pipeline.base.errors import (
    BuildFailed,
    HostUnsuitable,
    ImagepipeError,
    Interrupted,
    UsageError,
)
from pipeline.base.events import Event, Outcome
from pipeline.base.fsutil import is_storage_error, storage_error
from pipeline.build import (
    BuildOptions,
    build_image,
    describe_failure,
    host_refusal,
    probe_for_build,
)
from pipeline.builders import dispatch, remote
from pipeline.contents import diff
from pipeline.model import Accel, Config, Image
from pipeline.output import artifacts, retention

Emit = Callable[..., None]


def available(module: str) -> bool:
    """True when `pipeline.<module>` is part of this installation (optional features)."""
    return importlib.util.find_spec(f"pipeline.{module}") is not None


def make_emitter(json_lines: bool) -> Emit:
    """emit(kind, image, message, **fields): a JSON event per line on stdout (pipeline.base.events), or a
    plain line on stderr."""

    def emit(kind: str, image: str, message: str, **data: Any) -> None:
        if json_lines:
            events.write(Event(kind, message, source="imagepipe", fields=data), image)
        else:
            stamp = time.strftime("%H:%M:%S")
            print(f"{stamp} [{image}] {kind}: {message}", file=sys.stderr, flush=True)

    return emit


def select(cfg: Config, names: Sequence[str], all_images: bool, default_schedule: bool) -> list[Image]:
    """The images to rebuild: named ones, or every image (--all; with default_schedule only those
    without their own `schedule:`, which have their own timer)."""
    if names and all_images:
        raise UsageError("give --all or --image NAME, not both")
    if not names and not all_images:
        raise UsageError("nothing to rebuild", "use --all, or --image NAME (repeatable)")
    if names:
        return [cfg.image(n) for n in names]
    return [img for _, img in sorted(cfg.images.items()) if not (default_schedule and img.schedule)]


def rebuild(cfg: Config, images: Sequence[Image], *, accel: Accel = Accel.AUTO, json_lines: bool = False,
            force: bool = False, emit: Emit | None = None) -> list[Outcome]:
    """Rebuild `images` one after the other; returns one Outcome per image (never raises for a
    failing image; Ctrl-C / SIGTERM stop the run)."""
    emit = emit or make_emitter(json_lines)
    boot_test = available("vm")
    if not boot_test:
        emit("note", "*", "boot test off: the VM runner (pipeline.vm) is not part of this installation")
    facts = None
    outcomes = []
    for image in images:
        emit("start", image.name, "checking")
        if facts is None:
            facts = probe_for_build(cfg, images)
        outcome = _decided_early(cfg, image, facts, accel, force, emit) or _one(
            cfg, image, facts, accel=accel, json_lines=json_lines, force=force, boot_test=boot_test, emit=emit)
        emit(outcome.status, image.name, _with_changes(outcome, json_lines),
             **{k: v for k, v in (("build_id", outcome.build_id), ("sha256", outcome.sha256),
                                  ("changes", outcome.changes)) if v})
        outcomes.append(outcome)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("built", "up-to-date", "skipped", "failed")}
    emit("summary", "*", ", ".join(f"{n} {s}" for s, n in counts.items()), **counts)
    return outcomes


def _decided_early(cfg: Config, image: Image, facts: Any, accel: Accel, force: bool, emit: Emit) -> Outcome | None:
    """What needs no build step at all: `skipped` when this host cannot build the image (decided
    before its pin is refreshed: an image skipped here needs no network), else, after the pin's
    refresh, `up-to-date` when the published build has the current input hash (the same check
    build_image makes, without its history, and without its lock unless a killed build left
    something in .staging to remove: a no-op run stays well under a second).
    None: build_image decides (and re-checks under the image's lock)."""
    try:
        refusal = host_refusal(cfg, image, facts, accel)
    except ImagepipeError:
        return None  # build_image meets the same error and reports it as this image's failure
    if refusal is not None:
        return Outcome(image.name, "skipped", refusal.message)
    refresh_pin(cfg, image, emit)
    if force:
        return None

    fresh = inputs.up_to_date(cfg.output_dir / image.name, inputs.compute(cfg, image).value)
    if not fresh:
        return None
    if (cfg.output_dir / image.name / ".staging").is_dir():  # rare: retention and history load only then

        retention.reap_when_idle(cfg.output_dir / image.name, lambda line: emit("message", image.name, line))
    return Outcome(image.name, "up-to-date", fresh)


def _one(cfg: Config, image: Image, facts: Any, *, accel: Accel, json_lines: bool, force: bool,
         boot_test: bool, emit: Emit) -> Outcome:
    opts = BuildOptions(accel=accel, json=json_lines, if_changed=not force, boot_test=boot_test)
    before = artifacts.read_manifest(cfg.output_dir / image.name)
    try:
        result = build_image(cfg, image, opts, facts=facts, say=lambda m: _relay(emit, image, m))
    except HostUnsuitable as exc:
        return Outcome(image.name, "skipped", exc.message)
    except (KeyboardInterrupt, Interrupted):
        raise
    except ImagepipeError as exc:
        summary = describe_failure(exc, distros.profile(image).driver)
        return Outcome(image.name, "failed", summary + (f" ({exc.hint})" if exc.hint else ""))
    except Exception as exc:  # noqa: BLE001 - a bug in one image's build must not stop the timer's other images

        if isinstance(exc, OSError) and is_storage_error(exc):
            return Outcome(image.name, "failed", storage_error(exc).message)
        return Outcome(image.name, "failed", unexpected(exc, cfg.output_dir, f"rebuild-{image.name}").message)
    if result.skipped:
        return Outcome(image.name, "up-to-date", result.skipped)
    art = (result.manifest or {}).get("artifact", {})
    tested = " (boot-tested)" if boot_test else ""
    return Outcome(image.name, "built", f"published build {result.build_id}{tested}", result.build_id,
                   art.get("sha256"), changes(before, result.manifest))


def changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a new build changed against the one published before it (None when there was none)."""
    if before is None or after is None or before.get("build_id") == after.get("build_id"):
        return None
    return diff.summary(diff.compare(before, after))


def _with_changes(outcome: Outcome, json_lines: bool) -> str:
    """The outcome's message; the text report adds the changes on the same line."""
    if json_lines or not outcome.changes:
        return outcome.message

    return f"{outcome.message}; {diff.summary_line(outcome.changes)}"


def _relay(emit: Emit, image: Image, message: str) -> None:
    """A build's own messages, minus the up-to-date line the outcome repeats."""
    text = message.removeprefix(f"{image.name}: ")
    if not text.startswith("up to date:"):
        emit("message", image.name, text)


def refresh_pin(cfg: Config, image: Image, emit: Emit) -> None:
    """Re-resolve the image's pinned input (AlmaLinux: the ISO in iso.lock.json); offline → keep
    the pin and say so. The pin feeds the input hash, so a new point release leads to a rebuild."""
    pin = distros.profile(image).pin
    if pin is None:
        return
    configured = pin.configured(image)
    if configured:
        emit("pin", image.name, configured)
        return
    try:
        summary = pin.refresh(cfg.root, image)
    except ImagepipeError as exc:
        emit("pin", image.name, f"kept the pinned {pin.what} (could not check for updates: {exc.message})")
        return
    emit("pin", image.name, f"{pin.what}: {summary}")


def delegate_remote(cfg: Config, host: str, images: Sequence[Image], json_lines: bool, *,
                    accel: str | None = None, ssh_config: str | None = None,
                    emit: Emit | None = None) -> list[Outcome]:
    """--remote HOST: sync to the builder, build there what changed (`build --if-changed`), fetch
    and publish here. One Outcome per image; a failing image does not stop the others."""
    emit = emit or make_emitter(json_lines)
    target = remote.resolve(cfg, host, ssh_config)

    def say(line: str) -> None:
        emit("message", "*", line)

    conn = remote.connect(target)
    outcomes: list[Outcome] = []
    try:
        dispatch.prepare(conn, target, cfg, say)
        mine = remote.local_public_key(cfg)
        for image in images:
            emit("start", image.name, f"building on {target.name} if changed")
            code = remote.remote_build(conn, target, image.name, accel, say, extra=["--if-changed"],
                                      authorize=mine)
            if code != 0:
                outcomes.append(Outcome(image.name, "failed", f"remote build on {target.name} exited {code}"))
                emit("failed", image.name, outcomes[-1].message)
                continue
            before = artifacts.read_manifest(cfg.output_dir / image.name)
            try:
                got = fetch.fetch(conn, target, cfg, image, say)
            except ImagepipeError as exc:
                outcomes.append(Outcome(image.name, "failed", exc.message.splitlines()[0]))
                emit("failed", image.name, outcomes[-1].message)
                continue
            status = "up-to-date" if got.skipped else "built"
            after = artifacts.read_manifest(cfg.output_dir / image.name) if not got.skipped else None
            outcomes.append(Outcome(image.name, status, f"{status} on {target.name}", got.build_id,
                                    changes=changes(before, after)))
            emit(status, image.name, _with_changes(outcomes[-1], json_lines),
                 **({"changes": outcomes[-1].changes} if outcomes[-1].changes else {}))
    finally:
        conn.close()
    return outcomes


def check(outcomes: Sequence[Outcome]) -> None:
    """Raise BuildFailed (exit 1) naming the failed images, if any."""
    failed = [o.image for o in outcomes if o.failed]
    if failed:
        raise BuildFailed(f"{len(failed)} of {len(outcomes)} image(s) failed: {', '.join(failed)}",
                          "details above; every build is listed by: invoke history")
