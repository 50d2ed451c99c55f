"""Options several tasks share, parsed in one place: --accel and whole numbers (--limit, --timeout).

These turn what the user typed into a value or a one-line UsageError (exit 2) naming the
option, never a traceback. Short flags and placeholders live in pipeline.tasks.cli.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.base.errors import NumberError, UsageError
from pipeline.base.numbers import parse_decimal, parse_int
from pipeline.base.validate import did_you_mean
from pipeline.model import Accel

if TYPE_CHECKING:
    from pipeline.model import Config

ACCEL_HELP = "accelerator: auto (probe: KVM, HVF, else TCG), kvm, hvf or tcg"
LOCAL_ACCEL_HELP = ACCEL_HELP + " (default: defaults.accel in invoke.yaml, itself auto by default)"
REMOTE_ACCEL_HELP = ACCEL_HELP + " (probed on the builder; default: the builder's own defaults.accel)"


def parse_accel(value: str) -> Accel | None:
    """--accel VALUE → Accel; an empty value (the option not given) → None."""
    text = str(value).strip().lower()
    if not text:
        return None
    try:
        return Accel(text)
    except ValueError:
        choices = [a.value for a in Accel]
        raise UsageError(f"--accel: expected one of {', '.join(choices)}, got {value!r}"
                         f"{did_you_mean(text, choices)}") from None


def accel_option(value: str, cfg: Config) -> Accel:
    """The accelerator a local task uses: --accel when given, else defaults.accel of invoke.yaml."""
    return parse_accel(value) or cfg.defaults.accel


def remote_accel_option(value: str) -> str | None:
    """--accel for a builder: checked here, sent only when given (else the builder's own
    defaults.accel applies there)."""
    accel = parse_accel(value)
    return accel.value if accel is not None else None


def whole_number(value: str | int, flag: str, hi: int = 10**6) -> int:
    """A non-negative integer option (ASCII digits, at most `hi`; see pipeline.base.numbers), or a
    one-line UsageError naming the option (Invoke's own int parsing ends in a traceback on
    `--limit x`; pipeline.tasks.cli parses with this)."""
    try:
        return parse_int(value, lo=0, hi=hi, what="a whole number (0 or more)")
    except NumberError as exc:
        raise UsageError(f"{flag} expects a whole number (0 to {hi}), got {value!r}", str(exc)) from None


def parse_port(value: str) -> int | None:
    """--port: "" (not given) → None; else a port 0-65535 (0: any free one)."""
    if value == "":
        return None
    try:
        return parse_int(value, lo=0, hi=65535, what="a port (1-65535, or 0 for any free one)")
    except NumberError as exc:
        raise UsageError(f"--port: {exc}") from None


def parse_minutes(value: str) -> float | None:
    """--idle-stop: "" (not given) → None; else minutes, fractions allowed (0: off)."""
    if value == "":
        return None
    try:
        return parse_decimal(value, lo=0.0, hi=525600.0, what="minutes (e.g. 30, or 0.5 for 30 seconds; 0: off)")
    except NumberError as exc:
        raise UsageError(f"--idle-stop: {exc}") from None
