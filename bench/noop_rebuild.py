"""No-op rebuild: `invoke build demo-x86_64 --if-changed` with nothing changed, vs `invoke --list`.

Goals: median ≤ 0.5 s and ≤ 2× the CLI start. Builds the demo image once into a temporary
output folder (a real packer build, ~30 s), then alternates the two commands.
Usage: python3 bench/noop_rebuild.py [RUNS]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _common import report, timed

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-"))
cfg_file = work / "bench.yaml"
cfg_file.write_text(yaml.safe_dump({"defaults": {"output_dir": str(work / "output")}}))
invoke = [sys.executable, "-m", "invoke", "-f", str(cfg_file)]
try:
    timed(invoke + ["build-demo"])  # the build the no-op runs compare against
    noop, cli = [], []
    for _ in range(runs):  # alternate so machine noise hits both alike
        noop.append(timed(invoke + ["build", "demo-x86_64", "--if-changed"]))
        cli.append(timed([sys.executable, "-m", "invoke", "--list"]))
finally:
    shutil.rmtree(work, ignore_errors=True)
report("build --if-changed (nothing changed)", noop, cli, "median ≤ 0.5 s and ratio ≤ 2")
ok = statistics.median(noop) <= 0.5 and statistics.median(noop) <= 2 * statistics.median(cli)
print("goals met" if ok else "goals NOT met")
