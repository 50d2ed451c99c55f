"""No traceback reaches a user: `guard` turns what a task raises into one line and an exit code.

ImagepipeError becomes its message, hint and exit code; Ctrl-C exit 130; a disk error one line
naming the path and the free space; a reader that went away (`| head`) nothing; anything
unexpected (a bug) one line saying where the full trace was kept (output/.logs/, printed as well
with --debug or IMAGEPIPE_DEBUG=1), exit 70. `excepthook` does the same for what escapes Invoke
itself, outside any task.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Exit

from pipeline.base.errors import ImagepipeError
from pipeline.base.text import visible_lines
from pipeline.config import from_invoke


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
    from pipeline.base.crash import unexpected  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.base.fsutil import is_storage_error, storage_error  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

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


def flush_stdout() -> None:
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
        from pipeline.base.fsutil import STORAGE_ERRNOS  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        why = STORAGE_ERRNOS.get(exc.errno or 0, exc.strerror or str(exc))
        print(f"error: writing the output failed: {why}", file=sys.stderr, flush=True)
    _quiet_stdout()
    return isinstance(exc, BrokenPipeError)


def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """sys.excepthook: one line and a trace file instead of a traceback (exit status stays 1)."""
    from pipeline.base.crash import unexpected  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.filename is None and exc.errno in (
            errno.ENOSPC, errno.EDQUOT, errno.EIO)):  # Invoke printing --list or --help to `| head`, a full disk
        _output_lost(exc)
        return
    print(f"error: {unexpected(exc.with_traceback(tb), None, 'invoke').render()}", file=sys.stderr, flush=True)
