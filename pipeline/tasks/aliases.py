"""The per-image task names (build-alma-x86, run-demo, ssh-nixos, ...), made from invoke.yaml's images by one rule.

Every image of the project's invoke.yaml gets `build-STEM`, `run-STEM`, `ssh-STEM` and
`remote-fetch-STEM`: the task with the image given. STEM is the distro's entry in
`pipeline.distros.ALIAS_STEMS` (almalinux: `alma-{arch}`, demo: `demo`), else `DISTRO-{arch}`,
with the arch as x86 or arm; a stem two images would share goes to the first one listed. The
ssh task of a distro's first image also answers to `ssh-DISTRO` (ssh-alma, ssh-nixos). Names
from before the rule stay as second names (remote-fetch-x86 for remote-fetch-alma-x86).

The images are read from invoke.yaml beside tasks.py (a `-f` file's images get none), as data
and without validating it: a broken file gives no aliases here and its error where Invoke reads
it. Nothing of a profile is imported: `invoke --list` builds these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from invoke import Task

from pipeline.distros import ALIAS_STEMS
from pipeline.tasks.cli import task_name
from pipeline.tasks.common import alias
from pipeline.tasks.loading import load_yaml_file

ARCHES = {"x86_64": "x86", "aarch64": "arm"}
# task -> (prefix of its per-image names, their one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "build": ("build", "Build {image}."),
    "run": ("run", "Boot {image} (the instance named after it)."),
    "ssh": ("ssh", "SSH into {image} (the instance named after it)."),
    "remote-fetch": ("remote-fetch", "Fetch {image} from a builder."),
}
# the argument each verb's per-image task fixes (ssh takes an instance: the one named after the image)
BINDS = {"ssh": "instance"}
# names people used before the rule, kept as second names of the rule's
KEPT: dict[str, tuple[str, ...]] = {
    "remote-fetch-alma-x86": ("remote-fetch-x86",),
    "remote-fetch-alma-arm": ("remote-fetch-arm",),
}


def images(root: Path) -> dict[str, tuple[str, str]]:
    """image -> (distro, arch) of every image in `root`/invoke.yaml, in the file's order ({} when
    it cannot be read)."""
    try:
        data = load_yaml_file(root / "invoke.yaml") or {}
    except BaseException:  # noqa: BLE001 - Invoke reports a broken file when it reads it
        return {}
    entries = data.get("images") if isinstance(data, dict) else None
    out: dict[str, tuple[str, str]] = {}
    for name, body in (entries or {}).items() if isinstance(entries, dict) else ():
        if isinstance(body, dict) and isinstance(body.get("distro"), str) and isinstance(body.get("arch"), str):
            out[str(name)] = (body["distro"], body["arch"])
    return out


def stems(found: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """image -> its stem (see the module docstring); an image whose stem is taken gets none."""
    out: dict[str, str] = {}
    for image, (distro, arch) in found.items():
        stem = ALIAS_STEMS.get(distro, f"{distro}-{{arch}}").format(arch=ARCHES.get(arch, arch))
        if stem not in out.values():
            out[image] = stem
    return out


def per_image(tasks: Mapping[str, Task], root: Path) -> list[Task]:
    """The per-image tasks for the images of `root`/invoke.yaml (never one a real task is named)."""
    tasks = {task_name(t): t for t in tasks.values()}
    found = images(root)
    named = stems(found)
    first_of: dict[str, str] = {}
    for image, (distro, _arch) in found.items():
        first_of.setdefault(distro, image)
    made: list[Task] = []
    for target, (prefix, doc) in VERBS.items():
        if target not in tasks:
            continue
        for image, stem in named.items():
            distro, _arch = found[image]
            name = f"{prefix}-{stem}"
            short = ALIAS_STEMS.get(distro, f"{distro}-{{arch}}").replace("-{arch}", "").replace("{arch}", "")
            by_distro = [f"ssh-{short}"] if target == "ssh" and first_of[distro] == image and short != stem else []
            second = [*KEPT.get(name, ()), *by_distro]
            if name in tasks:
                continue
            made.append(alias(tasks[target], name, doc.format(image=image),
                              aliases=tuple(n for n in second if n not in tasks), **{BINDS.get(target, "image"): image}))
    return made
