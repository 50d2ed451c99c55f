"""Helpers for the benchmark scripts: timing, alternation, medians, figures and their goals.

Every script measures its figures, prints what it sees as it goes, and ends with
`finish(figures)`: one goal line per figure, printed last ("met" / "NOT met"). Run with
`--json`, the same lines go to stderr and stdout holds one JSON object
`{"figures": [Figure...]}`, which `bench/run-all` collects into its table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _compile_project() -> None:
    """Compile the project's modules, as a user's Python does on their first run. This machine sets
    PYTHONDONTWRITEBYTECODE=1, under which every `invoke` would compile ~100 modules again (0.1-0.3 s
    of a figure no user pays after the first run). setup.sh does the same after installing."""
    import compileall

    compileall.compile_dir(ROOT / "pipeline", quiet=1)
    compileall.compile_file(ROOT / "tasks.py", quiet=1)


_compile_project()
JSON = "--json" in sys.argv[1:]
ARGS = [a for a in sys.argv[1:] if a != "--json"]
OPS: dict[str, Callable[[float, float], bool]] = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
SIGNS = {"<=": "≤", ">=": "≥"}


def workspace() -> tuple[Path, Path, list[str]]:
    """A fresh temporary folder for one benchmark: (the folder, its output folder, the `invoke`
    argv prefix with a `-f` overlay that points defaults.output_dir there). The caller removes
    the folder when done."""
    import tempfile

    import yaml

    work = Path(tempfile.mkdtemp(prefix="imagepipe-bench-"))
    output = work / "output"
    cfg_file = work / "bench.yaml"
    cfg_file.write_text(yaml.safe_dump({"defaults": {"output_dir": str(output)}}))
    return work, output, [sys.executable, "-m", "invoke", "-f", str(cfg_file)]


def say(line: str) -> None:
    """A progress line: stdout normally, stderr under --json (stdout is for the result)."""
    print(line, file=sys.stderr if JSON else sys.stdout, flush=True)


def count(default: int, minimum: int = 1) -> int:
    """The script's one optional argument (runs or pairs), at least `minimum`."""
    return max(minimum, int(ARGS[0]) if ARGS else default)


def timed(argv: Sequence[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> float:
    """Wall time of one run of argv (must succeed)."""
    start = time.perf_counter()
    subprocess.run(list(argv), cwd=cwd, env={**os.environ, **(env or {})}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def alternate(rounds: int, sides: dict[str, Callable[[], float]], label: str = "") -> dict[str, list[float]]:
    """Run each side once per round, rotating who goes first, so machine noise hits all alike."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(sides[n]())
        say(f"{label}round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names))
    return times


@dataclass(frozen=True)
class Figure:
    """One measured figure and its goal. `ratio` is `ratio_of` ("ours/raw" or "raw/ours") of
    the medians; the goal applies to the ratio or, without one, to `ours` itself."""

    name: str
    ours: float
    raw: float | None
    unit: str                    # "s", "B" (bytes), "%"
    ratio_of: str                # "ours/raw", "raw/ours", or "" when the goal is on ours
    op: str                      # "<=" or ">="
    limit: float

    @property
    def ratio(self) -> float | None:
        if not self.ratio_of or self.raw is None or self.ours == 0 or self.raw == 0:
            return None
        return self.ours / self.raw if self.ratio_of == "ours/raw" else self.raw / self.ours

    @property
    def goal(self) -> str:
        what = self.ratio_of if self.ratio_of else ""
        unit = "" if self.ratio_of else f" {self.unit}"
        return f"{what} {SIGNS[self.op]} {self.limit:g}{unit}".strip()

    @property
    def met(self) -> bool:
        value = self.ratio if self.ratio_of else self.ours
        return value is not None and OPS[self.op](value, self.limit)


def figure(name: str, ours: Sequence[float] | float, raw: Sequence[float] | float | None = None, *,
           unit: str = "s", ratio_of: str = "ours/raw", op: str = "<=", limit: float) -> Figure:
    """A Figure from samples (their medians) or single values."""
    def med(v: Sequence[float] | float) -> float:
        return float(statistics.median(v)) if isinstance(v, Sequence) else float(v)

    return Figure(name, med(ours), None if raw is None else med(raw), unit, ratio_of, op, limit)


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:.4g} {unit}"


def goal_line(f: Figure) -> str:
    """`name: ours X, raw Y, ratio Z (goal: ...) met` - the last lines every script prints."""
    parts = [f"ours {fmt_value(f.ours, f.unit)}"]
    if f.raw is not None:
        parts.append(f"raw {fmt_value(f.raw, f.unit)}")
    if f.ratio is not None:
        parts.append(f"{f.ratio_of} {f.ratio:.3f}")
    return f"{f.name}: {', '.join(parts)}  (goal: {f.goal})  {'met' if f.met else 'NOT met'}"


def finish(figures: Sequence[Figure]) -> None:
    """Print the goal lines last; under --json also the result object on stdout."""
    for f in figures:
        say(goal_line(f))
    if JSON:
        print(json.dumps({"figures": [asdict(f) for f in figures]}), flush=True)


def parse_result(stdout: str) -> list[Figure]:
    """The figures a script printed under --json (its last non-empty stdout line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no result printed")
    data = json.loads(lines[-1])
    return [Figure(**f) for f in data["figures"]]


def cpu_line(cpuinfo: str | None = None, cores: int | None = None) -> str:
    """The CPU the figures were taken on, and whether it has SHA (and AES) instructions: the
    loopback figures move with it (sha256 at 0.4 GB/s without SHA instructions, 1.7 GB/s with)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or "unknown CPU"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    sha = sorted(flags & {"sha_ni", "sha2", "sha512"})
    aes = "aes" in flags
    return (f"CPU: {model}, {cores or os.cpu_count()} cores; SHA instructions: "
            f"{'yes (' + ', '.join(sha) + ')' if sha else 'no'}; AES instructions: {'yes' if aes else 'no'}")


def table(rows: Sequence[tuple[str, Figure | str]]) -> str:
    """run-all's table: one row per figure (bench, figure, ours, raw, ratio, goal, met)."""
    header = ("bench", "figure", "ours", "raw", "ratio", "goal", "met")
    body = []
    for bench, f in rows:
        if isinstance(f, str):  # the bench failed: its error instead of numbers
            body.append((bench, f, "-", "-", "-", "-", "FAILED"))
            continue
        ratio = "-" if f.ratio is None else f"{f.ratio:.3f}"
        body.append((bench, f.name, fmt_value(f.ours, f.unit), fmt_value(f.raw, f.unit), ratio, f.goal,
                     "met" if f.met else "NOT met"))
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in (header, *body)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
