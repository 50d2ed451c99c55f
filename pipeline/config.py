"""The project configuration: invoke.yaml loaded and validated into the model (pipeline.model).

invoke.yaml is Invoke's own project config file, so `-f FILE` and `INVOKE_*` variables work as
Invoke users expect; imagepipe reads its three top-level sections (`defaults`, `images`,
`builders`) from the merged Invoke config. Validation collects every problem with its key path
and raises one `ConfigError`; unknown keys get a "did you mean". The model's names (Image,
Arch, ...) are imported from pipeline.model, where they are defined.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from pipeline import distros
from pipeline.base.errors import ConfigError, Invalid, UsageError
from pipeline.base.validate import (
    KEYMAP_RE,
    LOCALE_RE,
    NAME_RE,
    USER_RE,
    Collector,
    Origins,
    boolean,
    calendar,
    did_you_mean,
    enum_of,
    host,
    host_problem,
    integer,
    line,
    local_path,
    optional,
    output_dir_problem,
    password_hash,
    pubkey,
    shown,
    string,
    timezone,
)
from pipeline.model import (
    Accel,
    Arch,
    Builder,
    Compress,
    Config,
    Defaults,
    Firmware,
    Format,
    Image,
    Network,
    User,
)

# ---------------------------------------------------------------------------------------------
# Validation: the parsers and the collector live in pipeline.base.validate (short names kept here).

_int = integer
_bool = boolean
_str = string
_enum = enum_of
_optional = optional
_password_hash = password_hash
_pubkey = pubkey
_calendar = calendar
_Collector = Collector


def _no_newline(v: Any) -> str:
    """A one-line string (no control characters at all: see pipeline.base.validate.line)."""
    return line(v)


def _formats(v: Any) -> tuple[Format, ...]:
    """A non-empty list of formats without repeats, the first one bootable (qcow2 or raw)."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise Invalid(f"expected a list of formats such as [qcow2, vmdk], got {v!r}")
    out = tuple(_enum(Format)(item) for item in v)
    if len(set(out)) != len(out):
        raise Invalid(f"lists a format twice: {', '.join(f.value for f in out)}")
    if not out[0].bootable:
        raise Invalid(f"the first format is the one built and booted, so it must be qcow2 or raw, got {out[0].value}"
                      " (list vmdk, vhdx or vdi after it)")
    return out


PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def _packages(v: Any) -> tuple[str, ...]:
    """A list of Debian package names (Debian policy: lowercase letters, digits, + - .)."""
    if not isinstance(v, list):
        raise Invalid(f"expected a list of package names such as [vim, curl], got {shown(v)}")
    bad = [shown(p) for p in v if not isinstance(p, str) or not PACKAGE_RE.fullmatch(p)]
    if bad:
        raise Invalid(f"not a package name: {', '.join(bad)} (lowercase letters, digits, '+', '-', '.')")
    return tuple(dict.fromkeys(v))


def _distro(v: Any) -> str:
    """A distro with a profile (pipeline.distros)."""
    known = distros.names()
    name = str(v).lower() if isinstance(v, str) else v
    if name not in known:
        raise Invalid(f"expected one of {', '.join(known)}, got {shown(v)}{did_you_mean(str(v), known)}")
    return str(name)


@dataclass(frozen=True)
class Key:
    """One configuration key: how its value is parsed, what it accepts and what it means, one
    line each. docs/configuration.md is generated from these (`invoke docs`)."""

    parse: Callable[[Any], Any]
    accepts: str | Callable[[], str]
    doc: str
    default: str | None = None  # for the docs, where the model's default is not the whole story

    def __call__(self, value: Any) -> Any:
        return self.parse(value)

    def accepts_text(self) -> str:
        return self.accepts() if callable(self.accepts) else self.accepts


def _choice(kind: type[StrEnum]) -> Key:
    """A key whose value is one of an enum's (the docs list them)."""
    return Key(_enum(kind), " | ".join(f"`{m.value}`" for m in kind), "")


def _distros() -> str:
    return " | ".join(f"`{name}`" for name in distros.names())


def _compress(v: Any) -> Compress:
    """A Compress; YAML's bare on/off arrive as booleans."""
    if isinstance(v, bool):
        return Compress.ON if v else Compress.OFF
    return _enum(Compress)(v)


def _doc(key: Key, doc: str, default: str | None = None) -> Key:
    return replace(key, doc=doc, default=default)


BOOL = "`true` | `false`"
CALENDAR = "a systemd OnCalendar expression"

USER_SPEC: dict[str, Key] = {
    "name": Key(_str(USER_RE, "a user name (lowercase letters, digits, _ and -)"),
                "lowercase letters, digits, `_`, `-`", "the account's name", "required"),
    "password_hash": Key(_optional(_password_hash), "a `$6$` SHA-512 crypt hash",
                         "its password, as a hash only (`invoke hash-password`): plaintext `password:` is refused"),
    "public_keys": Key(lambda v: v, "a list of OpenSSH public keys",  # checked item by item below
                       "keys that may log in as this user"),
    "sudo": Key(_bool, BOOL, "may run sudo, without a password"),
}

IMAGE_SPEC: dict[str, Key] = {
    "distro": Key(_distro, _distros, "the distro profile that builds the image"),
    "arch": _doc(_choice(Arch), "the guest's architecture"),
    "version": Key(_str(re.compile(r"^[A-Za-z0-9._-]+$"), "a version such as 10, 10.1 or latest"),
                   "letters, digits, `.`, `_`, `-`",
                   "AlmaLinux: `10`, `latest` or a point release such as `10.1`; Debian: `12` or `13`;"
                   " NixOS: informational"),
    "format": _doc(_choice(Format), "the older spelling of a one-format list: `format: raw` is `formats: [raw]`"
                   " (with `formats`, it must name its first entry)"),
    "formats": Key(_formats, "a list of formats, the first `qcow2` or `raw`",
                   "the disk formats to publish: the first is built and booted, the others are converted from it"
                   " and verified each ([images](images.md#what-a-build-publishes))", "`[qcow2]`"),
    "compress_qcow2": Key(_bool, BOOL, "qcow2 files are written compressed"),
    "firmware": _doc(_choice(Firmware), "what the guest boots with (aarch64: `uefi` only)"),
    "disk_size": Key(_int("MiB", 16, 16 * 1024 * 1024), "MiB, a whole number", "the disk's size"),
    "memory": Key(_int("MiB", 64, 1024 * 1024), "MiB, a whole number", "the VM's memory, when built and run"),
    "cpus": Key(_int("a CPU count", 1, 512), "a whole number, 1-512", "the VM's CPUs, when built and run"),
    "ssh_port": Key(_int("a TCP port", 1, 65535), "a TCP port",
                    "the host port forwarded to the guest's 22 on 127.0.0.1 (a taken one is replaced);"
                    " the shipped images: 2222 AlmaLinux, 2223 NixOS, 2224 demo, 2225 Debian"),
    "ssh_user": Key(_str(USER_RE, "a user name"), "one of `users`",
                    "the user `invoke ssh` logs in as: root or a `sudo: true` user"),
    "headless": Key(_bool, BOOL, "the build VM runs without a display window (Packer's `headless`)",
                    "`defaults.headless` (`true`)"),
    "users": Key(lambda v: v, "a list of users (below)",  # checked item by item below
                 "the guest's accounts; root or a `sudo: true` user needs a `password_hash` or `public_keys`"
                 " ([the guest contract](running.md#the-guest-contract))"),
    "iso": Key(_optional(lambda v: line(v) if "://" in str(v) else local_path(v, "an ISO path")),
               "a local path or a URL",
               "AlmaLinux: the installer ISO (a local one is hashed once and cached). It saves the ISO download"
               " only: the boot ISO holds no packages, the installer fetches them from the mirror"),
    "flake": Key(_optional(_no_newline), "a path relative to the project, or a flake URL",
                 "NixOS: build your own flake instead of the project's `nixos/`"),
    "attribute": Key(_optional(_str(re.compile(r"^[A-Za-z0-9_.\"-]+$"), "a flake attribute path")),
                     "a flake attribute path",
                     "NixOS: the flake output to build: the image file or a folder holding `nixos.qcow2`",
                     "`packages.<arch>-linux.<image>-image`"),
    "schedule": Key(_optional(_calendar), CALENDAR, "this image's own rebuild timer (`invoke schedule-install`)"),
    "retention": Key(_int("a build count", 1, 1000), "a whole number, 1-1000",
                     "builds kept for this image (never the published one)", "`defaults.retention`"),
    "lang": Key(_str(LOCALE_RE, "a locale such as en_US.UTF-8"), "a locale such as `en_US.UTF-8`",
                "the guest's language", "`defaults.lang` (`en_US.UTF-8`)"),
    "keyboard": Key(_str(KEYMAP_RE, "a keyboard layout such as us or de-latin1"), "a keyboard layout such as `us`",
                    "the guest's keyboard layout", "`defaults.keyboard` (`us`)"),
    "timezone": Key(timezone, "a timezone such as `Europe/Berlin`",
                    "the guest's timezone", "`defaults.timezone` (`UTC`)"),
    "root_ssh": Key(_bool, BOOL, "root may log in over SSH with its password (AlmaLinux `rootpw --allow-ssh`,"
                    " NixOS `PermitRootLogin yes`); otherwise root logs in by key only"),
    "variant": Key(_optional(_str(re.compile(r"^[A-Za-z0-9_.-]+$"), "a variant name such as x86_64_v2")),
                   "a variant the distro offers",
                   "a build of the distro for other CPUs: `x86_64_v2` (AlmaLinux 10 x86_64) for CPUs without x86-64-v3"),
    "mirror": Key(_optional(_str(re.compile(r"^(https?|file)://[^\s'\"\\]+$"),
                                 "a mirror URL such as http://deb.debian.org/debian")),
                  "an `http://`, `https://` or `file://` URL",
                  "Debian: the mirror the root is built from (and the image's apt sources)",
                  "the Debian mirror the host's apt sources name, else `http://deb.debian.org/debian`"),
    "packages": Key(lambda v: _packages(v), "a list of Debian package names",
                    "Debian: further packages to install (a name the mirror lacks fails the build, named)", "`[]`"),
}

# output/<name>/ folders that are not images'
RESERVED_NAMES = frozenset({"instances"})

DEFAULTS_SPEC: dict[str, Key] = {
    "accel": _doc(_choice(Accel), "the accelerator of a task given no `--accel`"),
    "output_dir": Key(lambda v: local_path(v, "a folder"),  # and output_dir_problem, in load()
                      "a folder, relative to invoke.yaml",
                      "images, builds, logs, caches: a folder of its own (not `/`, your home or the project"
                      " folder or above them, an existing file, nor a path with `,`)"),
    "retention": Key(_int("a build count", 1, 1000), "a whole number, 1-1000", "builds kept per image"),
    "ssh_key": Key(_optional(_no_newline), "a private key's path",
                   "the private key builds authorize for `ssh_user` and `invoke ssh` logs in with",
                   "`output/.keys/imagepipe_ed25519`, made on first use; an instance's seed authorizes "
                   "its public half, so your own key logs in to instances of images built elsewhere"),
    "instance_network": _doc(_choice(Network), "the network of a new instance (`run --network`): `user` reaches what "
                             "this host reaches through QEMU's user networking; `isolated` only its forwarded SSH port",
                             "`user`"),
    "virtiofsd": Key(_optional(_no_newline), "a program's path",
                     "the virtiofsd that serves an instance's shared folders (`run --share`)",
                     "`virtiofsd` on PATH, /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd, or QEMU's "
                     "vhost-user descriptors"),
    "schedule": Key(_calendar, CALENDAR, "when scheduled rebuilds run"),
    "boot_timeout": Key(_int("seconds", 0, 86400), "seconds, 0-86400",
                        "how long a boot test (`build --boot-test`, `rebuild`, `test-image`) waits for the guest's"
                        " SSH, and then for its login, agent and power-off; `test-image --timeout` overrides it",
                        "`0`: 180 s under KVM or HVF, 720 s under TCG"),
    # image fields that may be given once for all images:
    "lang": _doc(IMAGE_SPEC["lang"], "the language of every image that sets none", "`en_US.UTF-8`"),
    "keyboard": _doc(IMAGE_SPEC["keyboard"], "the keyboard layout of every image that sets none", "`us`"),
    "timezone": _doc(IMAGE_SPEC["timezone"], "the timezone of every image that sets none", "`UTC`"),
    "headless": Key(_bool, BOOL, "`headless` of every image that sets none", "`true`"),
}

BUILDER_SPEC: dict[str, Key] = {
    "host": Key(host, "a host name or an alias of your ssh config", "where to connect", "the builder's name"),
    "dir": Key(_no_newline, "a path without `..`",
               "the build folder there: a folder of its own, mirrored with `rsync --delete`"),
    "arch": _doc(_choice(Arch), "what `remote-build` spreads images by"),
    "compress": replace(_choice(Compress), parse=_compress,
                        doc="how images cross the link (fetch, upload): `auto` is off where the builder is this machine, "
                            "else measures the link: zstd on a slow one, lz4 on a fast one; `on`, `off`, or one "
                            "compressor both rsyncs have "
                            "([remote builders](remote-builders.md#compression-and-deltas))", default="`auto`"),
}

# Invoke's and Fabric's own top-level keys live in the same file; they are not ours to judge.
FOREIGN_KEYS = {
    "debug", "run", "runners", "sudo", "tasks", "timeouts", "local", "authentication",
    "connect_kwargs", "forward_agent", "gateway", "inline_ssh_env", "load_ssh_configs",
    "port", "ssh_config_path", "user", "project_root",
}
SECTIONS = ("defaults", "images", "builders")


def load(raw: Mapping[str, Any], root: Path, source: str = "invoke.yaml", origins: Origins | None = None) -> Config:
    """Validate raw configuration data (a parsed invoke.yaml) into a frozen Config.

    `origins` (from `from_invoke`) says which file or INVOKE_* variable set each key, so a
    problem names what to fix."""
    c = _Collector()
    for key in raw:
        if key not in SECTIONS and key not in FOREIGN_KEYS and not str(key).startswith("_"):
            c.problem(str(key), f"unknown top-level key{did_you_mean(str(key), SECTIONS)}")
    dflt_raw = c.fields("defaults", c.mapping("defaults", raw.get("defaults")), DEFAULTS_SPEC)
    defaults = Defaults(**{k: v for k, v in dflt_raw.items() if k in Defaults.__dataclass_fields__})
    _check_output_dir(c, defaults, root)
    image_defaults = {k: v for k, v in dflt_raw.items() if k in ("lang", "keyboard", "timezone", "headless")}
    image_defaults["retention"] = defaults.retention
    images = {
        name: img
        for name, img in (
            _image(c, str(name), body, image_defaults)
            for name, body in c.mapping("images", raw.get("images")).items()
        )
        if img is not None
    }
    if not raw.get("images"):
        c.problem("images", "no images configured")
    builders = {
        name: b
        for name, b in (
            _builder(c, str(name), body) for name, body in c.mapping("builders", raw.get("builders")).items()
        )
        if b is not None
    }
    if c.problems:
        raise _config_error(c, source, origins)
    return Config(root=root, source=source, defaults=defaults, images=images, builders=builders)


def _check_output_dir(c: _Collector, defaults: Defaults, root: Path) -> None:
    """The output folder is imagepipe's to fill and prune: not /, ~, the project, a file."""
    out = Path(defaults.output_dir).expanduser()
    problem = output_dir_problem(out if out.is_absolute() else root / out, root)
    if problem:
        c.problem("defaults.output_dir", f"{problem}: choose a folder of its own, e.g. output")


def _config_error(c: _Collector, source: str, origins: Origins | None) -> ConfigError:
    """Every problem, each naming the file or INVOKE_* variable that set it when that is not
    `source` (the heading names `source`, or the one origin all problems share)."""
    found = [origins.of(path) if origins else None for path in c.paths]
    labels = {o for o in found if o}
    heading = labels.pop() if len(labels) == 1 and all(found) else source
    lines = [p if not o or o == heading else f"{path} (set by {o}):{p[len(path) + 1:]}"
             for p, path, o in zip(c.problems, c.paths, found, strict=True)]
    err = ConfigError(heading, lines)
    if any(o and o.startswith("INVOKE_") for o in found):
        err.hint = "fix the keys above (an INVOKE_* variable named there overrides invoke.yaml: unset or correct it)"
    return err


def _image(c: _Collector, name: str, body: Any, defaults: Mapping[str, Any]) -> tuple[str, Image | None]:
    path = f"images.{name}"
    before = len(c.problems)
    if not NAME_RE.fullmatch(name) or ".." in name:
        c.problem(path, "image names may hold letters, digits, '.', '_' and '-' only (no '/', '..', spaces)")
    elif name in RESERVED_NAMES:
        c.problem(path, f"{name!r} is the name of a folder imagepipe keeps beside the images' ({name}/): choose another")
    body_map = body if isinstance(body, Mapping) else {}
    values = {**defaults, **c.fields(path, c.mapping(path, body), IMAGE_SPEC)}
    for required in ("distro", "arch"):
        if required not in values and required not in body_map:
            c.problem(f"{path}.{required}", "missing (required)")
    _primary_format(c, path, values)
    values["users"] = _users(c, path, body_map.get("users", []))
    if "ssh_user" in values and values["users"] and values["ssh_user"] not in {u.name for u in values["users"]}:
        c.problem(f"{path}.ssh_user", f"{values['ssh_user']!r} is not one of this image's users")
    if len(c.problems) != before:
        return name, None

    for key, value in distros.get(values["distro"]).image_defaults.items():
        values.setdefault(key, value)
    if values["arch"] is Arch.AARCH64 and values.get("firmware", Firmware.UEFI) is Firmware.BIOS:
        c.problem(f"{path}.firmware", "aarch64 machines boot with UEFI only (QEMU's virt has no BIOS): use uefi")
        return name, None
    image = Image(name=name, **values)
    for key, message in _guest_problems(image):
        c.problem(f"{path}.{key}", message)
    return name, None if len(c.problems) != before else image


def _guest_problems(image: Image) -> list[tuple[str, str]]:
    """What the guest contract (pipeline.contract) refuses at load time: an unknown variant, an
    SSH user that cannot become root, and an image no person could log in to."""
    profile = distros.get(image.distro)
    problems = []
    offered = profile.variants.get(image.arch, ())
    if image.variant is not None and image.variant not in offered:
        choice = f"one of {', '.join(offered)}" if offered else "none"
        message = (f"{profile.title or image.distro} {image.arch.value} offers {choice}, got "
                   f"{image.variant!r}{did_you_mean(image.variant, offered)}")
        problems.append(("variant", message))
    problems += profile.config_problems(image)
    if profile.accounts_from_config(image):
        from pipeline.contract import login_problems  # noqa: PLC0415 (kept off the start of every command)

        problems += login_problems(image)
    return problems


def _primary_format(c: _Collector, path: str, values: dict[str, Any]) -> None:
    """`format` (the older key) is the primary format; with `formats` it must name its first."""
    fmt, fmts = values.get("format"), values.get("formats")
    if fmts and fmt is not None and fmt is not fmts[0]:
        c.problem(f"{path}.format", f"{fmt.value} is not the first of formats ({fmts[0].value}): drop format,"
                  " formats[0] is the format built and booted")
    elif fmt is not None and not fmt.bootable:
        c.problem(f"{path}.format", f"{fmt.value} cannot be built or booted directly: use qcow2 or raw, and"
                  f" formats: [qcow2, {fmt.value}] to publish a {fmt.value} copy too")


def _users(c: _Collector, path: str, raw: Any) -> tuple[User, ...]:
    if not isinstance(raw, list):
        c.problem(f"{path}.users", f"expected a list of users, got {type(raw).__name__}")
        return ()
    users = []
    for i, item in enumerate(raw):
        where = f"{path}.users[{i}]"
        vals = c.fields(where, c.mapping(where, item), USER_SPEC)
        if "name" not in vals:
            if isinstance(item, Mapping) and "name" not in item:
                c.problem(f"{where}.name", "missing (required)")
            continue
        keys = []
        for j, key in enumerate(vals.get("public_keys") or []):
            try:
                keys.append(_pubkey(key))
            except Invalid as exc:
                c.problem(f"{where}.public_keys[{j}]", str(exc))
        vals["public_keys"] = tuple(keys)
        users.append(User(**vals))
    return tuple(users)


def _builder(c: _Collector, name: str, body: Any) -> tuple[str, Builder | None]:
    path = f"builders.{name}"
    before = len(c.problems)
    if host_problem(name):
        c.problem(path, f"a builder name is used as an SSH host: {host_problem(name)}")
    vals = c.fields(path, c.mapping(path, body), BUILDER_SPEC)
    vals.setdefault("host", name)
    if len(c.problems) != before:
        return name, None
    return name, Builder(name=name, **vals)


def load_file(path: Path) -> Config:
    """Load and validate a YAML file directly (tests, tools outside Invoke)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    return load(raw, root=path.resolve().parent, source=str(path))


def plain(data: Any) -> Any:
    """Invoke's DataProxy (and nested proxies) → plain dicts and lists."""
    if isinstance(data, Mapping) or hasattr(data, "keys"):
        return {str(k): plain(data[k]) for k in data.keys()}  # noqa: SIM118 (DataProxy)
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def from_invoke(config: Any) -> Config:
    """The validated Config from an Invoke context's merged config."""
    raw = plain(config)
    root = Path(project_root(config) or Path.cwd())
    source = str(getattr(config, "_runtime_path", None) or getattr(config, "_project_path", None) or root / "invoke.yaml")
    return load(raw, root=root, source=source, origins=Origins.from_invoke(config))


def project_root(config: Any) -> str | None:
    """The project folder: tasks.py's own, set by tasks.py in its collection's configuration.

    Everything imagepipe writes (generated files, output/) is placed by this folder, so it is
    read from that one layer only: an INVOKE_PROJECT_ROOT variable or a `project_root` in
    invoke.yaml or a -f file would move where `render` writes. Those are refused, not followed.
    """
    for layer, where in (("_env", "the INVOKE_PROJECT_ROOT variable"), ("_project", "invoke.yaml"),
                         ("_user", "your ~/.invoke.yaml"), ("_system", "/etc/invoke.yaml"),
                         ("_runtime", "the -f file")):
        data = _layer(config, layer)
        if isinstance(data, dict) and "project_root" in data:
            raise UsageError(f"{where} sets project_root: imagepipe works in the folder of its tasks.py "
                             "and takes no other", "unset it (run invoke from the project you mean)")
    collection = _layer(config, "_collection")
    found = collection.get("project_root") if isinstance(collection, dict) else None
    return str(found) if found else None


def _layer(config: Any, name: str) -> Any:
    """One of Invoke's configuration layers (None when `config` is not an Invoke Config)."""
    try:
        return object.__getattribute__(config, name)
    except AttributeError:
        return None
