"""Unexpected exceptions (bugs): one line for the user, the full trace kept in a file.

`unexpected(exc, output_dir, where)` writes the trace to <output>/.logs/ (or a per-user temp
folder when there is no output folder yet), prints it too when debugging (Invoke's --debug or
IMAGEPIPE_DEBUG=1), and returns the InternalError whose one line names the file.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.base.errors import InternalError
from pipeline.base.text import visible

DEBUG_ENV = "IMAGEPIPE_DEBUG"
TRACE_DIR = ".logs"  # under the output folder: traces of unexpected errors


def debugging() -> bool:
    """--debug (Invoke's own flag: it turns on debug logging) or IMAGEPIPE_DEBUG=1."""
    return (os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
            or logging.getLogger().isEnabledFor(logging.DEBUG))


def unexpected(exc: BaseException, output_dir: Path | None, where: str) -> InternalError:
    """An exception nobody expected: its trace goes to a file (and to stderr when debugging);
    the returned error is the one line to show."""
    trace = "".join(traceback.format_exception(exc))
    if debugging():
        print(trace, file=sys.stderr, end="", flush=True)
    kept = keep_trace(trace, output_dir, where)
    saved = f"the full trace is in {kept}" if kept else "the trace could not be saved"
    return InternalError(f"internal error in {where}: {visible(type(exc).__name__)}: "
                         f"{visible(str(exc))[:300]} ({saved})",
                         f"run again with --debug (or {DEBUG_ENV}=1) to print it; please report it")


def keep_trace(trace: str, output_dir: Path | None, where: str) -> Path | None:
    """Write `trace` to <output>/.logs/ (else a per-user temp folder); the file, or None."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{stamp}-{os.getpid()}-{where.replace('_', '-')}.trace"
    folders = [output_dir / TRACE_DIR] if output_dir else []
    folders.append(Path(tempfile.gettempdir()) / f"imagepipe-{os.getuid()}")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(folder)  # a shared temp folder: only a real folder of our own will do
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            path = folder / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(trace)
            return path
        except OSError:
            continue
    return None
