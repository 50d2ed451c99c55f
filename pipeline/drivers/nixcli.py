"""How imagepipe calls nix: the new command line with flakes enabled for each call only (a
user's nix.conf is never changed), the flags that depend on nix's version, and the one line a
nix error comes down to. Used by the nix driver, nix's remote builds and lint."""

from __future__ import annotations

import functools
import re

from pipeline.base.run import locate, run
from pipeline.base.text import visible

FEATURES = ("--extra-experimental-features", "nix-command flakes")
JSON_FORMAT_SINCE = (2, 33)  # `--json` without `--json-format` is deprecated from here on; older nix rejects the flag


def nix_argv(*args: str) -> list[str]:
    """argv of a nix (new CLI) command with flakes enabled for this call only."""
    return ["nix", *FEATURES, *args]


def parse_nix_version(text: str) -> tuple[int, ...] | None:
    """`nix --version` ("nix (Nix) 2.34.8") → (2, 34, 8); None when it names no version."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


@functools.cache
def local_nix_version() -> tuple[int, ...] | None:
    """This host's nix version, asked once per process (None: no nix, or no version printed)."""
    if locate("nix") is None:
        return None
    res = run(["nix", "--version"], check=False, timeout=30)
    return parse_nix_version(res.stdout) if res.ok else None


def json_flags(version: tuple[int, ...] | None) -> list[str]:
    """`--json`, with `--json-format 1` for the nix that wants a format named (2.33+), which
    keeps the shape older nix prints; older nix does not know the flag."""
    return ["--json", "--json-format", "1"] if version is not None and version >= JSON_FORMAT_SINCE else ["--json"]


ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STORE_SOURCE_RE = re.compile(r"/nix/store/[0-9a-z]{32}-source/")
TRACE_AT_RE = re.compile(r"^\s*at (\S.*?:\d+:\d+):?$")
TRACE_ADVICE = ("(use '--show-trace'", "(stack trace truncated")


def nix_error(stderr: str) -> str:
    """The cause of a nix failure and where it is, in one line, from nix's stderr.

    nix 2.8 prints `error: MESSAGE` (with a location only under --show-trace). Newer nix prints
    `error:` alone, then a trace of `… while …` frames, each with an `at FILE:LINE:COL:` and the
    source lines around it, and the cause last: `error: MESSAGE`, maybe on more lines. The cause
    is that last error with its following lines (not the --show-trace advice); its location is the
    trace's last `at` in a file of the evaluated source (not nix's own «nix-internal» files),
    added when the message does not name a file already. A path into the store's copy of a flake
    (/nix/store/HASH-source/) is shown relative to the flake.
    """
    lines = [ANSI_RE.sub("", line).rstrip() for line in stderr.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("error:")]
    if not starts:
        return clean(" / ".join(line.strip() for line in lines if line.strip() and not line.startswith("warning:"))[-300:])
    with_text = [i for i in starts if lines[i].strip() != "error:"]
    cause = with_text[-1] if with_text else starts[-1]
    body = [lines[cause].strip()] + [line.strip() for line in lines[cause + 1:]
                                     if line.strip() and not line.strip().startswith(TRACE_ADVICE)]
    message = " ".join(body)
    where = [m.group(1) for line in lines[:cause] if (m := TRACE_AT_RE.match(line)) and "«" not in m.group(1)]
    if where and "/nix/store/" not in message and "`/" not in message:
        message += f" (at {where[-1]})"
    return clean(STORE_SOURCE_RE.sub("", message))


def clean(text: str) -> str:
    """A nix message without its colour codes, any other control character made visible."""
    return visible(ANSI_RE.sub("", text).strip())
