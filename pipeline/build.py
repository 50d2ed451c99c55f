"""One image build as named steps: probe → plan → lock → [input-hash check] → drive → verify
→ [boot test] → other formats → package list + SBOM → publish → history → retention.

Every step is announced on the progress view. Whatever happens after staging starts (a tool
failure, a failed check, Ctrl-C, SIGTERM), the staging folder is removed and the published
image is left exactly as it was; the build's logs stay under output/<image>/logs/<id>/.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__, distros, inputs, keys, summary
from pipeline.base import digest
from pipeline.base.errors import (
    CommandFailed,
    HostUnsuitable,
    ImagepipeError,
    Interrupted,
    StorageError,
    ToolMissing,
    UnsafePath,
)
from pipeline.base.fsutil import check_dir, ensure_dir, free_space, is_storage_error, storage_error
from pipeline.base.procs import start_time
from pipeline.base.run import install_hint, interrupt_guard, tool_groups
from pipeline.base.text import visible_lines
from pipeline.base.units import clock, mib
from pipeline.contents import packages, sbom
from pipeline.drivers import Driver
from pipeline.drivers.packer import parse_machine_line
from pipeline.host import HostFacts, existing_parent, probe
from pipeline.model import Accel, Config, Image
from pipeline.output import artifacts, history, retention
from pipeline.plan import BuildPlan, make_build_plan, new_build_id
from pipeline.progress import Event, Progress
from pipeline.vm.boottest import boot_test
from pipeline.vm.lifecycle import staged_target

if TYPE_CHECKING:
    from pipeline.builders.remote import Target


@dataclass(frozen=True)
class BuildOptions:
    accel: Accel = Accel.AUTO
    on_error: str = "cleanup"      # passed to packer: cleanup | abort
    dry_run: bool = False
    boot_test: bool = False
    json: bool = False
    if_changed: bool = False       # skip when the input hash equals the published build's
    wait: bool = True              # another build of the image holds the lock: wait (or LockBusy)
    location: str = "local"        # where the build runs, for the history (local or a builder host)
    builder: Target | None = None  # a builder the engine drives itself (NixOS: nix over ssh-ng)
    accept_new_host_key: bool = False  # with `builder`: pin its host key if none is known yet
    authorize: tuple[str, ...] = ()  # further public keys for ssh_user (a remote build: the asker's key)


@dataclass(frozen=True)
class BuildResult:
    image: str
    build_id: str
    build_dir: Path | None         # None for a dry run or a skipped build
    manifest: dict[str, Any] | None
    skipped: str | None = None     # why nothing was built (--if-changed: "up to date: ...")


def build_tools(images: Iterable[Image]) -> list[str]:
    """Every host tool that building `images` needs (what the build's probe asks about)."""
    tools: set[str] = set()
    for image in images:
        profile = distros.profile(image)
        tools.update(profile.driver.tools, profile.needed_tools(image))
    return sorted(tools)


def probe_for_build(cfg: Config, images: Iterable[Image] | None = None, *, save_cache: bool = True) -> HostFacts:
    """Local host facts for building `images` (default: all), probed once for the whole command:
    the tools those builds need (versions from a stat-keyed cache) and the output dir's free disk."""
    wanted = build_tools(images if images is not None else cfg.images.values())
    return probe(disk_path=str(existing_parent(cfg.output_dir)), tools=wanted,
                 version_cache=cfg.output_dir / inputs.VERSION_CACHE, save_cache=save_cache)


def check_layout(output_dir: Path, image_dir: Path) -> None:
    """Before a build starts: the image's folders are real folders inside the output folder and
    `current` is a link (UnsafePath naming what to move away otherwise). A real file at a stable
    path (`<image>.qcow2`, ...) is not ours and is left alone by publish."""
    check_dir(image_dir, output_dir)
    for shared in (".cache", ".keys"):  # caches and the key are written during the build too
        check_dir(output_dir / shared, output_dir)
    for name in (".staging", "builds", "logs"):
        check_dir(image_dir / name, image_dir)
    current = image_dir / artifacts.CURRENT
    if current.exists() and not current.is_symlink():
        raise UnsafePath(f"{current} is a real {'folder' if current.is_dir() else 'file'} where imagepipe keeps "
                         "the link to the published build; publishing would have to replace it",
                         f"move {current} away and build again")


def build_image(
    cfg: Config, image: Image, opts: BuildOptions, *, facts: HostFacts | None = None,
    progress: Progress | None = None, say: Callable[[str], None] = print,
) -> BuildResult:
    """Build `image` on this host and publish it; raises an ImagepipeError on any failure.

    The whole build holds the image's lock; it is recorded in the history from start to end;
    with `opts.if_changed` nothing is built when the inputs equal the published build's.
    """
    if opts.dry_run:
        s = dry_run(cfg, image, opts, facts)
        say(summary.format_text(s))
        if s.problems:
            raise s.problems[0].error()
        return BuildResult(image.name, summary.BUILD_ID, None, None)
    # Whether this host can build the image is decided before anything is created or locked.
    facts, driver, plan = decide(cfg, image, opts, facts)
    check_layout(cfg.output_dir, plan.image_dir)
    with interrupt_guard(), history.image_lock(plan.image_dir, build_id=plan.build_id, wait=opts.wait, say=say):
        with history.History(cfg.output_dir) as hist:
            hist.reap()
        retention.clean_stale(plan.image_dir, say)
        ihash = inputs.compute(cfg, image)
        if opts.if_changed:  # checked again under the lock: a build we waited for may have done it
            fresh = inputs.up_to_date(plan.image_dir, ihash.value)
            if fresh:
                say(f"{image.name}: {fresh}")
                return BuildResult(image.name, plan.build_id, None, None, skipped=fresh)
        _announce(plan, facts, say)
        result = _recorded_build(cfg, plan, driver, facts, ihash, opts, progress)
        retention.after_publish(cfg.output_dir, image.name, image.retention, say)
        return result


def _announce(plan: BuildPlan, facts: HostFacts, say: Callable[[str], None]) -> None:
    """What the profile wants said before the build (the accelerator, a KVM warning)."""
    line = distros.profile(plan.image).announce(plan, facts)
    for part in (line or "").splitlines():
        say(f"{plan.image.name}: {part}")


def decide(cfg: Config, image: Image, opts: BuildOptions,
           facts: HostFacts | None) -> tuple[HostFacts, Driver, BuildPlan]:
    """Probe (unless given), refuse what this host cannot build, and plan: nothing is written
    but the project key and the tool-version cache (a dry run writes neither)."""
    facts = facts or probe_for_build(cfg, [image], save_cache=not opts.dry_run)
    profile = distros.profile(image)
    route, problem = _route(cfg, image, facts, opts.builder, opts.accept_new_host_key)
    if problem is not None:
        raise problem
    key = keys.project_key(cfg.output_dir, cfg.defaults.ssh_key, create=not opts.dry_run)
    plan = make_build_plan(cfg, image, profile, facts, opts.accel, key, build_id=new_build_id(), route=route,
                           extra_keys=opts.authorize)
    driver = profile.driver
    driver.check(plan, facts)
    preflight(image, facts)
    return facts, driver, plan


def _route(cfg: Config, image: Image, facts: HostFacts, builder: Target | None = None,
           accept_new_host_key: bool = False) -> tuple[Any, HostUnsuitable | None]:
    """Where the engine builds `image` (None: here) and, when nowhere it knows, why not."""
    profile = distros.profile(image)
    # an engine that builds elsewhere itself (nix's remote builds) answers for that machine
    route = profile.engine_route(image, facts, cfg, builder, accept_new_host_key)
    return route, profile.host_problem(image, facts, cfg) if route is None else None


def host_refusal(cfg: Config, image: Image, facts: HostFacts, accel: Accel = Accel.AUTO) -> HostUnsuitable | None:
    """Why neither this host nor a builder its engine knows can build `image`: the refusal
    build_image would raise before creating anything (the engine's route, then the plan's
    accelerator, CPU level and firmware), or None. Nothing is written."""
    route, problem = _route(cfg, image, facts)
    if problem is not None:
        return problem
    try:
        make_build_plan(cfg, image, distros.profile(image), facts, accel, cfg.output_dir / ".keys" / "unused",
                        build_id="check", route=route)
    except HostUnsuitable as exc:
        return exc
    return None


def preflight(image: Image, facts: HostFacts) -> None:
    """Every tool the build needs is here, before anything starts (ToolMissing names each and why)."""
    missing = {tool: why for tool, why in sorted(distros.profile(image).needed_tools(image, facts).items())
               if not facts.tool(tool).found}
    if missing:
        lines = [f"{tool} not found on PATH (needed for {why})" for tool, why in missing.items()]
        raise ToolMissing("; ".join(lines), "; ".join(install_hint(tool) for tool in missing))


def _recorded_build(cfg: Config, plan: BuildPlan, driver: Driver, facts: HostFacts, ihash: inputs.InputHash,
                    opts: BuildOptions, progress: Progress | None) -> BuildResult:
    """Run the build's steps with a history row from start to end."""
    image = plan.image
    with history.History(cfg.output_dir) as hist:
        location = plan.route.where if plan.route is not None else opts.location
        hist.start(plan.build_id, image.name, location=location, input_hash=ihash.value,
                   log_path=plan.log_dir)

        def on_group(pgid: int) -> None:  # so the next command can stop what a killed build left
            with contextlib.suppress(ImagepipeError):
                hist.set_tool_group(plan.build_id, pgid, start_time(pgid))

        try:
            with tool_groups(on_group):
                result = _steps(cfg, plan, driver, facts, ihash, opts, progress)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "failed"
            failure = _as_storage_error(exc, plan)
            _record_failure(hist, plan, status, failure or exc, driver)
            if failure is not None:
                raise failure from exc
            raise
        art = (result.manifest or {}).get("artifact", {})
        try:
            hist.finish(plan.build_id, "ok", sha256=art.get("sha256"), size=art.get("size"))
        except ImagepipeError as err:  # the build is published; only its record is missing
            print(f"{image.name}: warning: published, but the history could not record it: {err.message}",
                  file=sys.stderr, flush=True)
    return result


@dataclass(frozen=True)
class Produced:
    """A complete build in its staging folder, not yet published."""

    manifest: dict[str, Any]
    sums: dict[str, str]           # SHA256SUMS: every file of the build but itself and the manifest
    primary: artifacts.Verified


def _steps(cfg: Config, plan: BuildPlan, driver: Driver, facts: HostFacts, ihash: inputs.InputHash,
           opts: BuildOptions, progress: Progress | None) -> BuildResult:
    """produce → publish, in a staging folder that vanishes on failure."""
    image = plan.image
    progress = progress or Progress(image.name, json_lines=opts.json)
    progress.attach(total=len(summary.step_names(driver, plan.image, facts, opts.boot_test)),
                    console_log=plan.console_log, log_path=plan.build_log)
    with progress, _staging(plan) as stage:
        started = time.time()
        _log_header(progress, plan, driver, facts)
        done = produce(cfg, plan, driver, facts, ihash, opts, progress, stage)
        progress.step_event("publish")
        artifacts.write_build_files(stage, done.manifest, done.sums)
        final = artifacts.publish(stage, plan.image_dir, plan.build_id)
        others = len(done.manifest["artifacts"]) - 1
        progress.emit(Event("done", f"published {plan.image_dir / plan.artifact_name} "
                                    f"({mib(done.primary.size)}, sha256 {done.primary.sha256[:12]}…)"
                                    + (f" and {others} more format(s)" if others else "")
                                    + f" in {clock(time.time() - started)}"))
    return BuildResult(image.name, plan.build_id, final, done.manifest)


def produce(cfg: Config, plan: BuildPlan, driver: Driver, facts: HostFacts, ihash: inputs.InputHash,
            opts: BuildOptions, progress: Progress, stage: Path) -> Produced:
    """drive → verify → [boot test] → other formats → package list + SBOM → manifest: a complete
    build inside `stage` (publishing it is the caller's step; check-reproducible never does)."""
    image = plan.image
    started = time.time()
    produced = driver.drive(plan, facts, stage, progress, on_error=opts.on_error)
    progress.step_event("verify (qemu-img check, sha256)")
    compressed = image.compress_qcow2 and image.format.value == "qcow2"  # the engine compressed it
    primary = artifacts.verify(produced, image.format.value, compressed=compressed)
    if opts.boot_test:
        progress.step_event("boot test")
        _boot_test(cfg, plan, facts, produced, opts, progress.info)
    files = [primary, *_other_formats(image, primary, stage, progress)]
    progress.step_event("package list and SBOM")
    found = distros.profile(plan.image).packages(plan, stage, progress.info)
    manifest = _manifest(plan, facts, files, started)  # the profile's manifest_extra may read collected/
    shutil.rmtree(stage / packages.COLLECTED, ignore_errors=True)  # recorded in the manifest now
    manifest["input_hash"] = ihash.value
    manifest["input_parts"] = ihash.parts
    manifest["packages"] = packages.to_manifest(found)
    manifest["sbom"] = sbom.FILE_NAME
    (stage / sbom.FILE_NAME).write_text(sbom.dumps(sbom.document(manifest, found)), encoding="utf-8")
    image_names = {v.file for v in files}
    others = {p.name: artifacts.hashes_known(p) for p in sorted(stage.iterdir())
              if p.is_file() and p.name not in image_names}
    manifest["files"] = {name: hashes[digest.SHA256] for name, hashes in others.items()}
    sums = {**{v.file: v.sha256 for v in files}, **manifest["files"]}
    fast = {**{v.file: v.blake3 for v in files}, **{n: h.get(digest.FAST) for n, h in others.items()}}
    if all(fast.values()):  # every file of SHA256SUMS, or none: a fetch verifies with one hash
        manifest[digest.FAST] = fast
    return Produced(manifest, sums, primary)


def _other_formats(image: Image, primary: artifacts.Verified, stage: Path,
                   progress: Progress) -> list[artifacts.Verified]:
    """The image's further formats, converted from the verified primary file and verified."""
    out = []
    for fmt in image.formats[1:]:
        progress.step_event(f"convert to {fmt.value} (qemu-img convert, verify)")
        out.append(artifacts.convert(primary, stage, fmt.value, compress=image.compress_qcow2))
    return out


def _log_header(progress: Progress, plan: BuildPlan, driver: Driver, facts: HostFacts) -> None:
    """The first lines of build.log: what is built, where, how (never a secret)."""
    image = plan.image
    progress.log_only(f"imagepipe {__version__}: build {plan.build_id} of {image.name} "
                      f"({image.distro} {image.version} {image.arch.value}) on {socket.gethostname()} "
                      f"({facts.os} {facts.machine})")
    progress.log_only(f"accelerator {plan.accel.accel.value}: {plan.accel.reason}")
    progress.log_only(f"engine {driver.name}; raw tool output: {plan.raw_log}; guest console: {plan.console_log}")


def _as_storage_error(exc: BaseException, plan: BuildPlan) -> StorageError | None:
    """A build that failed because the disk is full or read-only, as one clear StorageError (the
    path and the free space); None for any other failure."""
    if isinstance(exc, OSError) and is_storage_error(exc):
        return storage_error(exc, exc.filename or plan.staging)
    if isinstance(exc, CommandFailed) and "no space left on device" in exc.tail.lower():
        tool = Path(exc.argv[0]).name if exc.argv else "a tool"
        return StorageError(f"{tool} ran out of disk space writing {plan.staging} ({free_space(plan.staging)})"
                            + _disk_cause(exc.tail), f"free some space (invoke gc removes old builds) or move "
                            f"defaults.output_dir; full log: {plan.build_log}")
    return None


def _disk_cause(tail: str) -> str:
    """The tool's own line that names the full disk (a Packer machine-readable line unwrapped,
    its control characters made visible), shortened: what failed, not the tool's command line."""
    for raw in reversed(tail.splitlines()):
        if "no space left on device" not in raw.lower():
            continue
        event = parse_machine_line(raw)
        line = " ".join((event.message if event else raw).split()).strip(" =>-!")
        if line:  # its end says what failed (the front is mostly a long path)
            line = visible_lines(line)
            return f": {line if len(line) <= 200 else '…' + line[-199:]}"
    return ""


def _record_failure(hist: history.History, plan: BuildPlan, status: str, exc: BaseException,
                    driver: Driver) -> None:
    """Record how the build ended where the database still can; a bug's trace goes to the build log."""
    if not isinstance(exc, (ImagepipeError, KeyboardInterrupt, OSError)):
        with contextlib.suppress(OSError), open(plan.build_log, "a", encoding="utf-8") as log:
            log.write("imagepipe: unexpected error\n" + "".join(traceback.format_exception(exc)))
    try:
        hist.finish(plan.build_id, status, error=describe_failure(exc, driver))
    except ImagepipeError as err:
        print(f"{plan.image.name}: warning: the build could not be recorded as {status} in the history: "
              f"{err.message}", file=sys.stderr, flush=True)


def describe_failure(exc: BaseException, driver: Driver | None = None) -> str:
    """A short account of a failure (history, rebuild report): a tool's own error lines, not its
    argv; what the tool printed has its control characters made visible."""
    return visible_lines(_failure_text(exc, driver))


def _failure_text(exc: BaseException, driver: Driver | None) -> str:
    if isinstance(exc, OSError) and is_storage_error(exc):
        return storage_error(exc).message
    if isinstance(exc, CommandFailed):
        tool = Path(exc.argv[0]).name if exc.argv else "command"
        if driver is not None and tool == driver.name:
            return driver.describe_failure(exc)
        errors = [line.strip() for line in exc.tail.splitlines() if "error" in line.lower()]
        detail = "; ".join(dict.fromkeys(e for e in errors if e))
        return f"{tool} exited {exc.returncode}" + (f": {detail}" if detail else "")
    if isinstance(exc, ImagepipeError):
        return exc.message
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _staging(plan: BuildPlan) -> Iterator[Path]:
    """The staging folder; removed on any failure or interrupt (publish moves it away on success)."""
    ensure_dir(plan.log_dir, plan.image_dir)
    ensure_dir(plan.staging.parent, plan.image_dir)
    plan.staging.mkdir()
    try:
        yield plan.staging
    except BaseException:
        artifacts.discard(plan.staging)
        raise
    artifacts.discard(plan.staging)  # already moved into builds/ when publish succeeded


def _boot_test(cfg: Config, plan: BuildPlan, facts: HostFacts, produced: Path, opts: BuildOptions,
               say: Callable[[str], None]) -> None:
    boot = distros.profile(plan.image).boot_info(plan.image)
    target = staged_target(plan.image, produced, boot.as_manifest() if boot else None, plan.build_id,
                           base=plan.staging)
    boot_test(cfg, target, cfg.output_dir, opts.accel, facts=facts, say=say)


def _manifest(plan: BuildPlan, facts: HostFacts, files: list[artifacts.Verified], started: float) -> dict[str, Any]:
    """What was built, where, how and from what — never a secret. `artifact` is the primary image
    file (what `run` boots), `artifacts` every image file, the primary first."""
    image = plan.image
    finished = time.time()
    manifest: dict[str, Any] = {
        "image": image.name,
        "build_id": plan.build_id,
        "distro": image.distro,
        "version": image.version,
        "arch": image.arch.value,
        "started": artifacts.utc_stamp(started),
        "finished": artifacts.utc_stamp(finished),
        "duration_s": round(finished - started, 1),
        "host": {"name": socket.gethostname(), "os": facts.os, "machine": facts.machine,
                 "where": plan.route.where if plan.route is not None else "local"},
        "accelerator": {"name": plan.accel.accel.value, "reason": plan.accel.reason},
        "tools": {n: t.version for n, t in sorted(facts.tools.items()) if t.found},
        "imagepipe": __version__,
        "artifact": files[0].as_manifest(),
        "artifacts": [v.as_manifest() for v in files],
    }
    profile = distros.profile(image)
    boot = profile.boot_info(image)
    if boot:
        manifest["boot"] = boot.as_manifest()
    manifest.update(profile.manifest_extra(plan))
    return manifest


def dry_run(cfg: Config, image: Image, opts: BuildOptions, facts: HostFacts | None = None) -> summary.Summary:
    """--dry-run: what a build would do (pipeline.summary); writes nothing, not even the
    tool-version cache or the project key."""
    if facts is None:
        facts = probe(disk_path=str(existing_parent(cfg.output_dir)), tools=build_tools([image]), version_cache=None)
    return summary.summarize(cfg, image, facts, accel=opts.accel, boot_test=opts.boot_test, builder=opts.builder,
                             accept_new_host_key=opts.accept_new_host_key)
