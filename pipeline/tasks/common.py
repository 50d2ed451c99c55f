"""What every task module shares: config loading, the one error → exit-code mapping, aliases."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

from invoke import Context, Exit, Task
from invoke import task as invoke_task

from pipeline.config import Config, from_invoke
from pipeline.errors import ImagepipeError


def load_config(c: Context) -> Config:
    """The validated configuration of this invocation (invoke.yaml, -f, INVOKE_* merged)."""
    return from_invoke(c.config)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map ImagepipeError to `Exit(message, code)`; Ctrl-C to exit 130 with one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImagepipeError as exc:
            raise Exit(f"error: {exc.render()}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


def task(*args: Any, **kwargs: Any) -> Any:
    """`invoke.task` plus `guard`: use exactly like @task(help={...})."""

    def deco(fn: Callable[..., Any]) -> Task:
        return invoke_task(**kwargs)(guard(fn))

    if args and callable(args[0]) and not kwargs:
        return deco(args[0])
    return deco


def alias(target: Task, name: str, doc: str, **bound: Any) -> Task:
    """A task `name` that calls `target` with some arguments fixed (build-alma-x86 → build).

    The alias takes every other argument of the target, with the same help.
    """
    body = target.body
    sig = inspect.signature(body)
    params = [p for n, p in sig.parameters.items() if n not in bound]

    def call(c: Context, *args: Any, **kwargs: Any) -> Any:
        return body(c, *args, **{**kwargs, **bound})

    call.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    call.__doc__ = doc
    call.__name__ = name.replace("-", "_")
    helps = {k: v for k, v in (target.help or {}).items() if k not in bound}
    return Task(call, name=name, help=helps, positional=[p for p in (target.positional or []) if p not in bound],
                iterable=list(target.iterable or []), optional=list(target.optional or []))


def say(message: str) -> None:
    """A line for the user on stderr (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)
