"""No-op rebuild: `invoke build demo-x86_64 --if-changed` with nothing changed, vs `invoke --list`.

Goals: median ≤ 0.5 s and ≤ 2× the CLI start. Builds the demo image once into a temporary
output folder (a real packer build, ~30 s), then alternates the two commands.
Usage: python3 bench/noop_rebuild.py [RUNS] [--json]
"""

from __future__ import annotations

import shutil
import sys

from _common import alternate, count, figure, finish, timed, workspace

runs = count(15)
work, _output, invoke = workspace()
try:
    timed(invoke + ["build-demo"])  # the build the no-op runs compare against
    t = alternate(runs, {"no-op": lambda: timed(invoke + ["build", "demo-x86_64", "--if-changed"]),
                         "--list": lambda: timed([sys.executable, "-m", "invoke", "--list"])}, "noop ")
finally:
    shutil.rmtree(work, ignore_errors=True)
name = "build --if-changed, nothing changed"
finish([figure(name, t["no-op"], ratio_of="", op="<=", limit=0.5),
        figure(f"{name} vs invoke --list", t["no-op"], t["--list"], op="<=", limit=2.0)])
