"""One strict parser for every number imagepipe reads: options, config, tool output, state files.

Python's `int()` is generous: it takes `" 5"`, `"1_000"`, `"٣"` (an Arabic-Indic three) and
`str.isdigit()` says yes to `"²"`, on which `int()` then raises. A number that steers a build
(a port, a pid, a size, a count) must be plain ASCII digits of a sane length, within bounds the
caller names; anything else is a `NumberError` (a ValueError) with a message fit for a user.
"""

from __future__ import annotations

import math
import re

from pipeline.base.errors import NumberError

# 18 digits: every bound used here is far below 10**18, and no such string is slow to convert.
MAX_DIGITS = 18
_INT = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_SIGNED = re.compile(rf"-?[0-9]{{1,{MAX_DIGITS}}}")
_DECIMAL = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}(\.[0-9]{{1,9}})?")
INT64_MAX = 2**63 - 1


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_int(value: object, *, lo: int = 0, hi: int = INT64_MAX, what: str = "a whole number",
              signed: bool = False) -> int:
    """`value` (an int, or text of ASCII digits; a leading '-' only when `signed`) as an int in
    [lo, hi]. Booleans, floats, spaces, '+', '_', exponents and non-ASCII digits are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise NumberError(f"expected {what}, got {_shown(value)}")
    if isinstance(value, str):
        pattern = _SIGNED if signed else _INT
        if not pattern.fullmatch(value):
            raise NumberError(f"expected {what} (digits 0-9 only), got {_shown(value)}")
        value = int(value)
    if not lo <= value <= hi:
        raise NumberError(f"expected {what} between {lo} and {hi}, got {value}")
    return value


def int_or_none(value: object, *, lo: int = 0, hi: int = INT64_MAX, signed: bool = False) -> int | None:
    """`parse_int`, or None where the value is not such a number (for tolerant readers of
    tool output and state files, which then treat the value as unknown)."""
    try:
        return parse_int(value, lo=lo, hi=hi, signed=signed)
    except NumberError:
        return None


def parse_decimal(value: object, *, lo: float = 0.0, hi: float = 1e15, what: str = "a number") -> float:
    """A non-negative decimal (`123`, `123.456`; an int or float value too) as a finite float in
    [lo, hi]; exponents, signs, spaces, nan and inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise NumberError(f"expected {what}, got {_shown(value)}")
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise NumberError(f"expected {what} (digits and one '.'), got {_shown(value)}")
        value = float(value)
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise NumberError(f"expected {what} between {lo:g} and {hi:g}, got {_shown(value)}")
    return number


def decimal_or_none(value: object, *, lo: float = 0.0, hi: float = 1e15) -> float | None:
    """`parse_decimal`, or None where the value is not such a number."""
    try:
        return parse_decimal(value, lo=lo, hi=hi)
    except NumberError:
        return None
