"""The one event schema: what happened during a build, and the JSON line every `--json` writer
prints for it (build progress, the rebuild report, a skipped build) and remote builds read back.

A JSON event is one object per line:

    {"image": "demo-x86_64", "kind": "step", "message": "verify", "source": "imagepipe",
     "ts": 1767225600.0, "elapsed": 12.3, "data": [], ...named fields}

`elapsed` (seconds since the build started) only where a build's progress is shown; `data` holds
a tool's raw fields (Packer's artifact line); named fields (build_id, sha256, the summary counts)
sit at the top level. Kinds: step (imagepipe's own steps, with `step`/`total`), say (a tool's
own progress inside a step: Packer's `==>` lines, nix's builds), message, error, artifact (JSON
only, never shown to people), transfer (a download: bytes, total_bytes, rate), heartbeat (a
quiet step: step_elapsed, console), done (a build's progress);
start, iso, note, message, built, up-to-date, skipped, failed, summary (the rebuild report; a
`built` event carries `changes`, pipeline.contents.diff.summary against the build published before);
skipped (`build --if-changed`); check (`check-reproducible --json`: the report). `parse` also
reads lines of older imagepipe versions (no source, no data): a builder may run an older release
than this host.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipeline.base.numbers import decimal_or_none

# Keys of the record itself; named fields cannot shadow them.
CORE_KEYS = ("image", "kind", "message", "source", "ts", "elapsed", "data")


@dataclass(frozen=True)
class Event:
    """One thing that happened: kind is step | say | message | error | artifact | done | ...

    `data` keeps a tool's own fields in order; `fields` are named values for scripts
    (build_id, sha256, counts).
    """

    kind: str
    message: str
    source: str = ""
    ts: float = field(default_factory=time.time)
    data: tuple[str, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Outcome:
    """How one image went in a command that handles several (rebuild, remote-build --all): the
    report's row and the event it is emitted as.

    status: built | up-to-date | skipped | failed (rebuild); ok | failed | not run (a builder's
    build). builder, exit_code and seconds are a remote build's; build_id, sha256 and changes
    (pipeline.contents.diff.summary against the build published before) a published one's.
    """

    image: str
    status: str
    message: str = ""
    build_id: str | None = None
    sha256: str | None = None
    changes: dict[str, Any] | None = None
    builder: str = ""
    exit_code: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def to_record(ev: Event, image: str, *, elapsed: float | None = None) -> dict[str, Any]:
    """The JSON object for `ev` about `image` (pure)."""
    record: dict[str, Any] = {"image": image, "kind": ev.kind, "message": ev.message, "source": ev.source,
                              "ts": ev.ts}
    if elapsed is not None:
        record["elapsed"] = round(elapsed, 3)
    record["data"] = list(ev.data)
    record.update({k: v for k, v in ev.fields.items() if k not in CORE_KEYS})
    return record


def dumps(ev: Event, image: str, *, elapsed: float | None = None) -> str:
    """One JSON line (no newline) for `ev`."""
    return json.dumps(to_record(ev, image, elapsed=elapsed))


def write(ev: Event, image: str, *, elapsed: float | None = None, stream: TextIO | None = None) -> None:
    """Print `ev` as one JSON line (stdout unless told otherwise), flushed at once for pipes."""
    print(dumps(ev, image, elapsed=elapsed), file=stream or sys.stdout, flush=True)


# A builder's `ts` outside this range (or not a number) is replaced by the time it arrived here:
# it is shown as a clock time, which an absurd or non-finite value cannot be.
TS_RANGE = (0.0, 2.0**35)


def parse(line: str) -> tuple[str, Event] | None:
    """A JSON event line (this version's or an older one's) → (image, Event); None for any other
    line (a tool's own output on the same stream, or something that only looks like an event).
    Never raises: the text comes from another machine."""
    if not line.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    raw_data = record.get("data")
    data = tuple(_text(d) for d in raw_data) if isinstance(raw_data, list) else ()
    ts = decimal_or_none(record.get("ts"), lo=TS_RANGE[0], hi=TS_RANGE[1]) or time.time()
    ev = Event(record["kind"], _text(record.get("message", "")), _text(record.get("source") or ""), ts, data,
               {str(k): v for k, v in record.items() if k not in CORE_KEYS})
    return _text(record.get("image", "")), ev


def _text(value: Any) -> str:
    """A field as text (a nested value as its JSON)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
