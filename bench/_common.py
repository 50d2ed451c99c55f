"""Helpers for the benchmark scripts: timing, alternation, medians, ratio lines."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(argv: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> float:
    """Wall time of one run of argv (must succeed)."""
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def report(name: str, ours: list[float], raw: list[float] | None, goal: str) -> None:
    """Print medians and the ratio ours/raw with the goal next to it."""
    m_ours = statistics.median(ours)
    line = f"{name}: ours median {m_ours:.3f}s over {len(ours)} runs"
    if raw:
        m_raw = statistics.median(raw)
        line += f"; raw median {m_raw:.3f}s; ratio {m_ours / m_raw:.3f}"
    print(f"{line}  (goal: {goal})")
