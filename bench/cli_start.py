"""CLI start: median wall time of `invoke --list` (goal ≤ 0.25 s), vs bare `python -c pass`.

Heavy libraries (fabric, paramiko, jinja2, hcl2, rich) must be imported lazily for this to hold.
Usage: python3 bench/cli_start.py [RUNS]
"""

from __future__ import annotations

import sys

from _common import report, timed

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
ours, raw = [], []
for _ in range(runs):  # alternate so machine noise hits both alike
    ours.append(timed([sys.executable, "-m", "invoke", "--list"]))
    raw.append(timed([sys.executable, "-c", "import invoke"]))
report("invoke --list", ours, raw, "median ≤ 0.25 s")
