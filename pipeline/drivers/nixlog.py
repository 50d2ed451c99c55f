"""nix's `--log-format internal-json` log turned into progress events (pure: tested with plain asserts)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pipeline.progress import Event

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STORE_NAME_RE = re.compile(r"^/nix/store/[0-9a-z]{32}-(.+?)(\.drv)?$")

# nix's internal-json activity and result types (libutil/logging.hh).
ACT_FILE_TRANSFER = 101
ACT_BUILD = 105
ACT_SUBSTITUTE = 108
RES_BUILD_LOG_LINE = 101
RES_SET_PHASE = 104
RES_POST_BUILD_LOG_LINE = 107
LEVEL_INFO = 3


def clean(text: str) -> str:
    """A nix message without its colour codes."""
    return ANSI_RE.sub("", text).strip()


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
        except json.JSONDecodeError:
            return Event("message", clean(line), source="nix")
        if not isinstance(record, dict):
            return None
        handler = {"start": self._start, "result": self._result, "msg": self._msg}.get(record.get("action", ""))
        return handler(record) if handler else None

    def _start(self, r: Mapping[str, Any]) -> Event | None:
        kind, text = r.get("type"), clean(str(r.get("text", "")))
        if kind == ACT_BUILD:
            fields = r.get("fields") or [""]
            name = store_name(str(fields[0]))
            self.builds[int(r.get("id", 0))] = name
            return Event("say", f"building {name}", source="nix", data=(str(fields[0]),))
        if text and (kind in (ACT_SUBSTITUTE, ACT_FILE_TRANSFER) or int(r.get("level", 9)) <= LEVEL_INFO):
            return Event("message", text, source="nix")
        return None

    def _result(self, r: Mapping[str, Any]) -> Event | None:
        kind, fields = r.get("type"), r.get("fields") or []
        name = self.builds.get(int(r.get("id", 0)), "")
        source = f"nix:{name}" if name else "nix"
        if kind in (RES_BUILD_LOG_LINE, RES_POST_BUILD_LOG_LINE) and fields:
            text = clean(str(fields[0]))
            return Event("message", text, source=source) if text else None
        if kind == RES_SET_PHASE and fields:
            return Event("message", f"{name or 'build'}: phase {fields[0]}", source=source)
        return None

    def _msg(self, r: Mapping[str, Any]) -> Event | None:
        text, level = clean(str(r.get("msg", ""))), int(r.get("level", 9))
        if not text or level > LEVEL_INFO:
            return None
        return Event("error" if level == 0 else "message", text, source="nix")


