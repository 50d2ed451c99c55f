"""Named instances: the dev VMs `invoke run IMAGE [--name NAME]` makes and starts again.

An instance lives in output/instances/<name>/ (a state folder, pipeline.vm.state) and is:

    instance.json  its record: image, the build it is backed by (by build id, never `current`),
                   its SSH port, shared folders, idle stop, network, the keys its seed authorizes
    disk.qcow2     a qcow2 overlay whose backing file is builds/<id>/<file> of that build: the
                   guest writes here, the build's file is only ever read (its sha256 still
                   matches its manifest after any run); the overlay survives stop and start
    efivars.fd     its own UEFI variables
    seed.iso       its NoCloud seed (pipeline.vm.seed), rewritten at every start
    user-data      the user's --user-data, kept for the seed

A new build of the image changes no instance; `--rebase` moves one to the newest build and
says first what that loses (its disk's changes). Plain `invoke run IMAGE` means the instance
named after the image, so `invoke run demo-x86_64` / `invoke ssh demo-x86_64` and the per-image
tasks (run-demo, ssh-demo) keep working. Retention keeps every build an instance is backed by
(`backed_builds`). Creating an instance checks everything first (name, build, port, shared
folders, user-data, firmware, tools) and builds the folder under a temporary name: a failure
leaves nothing behind, and a new instance whose first start fails is removed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import distros, keys
from pipeline.base.errors import CorruptState, ImagepipeError, UnsafePath, UsageError
from pipeline.base.fsutil import atomic_write, ensure_dir, flocked, read_record, safe_rmtree
from pipeline.base.run import run
from pipeline.base.units import clock, mib
from pipeline.base.validate import NAME_RE
from pipeline.model import Accel, Config, Image, Network
from pipeline.output import artifacts
from pipeline.output.history import History
from pipeline.output.retention import INSTANCES
from pipeline.vm import idle, lifecycle, seed, shares
from pipeline.vm.argv import Attached, BootSpec, RunOptions
from pipeline.vm.ssh import SSH_DEADLINE, wait_for_banner
from pipeline.vm.state import (
    StatePaths,
    VmStatus,
    free_port,
    port_free,
    read_status,
    read_value,
    state_paths,
    write_value,
)

RECORD_VERSION = 1
NETWORKS = tuple(n.value for n in Network)
GRACE = 60.0


@dataclass(frozen=True)
class Record:
    """What instance.json holds."""

    name: str
    image: str
    build_id: str
    backing: str                  # the build's image file, relative to the instance folder
    backing_format: str
    created: float
    ssh_port: int
    instance_id: str
    port_fixed: bool = False      # given with --port: never moved to another port
    boot: dict[str, str] | None = None  # direct kernel boot: kernel/initrd relative to the folder, append
    shares: tuple[shares.Share, ...] = ()
    idle_stop: float | None = None     # minutes
    network: str = "user"
    keys: tuple[str, ...] = ()
    user_data: bool = False
    on: str | None = None         # a client's record of an instance on this builder

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shares"] = [s.as_json() for s in self.shares]
        data["keys"] = list(self.keys)
        return {"version": RECORD_VERSION, **data}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Record:
        fields_ = {k: v for k, v in data.items() if k in Record.__dataclass_fields__}
        fields_["shares"] = tuple(shares.Share(str(s["path"]), str(s["tag"])) for s in data.get("shares") or ())
        fields_["keys"] = tuple(str(k) for k in data.get("keys") or ())
        record = Record(**fields_)
        if not isinstance(record.ssh_port, int) or not isinstance(record.build_id, str):
            raise TypeError("ssh_port or build_id of the wrong type")
        return record


@dataclass(frozen=True)
class Request:
    """What one `invoke run` asks for (None / -1: keep what the instance has)."""

    name: str
    accel: Accel | None = None
    snapshot: bool = False
    gui: bool = False
    foreground: bool = False
    network: str = ""             # "" keep (new: defaults.instance_network) | user | isolated
    port: int | None = None       # None: keep / choose; 0: any free port
    shares: tuple[str, ...] = ()  # --share specs; () keep; ("none",) none
    idle_stop: float | None = None  # minutes; None keep; 0 off
    user_data: Path | None = None
    rebase: bool = False
    authorize: tuple[str, ...] = ()  # further public keys the seed authorizes (a client's, for --on)
    wait: bool = False            # return once the guest's sshd answers


@dataclass(frozen=True)
class Row:
    """One line of `invoke instances`."""

    record: Record
    status: VmStatus
    disk_bytes: int | None
    backing_present: bool
    stopped_by: str | None = None
    where: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self, now: float) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name, "image": r.image, "build_id": r.build_id, "state": self.status.state,
            "pid": self.status.pid, "ssh_port": self.status.ssh_port or r.ssh_port, "disk_bytes": self.disk_bytes,
            "created": artifacts.utc_stamp(r.created), "age_s": round(max(0.0, now - r.created), 1),
            "network": r.network, "idle_stop_min": r.idle_stop, "shares": [s.as_json() for s in r.shares],
            "backing_present": self.backing_present, "stopped_by": self.stopped_by, "where": self.where,
            "accelerator": self.status.accelerator, "paused": self.status.paused, **self.extra,
        }


# ------------------------------------------------------------------------------- layout


def root(output_dir: Path) -> Path:
    return output_dir / INSTANCES


def paths(output_dir: Path, name: str) -> StatePaths:
    return StatePaths(root(output_dir) / name)


def check_name(name: str) -> str:
    """An instance name: letters, digits, '.', '_', '-' (it names a folder and the hostname)."""
    if not NAME_RE.fullmatch(name) or ".." in name or name.startswith("."):
        raise UsageError(f"instance name {name!r} refused", "use 1-63 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    seed.hostname_for(name)
    return name


def load(output_dir: Path, name: str) -> Record | None:
    """The instance called `name`, or None; CorruptState for a record that cannot be read."""
    state = paths(output_dir, name)
    if root(output_dir).is_symlink() or state.root.is_symlink() or not state.record.is_file() \
            or state.record.is_symlink():
        return None  # never read through a link imagepipe did not make
    try:
        return Record.from_json(json.loads(state.record.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptState(f"{state.record} cannot be read ({exc})",
                           f"remove the instance (invoke rm {name}) or move its folder away") from None


def records(output_dir: Path, say: Callable[[str], None] | None = None) -> list[Record]:
    """Every instance here (a record that cannot be read is skipped, with a warning)."""
    folder = root(output_dir)
    out: list[Record] = []
    if folder.is_symlink() or not folder.is_dir():
        return out
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or child.is_symlink():
            continue
        try:
            rec = load(output_dir, child.name)
        except CorruptState as exc:
            if say:
                say(f"warning: {exc.message}")
            continue
        if rec is not None:
            out.append(rec)
    return out


def save(state: StatePaths, record: Record) -> None:
    atomic_write(state.record, json.dumps(record.as_json(), indent=2) + "\n")


def backing_path(state: StatePaths, record: Record) -> Path:
    return state.root / record.backing


@contextlib.contextmanager
def locked(output_dir: Path, what: str, say: Callable[[str], None]) -> Iterator[None]:
    """The instances' lock (output/instances/.lock): creating, starting, rebasing and removing
    instances take turns, so two of them never pick one name or one port."""
    folder = ensure_dir(root(output_dir), output_dir)
    lock = folder / ".lock"

    def busy() -> None:
        holder = read_record(lock)
        say(f"waiting for another imagepipe working on instances ({holder.get('what', '?')}, "
            f"pid {holder.get('pid', '?')})…")

    with flocked(lock, {"pid": os.getpid(), "what": what}, busy):
        yield


def note(output_dir: Path, record: Record, event: str, detail: str | None, say: Callable[[str], None]) -> None:
    """An event in the history (a history that cannot be written is only a warning)."""
    try:
        with History(output_dir) as hist:
            hist.note(record.name, event, image=record.image, build_id=record.build_id, detail=detail)
    except (ImagepipeError, OSError) as exc:
        say(f"warning: could not record '{event}' of {record.name} in the history: "
            f"{exc.message if isinstance(exc, ImagepipeError) else exc}")


# ------------------------------------------------------------------------------- ports


def choose_port(name: str, requested: int | None, recorded: int | None, preferred: int,
                taken_by: Mapping[int, str], is_free: Callable[[int], bool] = port_free,
                any_free: Callable[[], int] = free_port) -> tuple[int, str | None]:
    """The instance's SSH port and, when it moved, why (pure but for the probes passed in).

    requested (--port N): N, or UsageError when another instance has it or it is taken (0: any
    free port); recorded: kept while free, else moved; new: the image's port when free, else
    any free one. Ports of other instances are never given out (`taken_by`: port -> name)."""
    def fresh() -> int:
        for _ in range(50):
            port = any_free()
            if port not in taken_by:
                return port
        raise UsageError("no free port found on 127.0.0.1")

    if requested:
        if requested in taken_by:
            raise UsageError(f"port {requested} is the SSH port of instance {taken_by[requested]}",
                             "give another: --port N (or --port 0: any free port)")
        if not is_free(requested):
            raise UsageError(f"port {requested} on 127.0.0.1 is taken by another program",
                             "free it, or give another: --port N (or --port 0: any free port)")
        return requested, None
    if requested == 0:
        return fresh(), None
    if recorded is not None:
        if recorded not in taken_by and is_free(recorded):
            return recorded, None
        port = fresh()
        return port, f"port {recorded} is taken now: {name} moves to port {port}"
    if preferred not in taken_by and is_free(preferred):
        return preferred, None
    return fresh(), None


def ports_of_others(output_dir: Path, name: str) -> dict[int, str]:
    return {r.ssh_port: r.name for r in records(output_dir) if r.name != name and r.on is None}


# ------------------------------------------------------------------------------- creating


def _keys(cfg: Config, extra: Sequence[str]) -> tuple[str, ...]:
    """The keys a new instance's seed authorizes: this machine's login key (defaults.ssh_key or
    the project key) and any given with --authorize-key."""
    mine = keys.public_key(keys.project_key(cfg.output_dir, cfg.defaults.ssh_key))
    out = [mine, *extra]
    return tuple(dict.fromkeys(" ".join(k.split()[:3]) for k in out if k.strip()))


def _relative_boot(target: lifecycle.BootTarget, folder: Path) -> dict[str, str] | None:
    if target.boot is None:
        return None
    return {"kernel": os.path.relpath(target.boot.kernel, folder), "initrd": os.path.relpath(target.boot.initrd, folder),
            "append": target.boot.append}


def new_record(cfg: Config, image: Image, req: Request, target: lifecycle.BootTarget, port: int,
               share_list: tuple[shares.Share, ...]) -> Record:
    folder = root(cfg.output_dir) / req.name
    created = time.time()
    return Record(
        name=req.name, image=image.name, build_id=target.build_id,
        backing=os.path.relpath(target.disk, folder), backing_format=target.format, created=created,
        ssh_port=port, port_fixed=bool(req.port), instance_id=f"iid-imagepipe-{secrets.token_hex(8)}",
        boot=_relative_boot(target, folder), shares=share_list, idle_stop=req.idle_stop or None,
        network=req.network or cfg.defaults.instance_network.value, keys=_keys(cfg, req.authorize),
        user_data=req.user_data is not None,
    )


def make_overlay(disk: Path, backing: str, fmt: str) -> None:
    """A qcow2 overlay at `disk` on `backing` (a path relative to the disk's folder, as QEMU
    resolves it): the backing file is opened read-only, never written."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing, disk], timeout=60)


def _create(cfg: Config, image: Image, req: Request, target: lifecycle.BootTarget, port: int,
            share_list: tuple[shares.Share, ...], user_data: str | None) -> Record:
    """The instance's folder, made under a temporary name and renamed into place when whole."""
    record = new_record(cfg, image, req, target, port, share_list)
    final = root(cfg.output_dir) / req.name
    tmp = root(cfg.output_dir) / f".{req.name}.new-{os.getpid()}"
    safe_rmtree(tmp, root(cfg.output_dir), ignore_errors=True)
    tmp.mkdir()
    try:
        state = StatePaths(tmp)
        make_overlay(state.disk, record.backing, record.backing_format)
        if user_data is not None:
            atomic_write(tmp / "user-data", user_data)
        save(state, record)
        os.rename(tmp, final)
    except BaseException:
        safe_rmtree(tmp, root(cfg.output_dir), ignore_errors=True)
        raise
    return record


# ------------------------------------------------------------------------------- starting


@dataclass(frozen=True)
class Prepared:
    """Everything checked before anything is created or started."""

    image: Image
    target: lifecycle.BootTarget
    accel: lifecycle.AccelChoice
    firmware: Any
    shares: tuple[shares.Share, ...]
    share_method: str | None
    virtiofsd: Path | None
    user_data: str | None


def _image_for(cfg: Config, record: Record) -> Image:
    if record.image not in cfg.images:
        raise UsageError(f"instance {record.name} is of image {record.image}, which invoke.yaml no longer has",
                         f"add the image back, or remove the instance: invoke rm {record.name}")
    return cfg.images[record.image]


def boot_target(state: StatePaths, record: Record, image: Image) -> lifecycle.BootTarget:
    """The instance's overlay as what to boot; UsageError when its build was removed by hand."""
    if state.disk.is_symlink() or not state.disk.is_file():
        raise UnsafePath(f"refusing to touch {state.disk}: it is "
                         + ("a symbolic link, not the instance's disk" if state.disk.is_symlink() else "missing"),
                         f"remove the instance (invoke rm {record.name}) and make it again")
    backing = backing_path(state, record)
    if not backing.is_file():
        raise UsageError(
            f"instance {record.name} is backed by build {record.build_id} of {record.image}, whose image file is gone "
            f"({os.path.normpath(backing)}: removed by hand?)",
            f"move it to the newest build (its disk's changes are lost): invoke run {record.image} --name "
            f"{record.name} --rebase; or remove it: invoke rm {record.name}")
    boot = None
    if record.boot:
        boot = BootSpec(state.root / record.boot["kernel"], state.root / record.boot["initrd"], record.boot["append"])
    return lifecycle.BootTarget(image, state.disk, "qcow2", record.build_id, boot)


def _share_plan(cfg: Config, image: Image, share_list: tuple[shares.Share, ...]) -> tuple[str | None, Path | None]:
    """How this host and this guest share folders (virtiofs or 9p), or the error saying which
    side lacks what."""
    if not share_list:
        return None, None
    profile = distros.profile(image)
    if not profile.first_boot:
        raise UsageError(f"{image.name} reads no NoCloud seed, so nothing would mount a shared folder in it")
    host = shares.probe_host(image.arch.qemu_binary, cfg.defaults.virtiofsd)
    method = shares.choose_method(host, profile.guest_filesystems, image.name)
    return method, host.virtiofsd if method == "virtiofs" else None


def _prepare(cfg: Config, image: Image, req: Request, record: Record | None, state: StatePaths) -> Prepared:
    """Check what this run needs, before anything is made: the build (a new instance: the
    published one; a rebase: the newest), shared folders, user-data, accelerator and firmware."""
    profile = distros.profile(image)
    if req.user_data is not None:
        if record is not None and not req.rebase:
            raise UsageError(f"--user-data runs at an instance's first boot only, and {record.name} has booted",
                             f"create a new instance (--name), or start {record.name} over from the newest build "
                             "with --rebase (its disk's changes are lost)")
        if profile.first_boot != "cloud-init":
            raise UsageError(f"{image.name} has no cloud-init: it reads its seed's hostname, keys and shared "
                             "folders only, so --user-data cannot apply", "use an image with cloud-init (debian13-x86_64)")
    user_data = seed.check_user_data(req.user_data) if req.user_data is not None else None
    target = (lifecycle.published_target(cfg, image) if record is None or req.rebase
              else boot_target(state, record, image))
    share_list = shares.parse_shares(req.shares) if req.shares else (record.shares if record else ())
    method, virtiofsd = _share_plan(cfg, image, share_list)
    accel, firmware = lifecycle.decide(cfg, image, req.accel, needs_firmware=target.boot is None)
    if req.network and req.network not in NETWORKS:
        raise UsageError(f"--network {req.network!r}: expected one of {', '.join(NETWORKS)}")
    if req.idle_stop is not None and req.idle_stop < 0:
        raise UsageError(f"--idle-stop {req.idle_stop}: minutes must be 0 (off) or more")
    return Prepared(image, target, accel, firmware, share_list, method, virtiofsd, user_data)


def run_instance(cfg: Config, image: Image, req: Request, say: Callable[[str], None] = print) -> VmStatus:
    """`invoke run IMAGE [--name NAME]`: create the instance (or find it), rebase it if asked,
    and start it."""
    check_name(req.name)
    with locked(cfg.output_dir, f"run {req.name}", say):
        state = paths(cfg.output_dir, req.name)
        record = load(cfg.output_dir, req.name)
        if record is not None and record.on is not None:
            raise UsageError(f"the name {req.name} is in use by an instance on {record.on}",
                             "choose another name: --name NAME")
        if record is not None and record.image != image.name:
            raise UsageError(f"the name {req.name} is in use by an instance of {record.image}",
                             f"choose another name (--name NAME), or start that one: invoke run {record.image} "
                             f"--name {req.name}")
        if record is not None and read_status(req.name, state).state == "running":
            st = read_status(req.name, state)
            raise UsageError(f"{req.name} is already running (pid {st.pid}, ssh port {st.ssh_port})",
                             f"invoke ssh {req.name}, or invoke stop {req.name}")
        if record is None and (state.root.exists() or state.root.is_symlink()):
            raise UnsafePath(f"refusing to touch {state.root}: it is not an instance imagepipe made (it holds no "
                             "instance.json)", "move it away (or remove it yourself) and run again")
        prep = _prepare(cfg, image, req, record, state)
        port, moved = choose_port(req.name, req.port, record.ssh_port if record and req.port is None else None,
                                  image.ssh_port, ports_of_others(cfg.output_dir, req.name))
        fresh = record is None
        if record is None:
            record = _create(cfg, image, req, prep.target, port, prep.shares, prep.user_data)
            say(f"{req.name}: new instance of {image.name}, backed by build {record.build_id} "
                f"({os.path.normpath(backing_path(state, record))}, read only); its disk: {state.disk}")
        elif req.rebase:
            record = _rebase(cfg, state, record, prep, say)
        if moved:
            say(moved)
        record = _updated(record, req, port, prep.shares)
        save(state, record)
        try:
            return _start(cfg, state, record, prep, req, say, fresh)
        except BaseException:
            if fresh and read_status(req.name, state).state != "running":
                safe_rmtree(state.root, root(cfg.output_dir), ignore_errors=True)
                say(f"{req.name}: the new instance did not start, so it was removed again")
            raise


def _updated(record: Record, req: Request, port: int, share_list: tuple[shares.Share, ...]) -> Record:
    """The record with this run's choices (those not given are kept)."""
    return replace(
        record, ssh_port=port, port_fixed=bool(req.port) or (record.port_fixed and req.port is None),
        shares=share_list, network=req.network or record.network,
        idle_stop=record.idle_stop if req.idle_stop is None else (req.idle_stop or None),
    )


def _start(cfg: Config, state: StatePaths, record: Record, prep: Prepared, req: Request,
           say: Callable[[str], None], fresh: bool = False) -> VmStatus:
    """Seed, shared folders, QEMU, idle watcher; whatever started is stopped again on failure."""
    image = prep.image
    target = boot_target(state, record, image)  # the overlay (a rebase made a new one)
    profile = distros.profile(image)
    method = prep.share_method
    if profile.first_boot:
        user_data = (state.root / "user-data").read_text(encoding="utf-8") if record.user_data else None
        seed.write_seed(seed.Seed(record.instance_id, seed.hostname_for(record.name), image.ssh_user, record.keys,
                                  user_data, tuple(seed.SeedShare(s.tag, method or "virtiofs") for s in record.shares)),
                        record.name, state.seed)
    devices = shares.devices(state, record.shares, method) if method else ()
    attached = Attached(state.seed if profile.first_boot else None, devices)
    opts = RunOptions(snapshot=req.snapshot, gui=req.gui, foreground=req.foreground,
                      isolated=record.network == "isolated")
    state.stopped_by.unlink(missing_ok=True)
    say(f"{record.name}: accelerator {prep.accel.accel.value} ({prep.accel.reason})")
    if method == "virtiofs" and prep.virtiofsd is not None:
        shares.start_daemons(state, record.shares, prep.virtiofsd, say)
    elif method == "9p":
        say(f"shared folders: {', '.join(f'{s.path} at /mnt/{s.tag}' for s in record.shares)} (9p)")
    try:
        st = lifecycle.start(target, state, prep.accel, prep.firmware, opts, port=record.ssh_port, say=say,
                             attached=attached, name=record.name, fixed_port=True)
    finally:
        if read_status(record.name, state).state != "running":
            shares.stop_daemons(state)
    if st.state != "running":
        return st
    if fresh:
        note(cfg.output_dir, record, "created", f"backed by {os.path.normpath(backing_path(state, record))}", say)
    detail = f"port {record.ssh_port}" + (", writes thrown away at power-off (--snapshot)" if req.snapshot else "")
    note(cfg.output_dir, record, "started", detail, say)
    if record.idle_stop:
        idle.spawn(cfg.output_dir, record.name, record.idle_stop * 60, state)
        say(f"{record.name}: stops itself after {idle.minutes(record.idle_stop)} with no SSH session and an idle guest")
    if req.wait:
        conn = wait_for_banner(record.name, state, record.ssh_port, SSH_DEADLINE[prep.accel.accel], st.pid)
        conn.close()
        say(f"{record.name}: sshd answers")
    return st


# ------------------------------------------------------------------------------- rebase + rm


def disk_bytes(path: Path) -> int | None:
    """Bytes the file takes on disk (allocated blocks), None when it is missing."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _rebase(cfg: Config, state: StatePaths, record: Record, prep: Prepared, say: Callable[[str], None]) -> Record:
    """A fresh overlay on the newest build (said first: what it loses); a new instance-id, so
    the seed's first-boot steps run again."""
    new = prep.target
    if new.build_id == record.build_id and backing_path(state, record).is_file():
        say(f"{record.name} is already on the newest build of {record.image} ({record.build_id}): nothing to rebase")
        return record
    used = disk_bytes(state.disk)
    say(f"{record.name}: moving from build {record.build_id} to {new.build_id}, the newest of {record.image}. "
        f"This loses everything written to its disk since it was made ({mib(used or 0)} in {state.disk}): the "
        "disk starts over from the new build; its UEFI variables and pinned host keys are reset and its seed's "
        "first-boot steps run again. Its name, port, shared folders and idle stop stay.")
    folder = state.root
    backing = os.path.relpath(new.disk, folder)
    tmp = folder / f".disk.new-{os.getpid()}.qcow2"
    tmp.unlink(missing_ok=True)
    make_overlay(tmp, backing, new.format)
    os.replace(tmp, state.disk)
    old = record.build_id
    record = replace(record, build_id=new.build_id, backing=backing, backing_format=new.format,
                     boot=_relative_boot(new, folder), instance_id=f"iid-imagepipe-{secrets.token_hex(8)}")
    save(state, record)
    note(cfg.output_dir, record, "rebased", f"from {old} to {new.build_id}", say)
    return record


def remove(cfg: Config, name: str, say: Callable[[str], None] = print) -> str:
    """`invoke rm NAME`: remove a stopped instance (its disk, seed, state); returns what was done."""
    check_name(name)
    with locked(cfg.output_dir, f"rm {name}", say):
        state = paths(cfg.output_dir, name)
        record = load(cfg.output_dir, name)
        if record is None:
            raise UsageError(f"no instance called {name}", "invoke instances lists them")
        st = read_status(name, state)
        if st.state == "running":
            raise UsageError(f"{name} is running (pid {st.pid})", f"stop it first: invoke stop {name}")
        used = disk_bytes(state.disk) or 0
        for sock in ("qmp", "qga", "serial"):
            state.socket(sock).unlink(missing_ok=True)
        safe_rmtree(state.root, root(cfg.output_dir))
        note(cfg.output_dir, record, "removed", f"{mib(used)} of disk", say)
    return f"{name}: removed (its disk held {mib(used)}; build {record.build_id} of {record.image} is untouched)"


# ------------------------------------------------------------------------------- stop + list


def resolve_state(cfg: Config, name: str) -> tuple[StatePaths, Record | None]:
    """The state folder `ssh`, `stop`, `status` and `console` use for `name`: the instance's; for
    an image name with no instance, output/<image>/run, where an earlier imagepipe ran its VM
    (nothing runs there otherwise: `stop` then says so, `ssh` says how to start it)."""
    check_name(name)
    record = load(cfg.output_dir, name)
    if record is not None:
        return paths(cfg.output_dir, name), record
    if name in cfg.images:
        return state_paths(cfg.output_dir, name), None
    raise UsageError(f"no instance called {name}", f"create it: invoke run IMAGE --name {name} "
                     "(invoke instances lists the instances)")


def login_target(cfg: Config, name: str) -> tuple[StatePaths, Image]:
    """What `invoke ssh NAME` logs in to: the state folder and the image of `name`."""
    state, record = resolve_state(cfg, name)
    return state, cfg.image(record.image if record is not None else name)


def stop(cfg: Config, name: str, *, force: bool = False, grace: float = GRACE, say: Callable[[str], None] = print,
         reason: str | None = None) -> str:
    """Power an instance off (lifecycle.stop), then end its virtiofsd daemons and idle watcher;
    noted in the history (`reason`: the idle watcher's)."""
    state, record = resolve_state(cfg, name)
    done = lifecycle.stop(name, state, force=force, grace=grace, say=say)
    was = "stopped" if done.startswith(f"{name} is not running") else "running"
    shares.stop_daemons(state)
    idle.stop_watcher(state)
    if record is not None and was == "running":
        if reason:
            write_value(state.stopped_by, reason)
        note(cfg.output_dir, record, "idle-stop" if reason else "stopped", reason or done.removeprefix(f"{name}: "), say)
    return done


def rows(cfg: Config, say: Callable[[str], None] | None = None) -> list[Row]:
    """Every local instance with its state (stale state cleaned on the way)."""
    out = []
    for rec in records(cfg.output_dir, say):
        if rec.on is not None:
            continue
        state = paths(cfg.output_dir, rec.name)
        st = lifecycle.with_pause(read_status(rec.name, state), state)
        if st.state != "running":
            shares.stop_daemons(state)
        out.append(Row(rec, st, disk_bytes(state.disk), backing_path(state, rec).is_file(),
                       read_value(state.stopped_by) if st.state != "running" else None))
    return out


def age(seconds: float) -> str:
    """`3d`, `5h`, `12m`, `40s`: how long ago, in its largest unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def table(rows_: Sequence[Row], now: float) -> str:
    """NAME IMAGE BUILD STATE PORT DISK AGE NOTE as aligned columns."""
    lines = [("NAME", "IMAGE", "BUILD", "STATE", "PORT", "DISK", "AGE", "NOTE")]
    for r in rows_:
        rec = r.record
        notes = []
        if r.where != "local":
            notes.append(f"on {r.where}")
        if not r.backing_present:
            notes.append("its build was removed: --rebase or rm")
        if r.stopped_by:
            notes.append(r.stopped_by)
        if rec.idle_stop and r.status.state == "running":
                notes.append(f"idle stop after {idle.minutes(rec.idle_stop)}")
        if rec.shares:
            notes.append("shares " + ", ".join(s.tag for s in rec.shares))
        port = r.status.ssh_port or rec.ssh_port
        shown = "paused: disk full" if r.status.paused else r.status.state
        lines.append((rec.name, rec.image, rec.build_id, shown, str(port),
                      mib(r.disk_bytes) if r.disk_bytes is not None else "-", age(now - rec.created), "; ".join(notes)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    right = {4, 5, 6}
    def cells(line: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths, strict=False)))

    return "\n".join((cells(line) + "  " + line[-1]).rstrip() for line in lines)


def row_of(cfg: Config, name: str) -> Row:
    """One instance's row (`invoke status NAME`); a remote one asks its builder."""
    state, record = resolve_state(cfg, name)
    if record is None:  # an image's name: no instance yet (or a VM of an earlier imagepipe)
        running = read_status(name, state).state == "running"
        raise UsageError(f"{name} has no instance yet" + (f" (a VM of an earlier imagepipe runs from {state.root})"
                                                          if running else ""),
                         (f"stop it (invoke stop {name}); " if running else "")
                         + f"invoke run {name} starts the instance named {name}")
    st = read_status(name, state)
    return Row(record, st, disk_bytes(state.disk), backing_path(state, record).is_file(),
               read_value(state.stopped_by) if st.state != "running" else None)


def detail(row: Row, now: float) -> str:
    """`invoke status NAME`: one instance, a line per fact."""
    r, st = row.record, row.status
    up = st.uptime(now)
    facts = [
        ("instance", r.name), ("image", r.image), ("build", r.build_id + ("" if row.backing_present else
                                                                           " (its image file is gone: --rebase or rm)")),
        ("where", row.where), ("state", st.state + (f", pid {st.pid}, up {clock(up)}" if up is not None else "")),
        ("ssh", f"127.0.0.1:{st.ssh_port or r.ssh_port}" + (" (fixed with --port)" if r.port_fixed else "")),
        ("accelerator", f"{st.accelerator} ({st.accel_reason})" if st.accelerator else "-"),
        ("disk", mib(row.disk_bytes) + " written" if row.disk_bytes is not None else "-"),
        ("created", artifacts.utc_stamp(r.created) + f" ({age(now - r.created)} ago)"),
        ("network", r.network + (" (only its SSH port)" if r.network == "isolated" else "")),
        ("shares", ", ".join(f"{s.path} at /mnt/{s.tag}" for s in r.shares) or "-"),
        ("idle stop", f"after {r.idle_stop:g} min" if r.idle_stop else "off"),
    ]
    if row.stopped_by:
        facts.append(("stopped by", row.stopped_by))
    width = max(len(k) for k, _ in facts)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in facts)


def image_statuses(cfg: Config) -> list[VmStatus]:
    """Each configured image's own instance (the one named after it), or a VM an earlier
    imagepipe started from output/<image>/run."""
    out = []
    for name in sorted(cfg.images):
        state = paths(cfg.output_dir, name)
        st = read_status(name, state) if load_quiet(cfg.output_dir, name) else VmStatus(name, "stopped")
        if st.state != "running":
            state = state_paths(cfg.output_dir, name)
            legacy = read_status(name, state)
            st = legacy if legacy.state == "running" else st
        out.append(lifecycle.with_pause(st, state))
    return out


def load_quiet(output_dir: Path, name: str) -> Record | None:
    try:
        return load(output_dir, name)
    except CorruptState:
        return None


def counts(cfg: Config) -> dict[str, dict[str, str]]:
    """image -> {instance: state} of the local instances."""
    out: dict[str, dict[str, str]] = {}
    for r in rows(cfg):
        out.setdefault(r.record.image, {})[r.record.name] = r.status.state
    return out
