"""Scheduled no-op: `invoke rebuild --all` with nothing changed, over every configured image.

Goal: median ≤ 0.5 s in total (and, for scale, its ratio to `invoke --list`, the CLI's start,
measured alternately in the same run). Setup, outside the timing: the demo image is built for
real into a temporary output folder. Every other configured image that this host can build gets
a stand-in published build (AlmaLinux and NixOS cannot be built here at all, and a real Debian
build, aarch64 emulated, would take most of an hour): a copy of the demo's build under the
image's own names with the image's current input hash in its manifest, which is exactly what a
rebuild reads to decide "up to date" (it never opens the image itself). Images this host cannot
build at all come out "skipped" (the first `rebuild --all` says which).
Every run must report no image built and none failed, or the benchmark stops.
Usage: python3 bench/scheduled_noop.py [RUNS] [--json]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from _common import ROOT, alternate, count, figure, finish, say, timed, workspace

from pipeline import config, distros, inputs
from pipeline.model import Config
from pipeline.output import artifacts

runs = count(9, minimum=3)
work, output, invoke = workspace()
rebuild = [*invoke, "rebuild", "--all"]


def stand_in(cfg: Config, name: str, demo_build: Path) -> None:
    """Publish a copy of the demo's build as `name`'s, with `name`'s current input hash."""
    image = cfg.image(name)
    manifest = json.loads((demo_build / artifacts.MANIFEST).read_text(encoding="utf-8"))
    stage = output / name / ".staging" / "bench-stand-in"
    stage.mkdir(parents=True)
    shutil.copyfile(demo_build / manifest["artifact"]["file"], stage / distros.artifact_name(image))
    entry = {**manifest["artifact"], "file": distros.artifact_name(image)}
    ihash = inputs.compute(cfg, image, save_cache=False)
    manifest.update(image=name, build_id="bench-stand-in", artifact=entry, artifacts=[entry],
                    input_hash=ihash.value, input_parts=ihash.parts, files={})
    manifest.pop("boot", None)
    artifacts.write_build_files(stage, manifest, {distros.artifact_name(image): entry["sha256"]})
    artifacts.publish(stage, output / name, "bench-stand-in")


def outcomes() -> dict[str, str]:
    """image → outcome of one `rebuild --all --json` (exit status checked)."""
    res = subprocess.run([*rebuild, "--json"], cwd=ROOT, capture_output=True, text=True, check=False)
    found = {}
    for line in res.stdout.splitlines():
        ev = json.loads(line) if line.startswith("{") else {}
        if ev.get("kind") in ("built", "up-to-date", "skipped", "failed"):
            found[ev.get("image", "?")] = ev["kind"]
    if res.returncode != 0:
        sys.exit(f"rebuild --all exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return found


try:
    timed([*invoke, "build-demo"])
    cfg = config.load({**yaml.safe_load((ROOT / "invoke.yaml").read_text()),
                       "defaults": {**yaml.safe_load((ROOT / "invoke.yaml").read_text())["defaults"],
                                    "output_dir": str(output)}}, ROOT)
    demo_build = artifacts.current_build(output / "demo-x86_64")
    assert demo_build is not None
    for name in cfg.images:
        if name != "demo-x86_64":
            stand_in(cfg, name, demo_build)
    seen = outcomes()
    say("rebuild --all: " + ", ".join(f"{n} {k}" for n, k in sorted(seen.items())))
    if len(seen) != len(cfg.images) or not set(seen.values()) <= {"up-to-date", "skipped"}:
        sys.exit("rebuild --all is not a no-op here: every image must be up-to-date or skipped")
    t = alternate(runs, {"rebuild": lambda: timed(rebuild),
                         "--list": lambda: timed([sys.executable, "-m", "invoke", "--list"])}, "scheduled ")
finally:
    shutil.rmtree(work, ignore_errors=True)
name = f"rebuild --all, nothing changed ({len(seen)} images)"
finish([figure(name, t["rebuild"], ratio_of="", op="<=", limit=0.5),
        figure(f"{name} vs invoke --list", t["rebuild"], t["--list"], op="<=", limit=2.0)])
