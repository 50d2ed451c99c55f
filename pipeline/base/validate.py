"""Validation primitives for the configuration: small parsers that raise `Invalid`, a collector
that keeps going and records every problem with its key path, and where a value came from.

Every string is matched in full (`re.fullmatch`: a pattern ending in `$` would also accept a
value ending in "\\n") and refused when it holds a control character — values end up in
kickstart lines, HCL, argv, systemd units and crontab lines, where a newline starts something
new. Numbers go through `pipeline.base.numbers`. `output_dir_problem` keeps the output folder away
from `/`, the home directory, the project itself and characters QEMU's option syntax would read
as a separator. `Origins` tells which layer of Invoke's merged config (the -f file, an INVOKE_*
variable, invoke.yaml) set a key, so an error names the file or the variable to fix.
"""

from __future__ import annotations

import difflib
import os
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.base.errors import Invalid, NumberError
from pipeline.base.numbers import parse_int
from pipeline.base.text import has_control, visible

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
PUBKEY_RE = re.compile(
    r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( [ -~]*)?"
)
# user@host or host; every DNS label at most 63 characters (longer ones make Python's IDNA codec
# raise deep inside the socket layer), the name at most 253, the user at most 32.
HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,31}@)?[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
# These three end up in generated files (kickstart, NixOS parameters) and, in the guest, in paths
# (/usr/share/zoneinfo/<timezone>, the keymap and locale files): only the shapes their targets
# name things by, so no value can hold "..", a leading "/" or anything a file format reads.
# A locale: language[_TERRITORY][.codeset][@modifier] (glibc, localectl), or C / POSIX.
LOCALE_RE = re.compile(r"(?:C|POSIX|[a-z]{2,3}(?:_[A-Z]{2}|_[0-9]{3})?)(?:\.[A-Za-z0-9-]+)?(?:@[A-Za-z0-9]+)?")
# A console keymap or X layout: us, de-latin1-nodeadkeys, fr_CH, mac-us (one name, no path).
KEYMAP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
# A zoneinfo name: UTC, Europe/Berlin, America/Argentina/Buenos_Aires, Etc/GMT+5 (each part a
# name, never "." or "..").
TIMEZONE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]{0,63}(?:/[A-Za-z][A-Za-z0-9_+-]{0,63}){0,2}")
SHA512_CRYPT_RE = re.compile(r"\$6\$(rounds=[0-9]{4,9}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}")
CALENDAR_RE = re.compile(r"[A-Za-z0-9 *:,./~+-]+")
MAX_TEXT = 4096  # no configured string needs more; a megabyte of it is a mistake, not a value


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def shown(value: Any, limit: int = 60) -> str:
    """A value as it may appear in an error line: repr, control characters visible, shortened."""
    text = visible(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------ parsers


def integer(unit: str, lo: int, hi: int) -> Callable[[Any], int]:
    """An int in [lo, hi] (YAML gives ints; strings, floats and booleans are refused)."""

    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(f"expected {unit} as an integer, got {shown(v)}")
        try:
            return parse_int(v, lo=lo, hi=hi, what=unit)
        except NumberError:
            raise Invalid(f"expected {unit} between {lo} and {hi}, got {shown(v)}") from None

    return parse


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid(f"expected true or false, got {shown(v)}")
    return v


def line(v: Any, what: str = "a string") -> str:
    """A non-empty string on one line: no control characters (newline, CR, tab, ESC, NUL...)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str) or not v:
        raise Invalid(f"expected {what}, got {shown(v)}")
    if len(v) > MAX_TEXT:
        raise Invalid(f"expected {what} of at most {MAX_TEXT} characters, got {len(v)}")
    if has_control(v):
        raise Invalid(f"expected {what} without control characters (newline, tab, escape...), got {shown(v)}")
    return v


def string(pattern: re.Pattern[str] | None = None, what: str = "a string") -> Callable[[Any], str]:
    """A one-line string; with `pattern`, the whole string must match it."""

    def parse(v: Any) -> str:
        s = line(v, what)
        if pattern is not None and not pattern.fullmatch(s):
            raise Invalid(f"expected {what}, got {shown(s)}")
        return s

    return parse


def enum_of(kind: type[StrEnum]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        try:
            return kind(str(v).lower())
        except ValueError:
            choices = [m.value for m in kind]
            raise Invalid(
                f"expected one of {', '.join(choices)}, got {shown(v)}{did_you_mean(str(v), choices)}"
            ) from None

    return parse


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else parse(v)


def timezone(v: Any) -> str:
    """A zoneinfo name; where this host has a zoneinfo database, one that it lists."""
    s = string(TIMEZONE_RE, "a zoneinfo name such as UTC or Europe/Berlin")(v)
    dirs = [Path(d) for d in zoneinfo_dirs() if Path(d).is_dir()]
    if dirs and not any((d / s).is_file() for d in dirs):
        raise Invalid(f"expected a zoneinfo name such as UTC or Europe/Berlin, got {shown(s)} "
                      f"(not in {dirs[0]}){did_you_mean(s, _zone_names(dirs[0], s))}")
    return s


def zoneinfo_dirs() -> tuple[str, ...]:
    """Where this host keeps its zoneinfo database (Python's own search path)."""
    return tuple(zoneinfo.TZPATH)


def _zone_names(base: Path, near: str) -> list[str]:
    """Zone names in `near`'s folder of the database (for a did-you-mean)."""
    folder = base / near.rpartition("/")[0]
    try:
        return [f"{near.rpartition('/')[0]}/{p.name}".lstrip("/") for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


def password_hash(v: Any) -> str:
    s = line(v)
    if not SHA512_CRYPT_RE.fullmatch(s):  # the full shape: nothing else can reach a kickstart line
        raise Invalid("expected a SHA-512 crypt hash ($6$salt$86 characters; make one: invoke hash-password)")
    return s


def pubkey(v: Any) -> str:
    text = v.strip() if isinstance(v, str) else None
    if text is None or not PUBKEY_RE.fullmatch(text):
        value = v if not isinstance(v, str) else v[:40] + ("..." if len(v) > 40 else "")
        raise Invalid(f"expected one OpenSSH public key on one line (ssh-ed25519 AAAA...), got {shown(value)}")
    return text


def calendar(v: Any) -> str:
    s = line(v)
    if not CALENDAR_RE.fullmatch(s):
        raise Invalid(f"expected a systemd OnCalendar expression, got {shown(s)}")
    return s


def host_problem(host: str) -> str | None:
    """Why `host` is not a usable SSH host (alias, name or user@name), or None."""
    if not HOST_RE.fullmatch(host):
        return "only letters, digits, '.', '_', '-' (and one user@) are allowed"
    name = host.rpartition("@")[2]
    if len(name) > 253:
        return f"a host name has at most 253 characters ({len(name)} given)"
    long = next((label for label in name.split(".") if len(label) > 63), None)
    if long is not None:
        return f"a host name's parts (between dots) have at most 63 characters ({len(long)} given)"
    return None


def host(v: Any) -> str:
    s = string(what="an SSH host alias or hostname (letters, digits, . _ -; no leading -)")(v)
    problem = host_problem(s)
    if problem:
        raise Invalid(f"expected an SSH host alias or hostname: {problem}; got {shown(s)}")
    return s


def local_path(v: Any, what: str = "a path") -> str:
    """A one-line path; commas are refused where the path may end up inside a QEMU option."""
    s = line(v, what)
    if "," in s:
        raise Invalid(f"{what} must not contain ',' (QEMU and Packer read it as an option separator), "
                      f"got {shown(s)}")
    return s


# ------------------------------------------------------------------------- the output folder


def output_dir_problem(path: Path, root: Path, home: Path | None = None) -> str | None:
    """Why `path` (absolute, resolved or not) cannot be imagepipe's output folder, or None.

    Everything under it may be created, replaced or deleted by imagepipe, so it must not be `/`,
    the home directory or a folder above it, the project folder or a folder above it, and not
    an existing file. Its full path becomes part of QEMU and Packer options (`file=...,if=...`),
    where a ',' splits the value; control characters could end up in unit files and logs.
    """
    real = Path(os.path.realpath(path))
    text = str(real)
    if has_control(text):
        return f"its path {shown(text)} holds a control character"
    if "," in text:
        return f"its path {text} holds a ',' (QEMU's and Packer's option syntax would split it there)"
    if real == Path(real.anchor):
        return "it is the root folder /"
    home_real = Path(os.path.realpath(home if home is not None else Path.home()))
    if real == home_real or real in home_real.parents:
        return f"it is {'your home folder' if real == home_real else 'a folder above your home folder'} ({real})"
    root_real = Path(os.path.realpath(root))
    if real == root_real or real in root_real.parents:
        return f"it is {'the project folder' if real == root_real else 'a folder above the project folder'} ({real})"
    if real.exists() and not real.is_dir():
        return f"{real} exists and is not a folder"
    return None


# -------------------------------------------------------------------------- the collector


class Collector:
    """Walks raw data, applies parsers, and records every problem with its key path."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.paths: list[str] = []       # the key path of each problem, in the same order

    def problem(self, path: str, message: str) -> None:
        path = visible(path)
        self.problems.append(f"{path}: {message}")
        self.paths.append(path)

    def mapping(self, path: str, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.problem(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        return dict(raw)

    def fields(
        self, path: str, raw: Mapping[str, Any], spec: Mapping[str, Callable[[Any], Any]]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            where = f"{path}.{key}"
            if key not in spec:
                extra = (
                    " (plaintext passwords are not stored: use password_hash, see invoke hash-password)"
                    if key == "password"
                    else did_you_mean(str(key), spec)
                )
                self.problem(where, f"unknown key{extra}")
                continue
            try:
                out[key] = spec[key](value)
            except Invalid as exc:
                self.problem(where, str(exc))
        return out


# ------------------------------------------------------------------------------- origins


def _leaves(data: Any, prefix: str = "") -> Iterable[str]:
    """Dotted key paths of every value in a nested mapping (mappings themselves included)."""
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path
        yield from _leaves(value, path)


class Origins:
    """Which configuration layer set a key: the -f file, an INVOKE_* variable or invoke.yaml.

    Layers are given highest precedence first, as (label, data, is_env); for an INVOKE_*
    variable the label is the variable's name, derived from the key path as Invoke does.
    """

    def __init__(self, layers: Iterable[tuple[str, Mapping[str, Any] | None, bool]]) -> None:
        self.layers = [(label, set(_leaves(data or {})), env) for label, data, env in layers]

    def of(self, path: str) -> str | None:
        """The label of the layer that set `path` (or a value under it, or the mapping holding it)."""
        key = path.split("[", 1)[0]
        for label, paths, env in self.layers:
            if key in paths or any(p.startswith(key + ".") for p in paths):
                return "INVOKE_" + key.replace(".", "_").upper() if env else label
        return None

    @classmethod
    def from_invoke(cls, config: Any) -> Origins:
        """The layers of an Invoke Config that can hold imagepipe's keys."""

        def layer(name: str) -> Any:
            try:
                return object.__getattribute__(config, name)
            except AttributeError:
                return None

        runtime = layer("_runtime_path")
        project = layer("_project_path")
        return cls([
            (str(runtime or "-f file"), layer("_runtime"), False),
            ("INVOKE_*", layer("_env"), True),
            (str(project or "invoke.yaml"), layer("_project"), False),
        ])
