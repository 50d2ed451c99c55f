"""nix's `--log-format internal-json` log turned into progress events (pure: tested with plain asserts)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pipeline.base.numbers import int_or_none
from pipeline.base.text import visible
from pipeline.drivers.nixcli import clean
from pipeline.progress import Event

STORE_NAME_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-(.+?)(\.drv)?$")

# nix's internal-json activity and result types (libutil/logging.hh).
ACT_FILE_TRANSFER = 101
ACT_BUILD = 105
ACT_SUBSTITUTE = 108
RES_BUILD_LOG_LINE = 101
RES_SET_PHASE = 104
RES_POST_BUILD_LOG_LINE = 107
LEVEL_INFO = 3


def _int(value: Any, default: int) -> int:
    """A number field of nix's log (anything else: `default`)."""
    parsed = int_or_none(value, signed=True)
    return default if parsed is None else parsed


def store_name(path: str) -> str:
    """/nix/store/<hash>-nixos-image.drv -> nixos-image."""
    m = STORE_NAME_RE.match(path)
    return m.group(1) if m else path


class LogParser:
    """Turns `@nix {...}` lines into Events; remembers which activity builds which derivation."""

    def __init__(self) -> None:
        self.builds: dict[int, str] = {}

    def feed(self, line: str) -> Event | None:
        """The event for one output line of `nix ... --log-format internal-json` (None: noise)."""
        if not line.startswith("@nix "):
            text = clean(line)
            return Event("message", text, source="nix") if text else None
        try:
            record = json.loads(line[5:])
        except (ValueError, RecursionError):
            return Event("message", clean(line), source="nix")
        if not isinstance(record, dict):
            return None
        action = record.get("action")
        handler = {"start": self._start, "result": self._result, "msg": self._msg}.get(action) \
            if isinstance(action, str) else None
        return handler(record) if handler else None

    def _start(self, r: Mapping[str, Any]) -> Event | None:
        kind, text = r.get("type"), clean(str(r.get("text", "")))
        if kind == ACT_BUILD:
            raw = r.get("fields")
            fields: list[Any] = raw if isinstance(raw, list) and raw else [""]
            name = visible(store_name(str(fields[0])))
            self.builds[_int(r.get("id"), 0)] = name
            # fields[1]: the remote builder nix sent it to ("" when it builds here)
            machine = visible(str(fields[1])) if len(fields) > 1 and fields[1] else ""
            where = f" on {machine}" if machine else ""
            return Event("say", f"building {name}{where}", source="nix", data=(str(fields[0]),))
        if text and (kind in (ACT_SUBSTITUTE, ACT_FILE_TRANSFER) or _int(r.get("level"), 9) <= LEVEL_INFO):
            return Event("message", text, source="nix")
        return None

    def _result(self, r: Mapping[str, Any]) -> Event | None:
        kind = r.get("type")
        fields = r.get("fields") if isinstance(r.get("fields"), list) else []
        name = self.builds.get(_int(r.get("id"), 0), "")
        source = f"nix:{name}" if name else "nix"
        if kind in (RES_BUILD_LOG_LINE, RES_POST_BUILD_LOG_LINE) and fields:
            text = clean(str(fields[0]))
            return Event("message", text, source=source) if text else None
        if kind == RES_SET_PHASE and fields:
            return Event("message", f"{name or 'build'}: phase {clean(str(fields[0]))}", source=source)
        return None

    def _msg(self, r: Mapping[str, Any]) -> Event | None:
        text, level = clean(str(r.get("msg", ""))), _int(r.get("level"), 9)
        if not text or level > LEVEL_INFO:
            return None
        return Event("error" if level == 0 else "message", text, source="nix")


