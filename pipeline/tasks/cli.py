"""Where imagepipe's tasks meet Invoke's command line: one meaning per short flag, typed number
options, help that always works, and parse errors that say what to do.

What Invoke 2.2 lets a project decide, and how it is used here:

- A `Task` subclass builds each task's `Argument`s (`Task.get_arguments`). `ImagepipeTask` gives
  every option its short flag from one project-wide table (`SHORT_FLAGS`: never `-h`, which stays
  help), parses number options itself (a one-line error, exit 2, instead of Invoke's traceback
  on `--limit x`) and lets a task's positional (IMAGE, HOST) be left out, so the task can answer
  with the usage and the configured images.
- Nothing covers the parser's own errors ("No idea what 'buidl' is!", "did not receive required
  positional arguments") or the value placeholder of the help (`--limit=STRING`): those are
  printed by Invoke's `Program`, and a Program or Executor defined in tasks.py is never used when
  people run `invoke` (only a separate console script could bring its own Program). `install()`
  therefore wraps two methods of Invoke's parser - `ParseMachine.error` and
  `ParserContext.help_for` - and leaves everything else to Invoke. Both wrappers only change
  what they recognise (our own arguments, the known messages) and call Invoke's original for the
  rest; tests/integration/test_cli.py pins the behaviour, so an Invoke release that changes
  these internals fails there first.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from invoke import Exit, Program, Task
from invoke.parser import Argument, Parser, ParserContext
from invoke.parser import parser as parser_module

from pipeline.base.errors import UsageError
from pipeline.tasks.options import whole_number

# One letter, one meaning, in every task. Options not listed have no short flag. `-h` is help
# everywhere; `-d`, `-e`, `-p`, `-w` and friends are left to Invoke's core flags.
SHORT_FLAGS: dict[str, str] = {
    "accel": "a",
    "boot_test": "b",
    "check": "c",
    "force": "f",
    "host": "H",
    "image": "i",
    "json": "j",
    "limit": "l",
    "dry_run": "n",
    "snapshot": "s",
    "timeout": "t",
}

# What the help shows as an option's value (Invoke would say STRING or INT).
METAVARS: dict[str, str] = {
    "accel": "ACCEL",
    "builder": "HOST",
    "check": "NAME",
    "host": "HOST",
    "image": "IMAGE",
    "instance": "NAME",
    "authorize_key": "KEY",
    "idle_stop": "MINUTES",
    "limit": "N",
    "name": "NAME",
    "network": "user|isolated",
    "on": "HOST",
    "port": "PORT",
    "quiet": "SECONDS",
    "share": "HOST_DIR[:TAG]",
    "user_data": "FILE",
    "on_calendar": "CALENDAR",
    "on_error": "MODE",
    "password": "PASSWORD",
    "remote": "HOST",
    "timeout": "SECONDS",
    "unit_dir": "DIR",
}

# Options that take a whole number (0 or more); the task receives an int.
NUMBERS = frozenset({"limit", "timeout", "quiet"})

HELP_TOKENS = ("-h", "--help")


def flag_name(name: str) -> str:
    """`dry_run` -> `--dry-run`."""
    return "--" + name.replace("_", "-")


class ImagepipeArgument(Argument):
    """An Argument that knows its placeholder, parses whole numbers, and (for a positional) may be
    left out: the task then says what is missing, with the usage and the valid values."""

    def __init__(self, *args: Any, metavar: str | None = None, number: bool = False,
                 may_omit: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metavar = metavar
        self.number = number
        self.may_omit = may_omit

    def set_value(self, value: Any, cast: bool = True) -> None:
        if self.number and cast and not isinstance(value, int):
            try:
                value = whole_number(value, flag_name(self.name or ""))
            except UsageError as exc:
                raise Exit(f"error: {exc.message}", code=2) from None
            cast = False
        super().set_value(value, cast=cast)


class ImagepipeTask(Task):
    """A Task whose options follow the project-wide tables above (see the module docstring)."""

    def __init__(self, body: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        kwargs["auto_shortflags"] = False
        super().__init__(body, *args, **kwargs)
        usage = usage_line(self)
        if usage:
            self.__doc__ = (self.__doc__ or "").rstrip() + f"\n\nUsage: {usage}"

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        letter = SHORT_FLAGS.get(name)
        if letter and letter not in taken_names:
            opts["names"] = [*opts["names"], letter]
        if name in NUMBERS:
            opts["kind"] = int
        return opts

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        kept = dict(self.help)  # Invoke pops each help entry as it uses it: the next call (docgen,
        try:                    # another in-process parse) must see the same help again
            plain = super().get_arguments(ignore_unknown_help=ignore_unknown_help)
        finally:
            self.help = kept
        return [self._ours(arg) for arg in plain]

    def _ours(self, arg: Argument) -> ImagepipeArgument:
        name = arg.name or ""
        ours = ImagepipeArgument(names=arg.names, kind=arg.kind, default=arg.default, help=arg.help,
                                 positional=arg.positional, optional=arg.optional,
                                 incrementable=arg.incrementable, attr_name=arg.attr_name,
                                 metavar=METAVARS.get(name, name.upper()), number=name in NUMBERS,
                                 may_omit=arg.positional)
        return ours


def task_name(task: Task) -> str:
    """The name people type (Invoke turns the function's underscores into dashes)."""
    return (task.name or task.body.__name__).replace("_", "-")


def usage_line(task: Task) -> str:
    """`invoke build IMAGE [--options]` for a task with positionals; "" otherwise."""
    positional = list(task.positional or [])
    if not positional:
        return ""
    name = task_name(task)
    params = inspect.signature(task.body).parameters
    optional = {p for p in positional if p in params and params[p].default is not inspect.Parameter.empty}
    words = [f"[{METAVARS.get(p, p.upper())}]" if p in optional else METAVARS.get(p, p.upper()) for p in positional]
    return f"invoke {name} {' '.join(words)} [--options]"


# ------------------------------------------------------------------------------- help


def help_spec(arg: ImagepipeArgument, names: Iterable[str], inverse: bool) -> str:
    """The flag column of the help for one of our arguments: `-t SECONDS, --timeout=SECONDS`."""
    parts = []
    for name in names:
        if not arg.takes_value:
            parts.append(f"--[no-]{name[2:]}" if inverse else name)
        elif len(name.strip("-")) == 1:
            parts.append(f"{name} {arg.metavar}")
        else:
            parts.append(f"{name}={arg.metavar}")
    return ", ".join(sorted(parts, key=len))


def print_task_help(name: str) -> None:
    """Invoke's own per-task help (as `invoke --help NAME` prints it), from inside a task."""
    from pipeline.tasks import collection  # noqa: PLC0415 (import circle: pipeline.tasks imports this module)

    coll = collection()
    program = Program(namespace=coll, binary="inv[oke]")
    program.collection = coll
    program.parser = Parser(contexts=coll.to_contexts())
    program.print_task_help(name)


# ------------------------------------------------------------------------------- parse errors


def suggestions(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The closest names to `word` (typos, a missing prefix such as `demo` for `build-demo`)."""
    pool = sorted(set(choices))
    close = difflib.get_close_matches(word, pool, n=n, cutoff=0.6)
    if len(close) < n and not word.startswith("-"):
        close += [c for c in pool if word and word in c and c not in close][: n - len(close)]
    return close


def unknown_word(token: str, context: Any, contexts: Iterable[str]) -> str:
    """The message for a word Invoke does not know: an option of the current task, or a task."""
    if token.startswith("-") and context is not None and getattr(context, "name", None):
        close = suggestions(token.split("=", 1)[0], context.flags.keys())
        where = f"'invoke {context.name}'"
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"error: {token!r} is not an option of {where}; {hint}"
                f"(invoke {context.name} --help lists them)")
    close = suggestions(token, contexts)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"error: no task called {token!r}.{hint} (invoke --list shows every task)"


def _missing_may_be_omitted(machine: Any) -> bool:
    ctx = machine.context
    missing = list(getattr(ctx, "missing_positional_args", []) or [])
    return bool(missing) and all(getattr(a, "may_omit", False) for a in missing)


def _friendly_error(original: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    def error(self: Any, msg: str) -> None:
        if "did not receive required positional arguments" in msg and _missing_may_be_omitted(self):
            return  # the task itself answers with the usage and the valid values (exit 2)
        if msg.startswith("No idea what "):
            token = msg[len("No idea what "):].rsplit(" is!", 1)[0]
            token = token[1:-1] if token[:1] in "'\"" else token
            raise Exit(unknown_word(token, self.context, self.contexts.keys()), code=2)
        if "needed value and was not given one" in msg and isinstance(self.flag, ImagepipeArgument):
            flag = self.flag
            raise Exit(f"error: {flag_name(flag.name or '')} needs a value ({flag.metavar})", code=2)
        original(self, msg)

    error.__wrapped__ = original  # type: ignore[attr-defined]
    return error


def _help_for(original: Callable[[Any, str], tuple[str, str]]) -> Callable[[Any, str], tuple[str, str]]:
    def help_for(self: Any, flag: str) -> tuple[str, str]:
        arg = self.flags.get(flag)
        if not isinstance(arg, ImagepipeArgument):
            return original(self, flag)
        inverse = any(n in self.inverse_flags.values() for n in self.names_for(flag))
        return help_spec(arg, self.names_for(flag), inverse), arg.help or ""

    help_for.__wrapped__ = original  # type: ignore[attr-defined]
    return help_for


def install() -> bool:
    """Wrap Invoke's parser error and help methods once (see the module docstring); False when
    this Invoke lacks them (its own messages are then shown unchanged)."""
    machine = getattr(parser_module, "ParseMachine", None)
    if machine is None or not callable(getattr(machine, "error", None)) \
            or not callable(getattr(ParserContext, "help_for", None)):
        return False
    if not hasattr(machine.error, "__wrapped__"):
        machine.error = _friendly_error(machine.error)
    if not hasattr(ParserContext.help_for, "__wrapped__"):
        ParserContext.help_for = _help_for(ParserContext.help_for)  # type: ignore[method-assign,assignment]
    return True


def installed() -> bool:
    """True when install() wrapped Invoke's parser in this process."""
    return hasattr(parser_module.ParseMachine.error, "__wrapped__") and hasattr(ParserContext.help_for, "__wrapped__")

