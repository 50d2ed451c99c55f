"""How imagepipe shows sizes and durations: one unit for sizes (MiB) everywhere - build
messages, history, gc, status, downloads - and h:mm:ss for durations."""

from __future__ import annotations

MIB = 1024**2


def mib(n: float) -> str:
    """A size in MiB: `2.9 MiB`, `1024.0 MiB` (one unit, so sizes compare at a glance)."""
    return f"{n / MIB:.1f} MiB"


def clock(seconds: float) -> str:
    """A duration as h:mm:ss: `0:02:15`."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
