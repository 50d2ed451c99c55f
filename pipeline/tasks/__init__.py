"""Thin Invoke tasks, one module per topic; `collection()` gathers them all.

Every module in this package that defines `invoke.Task` objects at module level contributes
them, so adding a topic is adding a file. Modules must import heavy libraries (fabric,
paramiko, jinja2, hcl2, rich) inside task bodies, never at import time: `invoke --list`
stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from invoke import Collection, Task

from pipeline.tasks import cli


def collection() -> Collection:
    """The root collection: every Task defined in pipeline.tasks.* (sorted by name).

    Also installs the command-line helpers of pipeline.tasks.cli (friendly parse errors, value
    placeholders in the help) into Invoke's parser for this process.
    """
    cli.install()
    ns = Collection()
    tasks: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("cli", "common", "docgen", "guard", "loading", "options"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Task):
                tasks[value.name] = value
    for name in sorted(tasks):
        ns.add_task(tasks[name], name=name)
    return ns
