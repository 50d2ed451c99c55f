"""Build overhead: `invoke build-demo` vs raw `packer build` of the same rendered template.

Alternates task and raw runs (5 pairs by default, ≥ 3), prints both medians and the ratio (goal
≤ 1.03). The raw side gets exactly what the task gives packer: same template, same variables, same
prepared inputs; the task adds probing, planning, verification and publishing.
Five pairs, not three: a build takes ~14.2 s or ~2 s more, on either side, about one run in four
(measured here alike on both sides, at this code and at the code before it; the raw side, which
runs nothing but Packer, takes the step too, so it lies in Packer's run of the guest, and looks
like its SSH wait just missing the guest's sshd; not traced further). With three pairs two slow
runs of one side decide its median; with five it takes three.
Usage: python3 bench/overhead.py [PAIRS] [--json]
"""

from __future__ import annotations

import shutil

import yaml
from _common import ROOT, alternate, count, figure, finish, timed, workspace

from pipeline import config, distros, keys
from pipeline.build import probe_for_build
from pipeline.drivers import packer
from pipeline.model import Accel
from pipeline.plan import make_build_plan

pairs = count(5, minimum=3)
work, _output, invoke = workspace()
raw_cfg = yaml.safe_load((ROOT / "invoke.yaml").read_text())
raw_cfg["defaults"]["output_dir"] = str(work / "output")
cfg = config.load(raw_cfg, ROOT)
image = cfg.image("demo-x86_64")
task = [*invoke, "build-demo"]


def raw_packer() -> float:
    """The same packer build the task runs, prepared outside the timing."""
    facts = probe_for_build(cfg, [image])
    profile = distros.profile(image)
    plan = make_build_plan(cfg, image, profile, facts, Accel.AUTO, keys.project_key(cfg.output_dir))
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    plan.staging.mkdir(parents=True)
    prepared = profile.prepare(plan, plan.staging, lambda _line: None)
    variables = {**packer.host_variables(plan, profile, plan.staging), **prepared.variables}
    template = packer.render_for(plan, profile, plan.staging, facts.version("packer") or (0,))
    try:
        return timed(packer.build_argv(template, variables), cwd=plan.staging,
                     env=packer.packer_env(plan, prepared))
    finally:
        shutil.rmtree(plan.staging)


try:
    timed(task)  # warm the package and guest caches for both sides
    t = alternate(pairs, {"task": lambda: timed(task), "raw packer": raw_packer}, "build ")
finally:
    shutil.rmtree(work, ignore_errors=True)
finish([figure("demo build vs raw packer build", t["task"], t["raw packer"], op="<=", limit=1.03)])
