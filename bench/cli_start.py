"""CLI start: median wall time of `invoke --list` (goal ≤ 0.25 s), next to bare `import invoke`.

Heavy libraries (fabric, paramiko, jinja2, hcl2, rich) must be imported lazily for this to hold.
Usage: python3 bench/cli_start.py [RUNS] [--json]
"""

from __future__ import annotations

import sys

from _common import alternate, count, figure, finish, timed

runs = count(15)
t = alternate(runs, {"invoke --list": lambda: timed([sys.executable, "-m", "invoke", "--list"]),
                     "import invoke": lambda: timed([sys.executable, "-c", "import invoke"])}, "cli ")
finish([figure("invoke --list", t["invoke --list"], t["import invoke"], ratio_of="", op="<=", limit=0.25)])
