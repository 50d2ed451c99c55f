"""No-op rebuild: `invoke build demo-x86_64 --if-changed` with nothing changed, vs `invoke --list`.

Goals: median ≤ 0.5 s and ≤ 2× the CLI start. Builds the demo image once into a temporary
output folder (a real packer build, ~30 s), then alternates the two commands.
Usage: python3 bench/noop_rebuild.py [RUNS] [--json]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from _common import alternate, count, figure, finish, timed

runs = count(15)
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-"))
cfg_file = work / "bench.yaml"
cfg_file.write_text(yaml.safe_dump({"defaults": {"output_dir": str(work / "output")}}))
invoke = [sys.executable, "-m", "invoke", "-f", str(cfg_file)]
try:
    timed(invoke + ["build-demo"])  # the build the no-op runs compare against
    t = alternate(runs, {"no-op": lambda: timed(invoke + ["build", "demo-x86_64", "--if-changed"]),
                         "--list": lambda: timed([sys.executable, "-m", "invoke", "--list"])}, "noop ")
finally:
    shutil.rmtree(work, ignore_errors=True)
name = "build --if-changed, nothing changed"
finish([figure(name, t["no-op"], ratio_of="", op="<=", limit=0.5),
        figure(f"{name} vs invoke --list", t["no-op"], t["--list"], op="<=", limit=2.0)])
