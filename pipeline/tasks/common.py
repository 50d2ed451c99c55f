"""What every task module uses: `@task` (with the error guard and the command-line checks), `alias`, `load_config` and `say`.

A task gets, besides `guard`'s one-line errors: `-h`/`--help` anywhere on its line, a usage
line and the configured images (or builders) when its IMAGE or HOST is left out (exit 2), and a
pointer to `--dry-run` when Invoke's own `--dry` is given.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

from invoke import Context, Task
from invoke import task as invoke_task

from pipeline.base.errors import UsageError
from pipeline.config import from_invoke
from pipeline.model import Config
from pipeline.tasks.cli import (
    HELP_TOKENS,
    METAVARS,
    ImagepipeTask,
    print_task_help,
    task_name,
    usage_line,
)
from pipeline.tasks.guard import guard


def task(*args: Any, **kwargs: Any) -> Any:
    """`invoke.task` plus `guard` and the command-line checks: use exactly like @task(help={...}).

    Tasks are `ImagepipeTask`s: short flags, number options and placeholders follow the tables in
    pipeline.tasks.cli, the same in every task.
    """

    def deco(fn: Callable[..., Any]) -> Task:
        made: Task = invoke_task(klass=ImagepipeTask, **kwargs)(guard(fn))
        made.unchecked = made.body  # type: ignore[attr-defined]  # what aliases call
        made.body = cli_checks(made, made.body)
        return made

    if args and callable(args[0]) and not kwargs:
        return deco(args[0])
    return deco


def cli_checks(made: Task, body: Callable[..., Any]) -> Callable[..., Any]:
    """Before the task runs: `-h`/`--help` where a positional was expected prints the help; a
    left-out positional (IMAGE, HOST) is a usage error naming the valid values; Invoke's own
    `--dry` (echo shell commands instead of running them) is refused, since imagepipe runs its
    tools itself and would ignore it."""
    positional = list(made.positional or [])
    # a positional with a default (None) may be left out: `invoke status [INSTANCE]`
    optional = {n for n, p in inspect.signature(body).parameters.items() if p.default is not inspect.Parameter.empty}

    @functools.wraps(body)
    def checked(c: Context, *args: Any, **kwargs: Any) -> Any:
        name = task_name(made)
        values = dict(zip(positional, args, strict=False)) | {k: v for k, v in kwargs.items() if k in positional}
        if any(v in HELP_TOKENS for v in values.values()):
            print_task_help(name)
            return None
        guard(_refuse_invoke_dry)(c, name, "dry_run" in inspect.signature(body).parameters)
        missing = [p for p in positional if values.get(p) is None and p not in optional]
        if missing:
            guard(_missing_positional)(c, made, missing)
        return body(c, *args, **kwargs)

    return checked


def _refuse_invoke_dry(c: Context, name: str, has_dry_run: bool) -> None:
    if c.config.get("run", {}).get("dry"):
        raise UsageError(
            "--dry is Invoke's own flag (echo shell commands instead of running them); imagepipe runs its"
            " tools itself and would ignore it, so nothing was started",
            f"use: invoke {name} --dry-run   (shows the plan, builds nothing)" if has_dry_run
            else f"run it without --dry: invoke {name}",
        )


def _missing_positional(c: Context, made: Task, missing: list[str]) -> None:
    """A usage error for left-out positionals: the usage line and, for IMAGE, the configured images
    (HOST: the builders; NAME: the instances)."""
    words = " and ".join(METAVARS.get(m, m.upper()) for m in missing)
    hint = f"usage: {usage_line(made)}"
    if "image" in missing:
        cfg = load_config(c)
        hint += "\n  configured images: " + ", ".join(sorted(cfg.images))
    if "host" in missing:
        cfg = load_config(c)
        known = ", ".join(sorted(cfg.builders)) or "none in invoke.yaml (any SSH host alias works)"
        hint += f"\n  configured builders: {known}"
    if "instance" in missing:
        from pipeline.vm.instances import records  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        names = ", ".join(r.name for r in records(load_config(c).output_dir))
        hint += f"\n  instances: {names or 'none yet (invoke run IMAGE makes one, named after the image)'}"
    raise UsageError(f"invoke {task_name(made)} needs {words}", hint)


def alias(target: Task, name: str, doc: str, aliases: tuple[str, ...] = (), **bound: Any) -> Task:
    """A task `name` that calls `target` with some arguments fixed (build-alma-x86 → build).

    The alias takes every other argument of the target, with the same help and short flags;
    `aliases` are further names it answers to (pipeline.tasks.aliases makes the per-image ones).
    """
    body = getattr(target, "unchecked", target.body)
    sig = inspect.signature(body)
    params = [p for n, p in sig.parameters.items() if n not in bound]

    def call(c: Context, *args: Any, **kwargs: Any) -> Any:
        return body(c, *args, **{**kwargs, **bound})

    call.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    call.__doc__ = doc
    call.__name__ = name.replace("-", "_")
    helps = {k: v for k, v in (target.help or {}).items() if k not in bound}
    made = ImagepipeTask(call, name=name, aliases=aliases, help=helps,
                         positional=[p for p in (target.positional or []) if p not in bound],
                         iterable=list(target.iterable or []), optional=list(target.optional or []))
    made.unchecked = call  # type: ignore[attr-defined]
    made.alias_of = (task_name(target), bound)  # type: ignore[attr-defined]  # for docs/tasks.md
    made.body = cli_checks(made, call)
    return made


def load_config(c: Context) -> Config:
    """The validated configuration of this invocation (invoke.yaml, -f, INVOKE_* merged)."""
    return from_invoke(c.config)


def say(message: str) -> None:
    """A line for the user on stderr (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)
