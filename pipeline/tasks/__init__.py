"""Thin Invoke tasks, one module per topic; `collection()` gathers them all.

Every module in this package that defines `invoke.Task` objects at module level contributes
them, so adding a topic is adding a file. Modules must import heavy libraries (fabric,
paramiko, jinja2, hcl2, rich) inside task bodies, never at import time: `invoke --list`
stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from invoke import Collection, Task

from pipeline.tasks import aliases, cli

# The checkout this package is installed from (editable): where tasks.py and invoke.yaml are.
CHECKOUT = Path(__file__).resolve().parents[2]


def collection(root: Path = CHECKOUT) -> Collection:
    """The root collection: every Task defined in pipeline.tasks.* and the per-image tasks of
    `root`/invoke.yaml's images (pipeline.tasks.aliases), sorted by name.

    Also installs the command-line helpers of pipeline.tasks.cli (friendly parse errors, value
    placeholders in the help) into Invoke's parser for this process.
    """
    cli.install()
    ns = Collection()
    tasks: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("aliases", "cli", "common", "docgen", "guard", "loading",
                                                      "options"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Task):
                tasks[value.name] = value
    for made in aliases.per_image(tasks, root):
        tasks[made.name] = made
    for name in sorted(tasks):
        ns.add_task(tasks[name], name=name)
    return ns
