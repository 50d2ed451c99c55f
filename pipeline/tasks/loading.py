"""Invoke's own loading, made to fail with one line: invoke.yaml, the -f file and INVOKE_* variables.

Invoke reads its configuration before any task runs, so `guard` cannot see what goes wrong
there. `guard_invoke_config` (called by tasks.py before anything else) wraps Invoke's YAML
loading, its merge of the configuration layers and its INVOKE_* casting: a YAML syntax error is
`FILE:LINE:COL: problem` (exit 2), a variable of the wrong type names itself (exit 2), and any
exception escaping Invoke's program is one line plus a trace file (pipeline.tasks.guard). It
sits beside pipeline.tasks.cli, which wraps Invoke's parser the same narrow way.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from typing import Any

import yaml
from invoke import Exit
from invoke import config as invoke_config
from invoke import env as invoke_env
from invoke.exceptions import AmbiguousEnvVar, UncastableEnvVar

from pipeline.base.errors import NumberError
from pipeline.base.numbers import parse_decimal, parse_int
from pipeline.base.text import visible
from pipeline.tasks.guard import excepthook, flush_stdout


def guard_invoke_config() -> None:
    """Make Invoke's config loading fail with one line instead of a traceback (it runs before any
    task, so `guard` cannot see it): YAML errors in invoke.yaml / -f FILE, INVOKE_* variables of
    the wrong type, and, as a last resort, any exception escaping Invoke's program (a line plus
    a trace file, through sys.excepthook)."""
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
            try:
                return original_load(self)
            except AmbiguousEnvVar as exc:
                raise Exit(f"error: {visible(str(exc))}: two configuration keys map to the same INVOKE_* "
                           "variable; rename one of them", code=2) from None

        env_cls._path_set = _path_set  # type: ignore[method-assign]
        env_cls.load = load  # type: ignore[method-assign]
        env_cls._imagepipe_guarded = True  # type: ignore[attr-defined]
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = excepthook
        atexit.register(flush_stdout)


def load_yaml_file(path: Any) -> Any:
    """Invoke's YAML loading (safe_load), with libyaml's parser where PyYAML has it (Invoke's own
    pure-Python copy took ~25 ms of every command's start for invoke.yaml) and errors as
    `Exit("FILE:LINE:COL: problem", 2)`."""
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
