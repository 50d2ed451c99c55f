"""What every task module shares: config loading, the one error → exit-code mapping, aliases,
and the command-line checks every task gets (help, a left-out IMAGE/HOST, Invoke's --dry).

No traceback reaches a user: `guard` maps ImagepipeError to its one-line message and exit code,
a disk error to a line naming the path and the free space, and anything unexpected (a bug) to
one line saying where the full trace was kept (output/.logs/, printed as well with --debug or
IMAGEPIPE_DEBUG=1). `guard_invoke_config` does the same for what goes wrong inside Invoke before
any task runs: a YAML syntax error in invoke.yaml or the -f file (`FILE:LINE:COL: problem`,
exit 2), an INVOKE_* variable that is not of its key's type (named, exit 2).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Context, Exit, Task
from invoke import task as invoke_task

from pipeline.base.errors import ImagepipeError
from pipeline.base.text import visible, visible_lines
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


def load_config(c: Context) -> Config:
    """The validated configuration of this invocation (invoke.yaml, -f, INVOKE_* merged)."""
    return from_invoke(c.config)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map ImagepipeError to `Exit(message, code)`; Ctrl-C to exit 130 with one line; a disk error
    to one line with the path and free space; any other exception to one line plus where its
    trace was kept (exit 70)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exit:
            raise
        except ImagepipeError as exc:
            raise Exit(f"error: {visible_lines(exc.render())}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None
        except BrokenPipeError:  # `invoke ... | head`: the reader has all it wanted
            _quiet_stdout()
            raise Exit(code=141) from None
        except Exception as exc:  # noqa: BLE001 - the one place where anything else becomes one line
            err = _as_user_error(exc, args, fn.__name__)
            raise Exit(f"error: {visible_lines(err.render())}", code=err.exit_code) from None

    return wrapper


def _as_user_error(exc: Exception, args: tuple[Any, ...], where: str) -> ImagepipeError:
    """A disk error as StorageError (path, free space); anything else as an InternalError."""
    from pipeline.base.crash import unexpected
    from pipeline.base.fsutil import is_storage_error, storage_error

    if isinstance(exc, OSError) and is_storage_error(exc):
        return storage_error(exc)
    return unexpected(exc, _output_dir(args), where)


def _output_dir(args: tuple[Any, ...]) -> Path | None:
    """The configured output folder, if the task's config can still be read (it may be what failed)."""
    try:
        out = from_invoke(args[0].config).output_dir
    except Exception:  # noqa: BLE001 - only a place for a trace file; the temp folder will do
        return None
    return out if out.is_dir() else None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so Python's exit flush does not fail again on the closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout() -> None:
    """At exit: write what is still buffered (a pipe's stdout is block-buffered, so `invoke --list
    | head` meets the closed pipe here, after Invoke has returned); a reader that went away is
    not an error, so the rest goes to /dev/null instead of Python's "Exception ignored" lines."""
    try:
        sys.stdout.flush()
    except ValueError:  # stdout already closed
        pass
    except OSError as exc:
        if not _output_lost(exc):  # `invoke --list > /dev/full`: lost output, so the exit status says so
            os._exit(1)


def _output_lost(exc: OSError) -> bool:
    """stdout could not be written. True (nothing wrong) when the reader went away (`| head`);
    else one line (`writing the output failed: no space left on the device`) and False. Either
    way the rest goes to /dev/null, so Python's own final flush does not complain again."""
    if not isinstance(exc, BrokenPipeError):
        from pipeline.base.fsutil import STORAGE_ERRNOS

        why = STORAGE_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
        print(f"error: writing the output failed: {why}", file=sys.stderr, flush=True)
    _quiet_stdout()
    return isinstance(exc, BrokenPipeError)


# ----------------------------------------------------------------------- Invoke's own loading


def guard_invoke_config() -> None:
    """Make Invoke's config loading fail with one line instead of a traceback (it runs before any
    task, so `guard` cannot see it): YAML errors in invoke.yaml / -f FILE, INVOKE_* variables of
    the wrong type, and, as a last resort, any exception escaping Invoke's program (a line plus
    a trace file, through sys.excepthook)."""
    from invoke import config as invoke_config
    from invoke import env as invoke_env

    cls = invoke_config.Config
    if not getattr(cls, "_imagepipe_guarded", False):
        def _load_yaml(self: Any, path: Any) -> Any:
            return load_yaml_file(path)

        original_merge = cls.merge

        def merge(self: Any) -> None:
            try:
                original_merge(self)
            except invoke_config.AmbiguousMergeError:
                raise Exit(f"error: {merge_clash(self)}", code=2) from None

        cls._load_yaml = _load_yaml  # type: ignore[method-assign]
        cls._load_yml = _load_yaml
        cls.merge = merge  # type: ignore[method-assign]
        cls._imagepipe_guarded = True  # type: ignore[attr-defined]
    env_cls = invoke_env.Environment
    if not getattr(env_cls, "_imagepipe_guarded", False):
        original_set, original_load = env_cls._path_set, env_cls.load

        def _path_set(self: Any, key_path: Any, value: str) -> None:
            set_env_value(original_set, self, key_path, value)

        def load(self: Any) -> Any:
            from invoke.exceptions import AmbiguousEnvVar

            try:
                return original_load(self)
            except AmbiguousEnvVar as exc:
                raise Exit(f"error: {visible(str(exc))}: two configuration keys map to the same INVOKE_* "
                           "variable; rename one of them", code=2) from None

        env_cls._path_set = _path_set  # type: ignore[method-assign]
        env_cls.load = load  # type: ignore[method-assign]
        env_cls._imagepipe_guarded = True  # type: ignore[attr-defined]
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _last_resort
        atexit.register(_flush_stdout)


def load_yaml_file(path: Any) -> Any:
    """Invoke's YAML loading (safe_load), with libyaml's parser where PyYAML has it (Invoke's own
    pure-Python copy took ~25 ms of every command's start for invoke.yaml) and errors as
    `Exit("FILE:LINE:COL: problem", 2)`."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fd:
            data = yaml.load(fd, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise Exit(f"error: {yaml_problem(str(path), exc)}", code=2) from None
    except UnicodeDecodeError as exc:
        raise Exit(f"error: {path}: not UTF-8 text (byte {exc.start})", code=2) from None
    if data is not None and not isinstance(data, dict):
        raise Exit(f"error: {path}:1:1: expected a mapping of keys (defaults:, images:, ...) at the top, "
                   f"got a {type(data).__name__}", code=2)
    return data


def yaml_problem(path: str, exc: Exception) -> str:
    """`FILE:LINE:COL: problem` for a YAML error (the mark of the problem, else of its context)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    context = getattr(exc, "context", None)
    return visible(f"{where}: {problem}" + (f" ({context})" if context and context not in problem else ""))


def merge_clash(config: Any) -> str:
    """Where two configuration layers disagree about a value's type (a mapping in one, a list or
    text in the other), which Invoke cannot merge: `FILE: KEY is a list here, a mapping in FILE`."""
    def layer(name: str) -> Any:
        try:
            return object.__getattribute__(config, name)
        except AttributeError:
            return None

    base_label = str(layer("_project_path") or "invoke.yaml")
    upper = [(str(layer("_runtime_path") or "the -f file"), layer("_runtime")), ("INVOKE_* variables", layer("_env"))]
    for label, data in upper:
        found = _clash(layer("_project") or {}, data or {}, "")
        if found:
            key, here, there = found
            return visible(f"{label}: {key} is a {here} here but a {there} in {base_label}; "
                           "Invoke cannot merge the two: make them the same kind")
    return "two configuration files disagree about the type of a value (a mapping in one, not in the other)"


def _clash(base: Any, update: Any, path: str) -> tuple[str, str, str] | None:
    """The first key (dotted) that is a mapping on one side and not on the other."""
    if not isinstance(base, dict) or not isinstance(update, dict):
        return None
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if key in base and isinstance(base[key], dict) != isinstance(value, dict):
            return where, _kind(value), _kind(base[key])
        found = _clash(base.get(key), value, where)
        if found:
            return found
    return None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return "true/false value" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "text"


def set_env_value(original: Callable[..., None], env: Any, key_path: Any, value: str) -> None:
    """Invoke's INVOKE_* casting, strict for numbers, with errors naming the variable (exit 2)."""
    from invoke.exceptions import UncastableEnvVar

    from pipeline.base.errors import NumberError
    from pipeline.base.numbers import parse_decimal, parse_int

    var = (env._prefix or "") + env._to_env_var(key_path)
    try:
        old = env._path_get(key_path)
    except (KeyError, TypeError):
        old = None
    try:
        if isinstance(old, int) and not isinstance(old, bool):
            parse_int(value, signed=True, what="a whole number")
        elif isinstance(old, float):
            parse_decimal(value, what="a number")
        original(env, key_path, value)
    except (NumberError, ValueError, TypeError) as exc:
        raise Exit(f"error: {var}={visible(repr(value))[:60]}: {visible(str(exc))} "
                   f"(it sets {'.'.join(map(str, key_path))})", code=2) from None
    except UncastableEnvVar as exc:  # a list or mapping cannot come from a string
        raise Exit(f"error: {var}: {'.'.join(map(str, key_path))} is a {type(old).__name__} in the "
                   f"configuration and cannot be set from an environment variable ({visible(str(exc))}); "
                   "unset it", code=2) from None


def _last_resort(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """sys.excepthook: one line and a trace file instead of a traceback (exit status stays 1)."""
    from pipeline.base.crash import unexpected

    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.filename is None and exc.errno in (
            errno.ENOSPC, errno.EDQUOT, errno.EIO)):  # Invoke printing --list or --help to `| head`, a full disk
        _output_lost(exc)
        return
    print(f"error: {unexpected(exc.with_traceback(tb), None, 'invoke').render()}", file=sys.stderr, flush=True)


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

    @functools.wraps(body)
    def checked(c: Context, *args: Any, **kwargs: Any) -> Any:
        name = task_name(made)
        values = dict(zip(positional, args, strict=False)) | {k: v for k, v in kwargs.items() if k in positional}
        if any(v in HELP_TOKENS for v in values.values()):
            print_task_help(name)
            return None
        guard(_refuse_invoke_dry)(c, name, "dry_run" in inspect.signature(body).parameters)
        missing = [p for p in positional if values.get(p) is None]
        if missing:
            guard(_missing_positional)(c, made, missing)
        return body(c, *args, **kwargs)

    return checked


def _refuse_invoke_dry(c: Context, name: str, has_dry_run: bool) -> None:
    from pipeline.base.errors import UsageError

    if c.config.get("run", {}).get("dry"):
        raise UsageError(
            "--dry is Invoke's own flag (echo shell commands instead of running them); imagepipe runs its"
            " tools itself and would ignore it, so nothing was started",
            f"use: invoke {name} --dry-run   (shows the plan, builds nothing)" if has_dry_run
            else f"run it without --dry: invoke {name}",
        )


def _missing_positional(c: Context, made: Task, missing: list[str]) -> None:
    """A usage error for left-out positionals: the usage line and, for IMAGE, the configured images."""
    from pipeline.base.errors import UsageError

    words = " and ".join(METAVARS.get(m, m.upper()) for m in missing)
    hint = f"usage: {usage_line(made)}"
    if "image" in missing:
        cfg = load_config(c)
        hint += "\n  configured images: " + ", ".join(sorted(cfg.images))
    if "host" in missing:
        cfg = load_config(c)
        known = ", ".join(sorted(cfg.builders)) or "none in invoke.yaml (any SSH host alias works)"
        hint += f"\n  configured builders: {known}"
    raise UsageError(f"invoke {task_name(made)} needs {words}", hint)


def alias(target: Task, name: str, doc: str, **bound: Any) -> Task:
    """A task `name` that calls `target` with some arguments fixed (build-alma-x86 → build).

    The alias takes every other argument of the target, with the same help and short flags.
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
    made = ImagepipeTask(call, name=name, help=helps,
                         positional=[p for p in (target.positional or []) if p not in bound],
                         iterable=list(target.iterable or []), optional=list(target.optional or []))
    made.unchecked = call  # type: ignore[attr-defined]
    made.alias_of = (task_name(target), bound)  # type: ignore[attr-defined]  # for docs/tasks.md
    made.body = cli_checks(made, call)
    return made


def say(message: str) -> None:
    """A line for the user on stderr (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)
