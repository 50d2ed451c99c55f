"""imagepipe's command line with a build held at one point, so that a test can kill it there or
change the world meanwhile (fill the disk) and let it go on:

    python -m tests.support.paused POINT [--resume FILE] -- INVOKE-ARGS...

POINT is where the build stops: `verify` (the engine is done, nothing verified yet), `publish`
(the build files are written in staging, nothing published) or `published` (published, not yet
recorded as finished). It says `paused at POINT (pid N)` on stderr, then waits until FILE
exists (or for an hour). The pause is put in from outside, by wrapping the build's own steps in
this process: imagepipe itself carries no hook for tests. Background(..., pause_at=...) runs it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.output import artifacts, history

POINTS = ("verify", "publish", "published")


def _wait(point: str, resume: str | None) -> None:
    print(f"imagepipe test: paused at {point} (pid {os.getpid()})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.1)


def _before(fn: Callable[..., Any], point: str, resume: str | None,
            when: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., Any]:
    """`fn`, pausing before its first call for which `when(args)` holds."""
    done = False

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        if not done and when(*args, **kwargs):
            done = True
            _wait(point, resume)
        return fn(*args, **kwargs)

    return paused


def hold(point: str, resume: str | None = None) -> None:
    """Make this process's next build pause at `point` (see the module docstring)."""
    if point == "verify":  # pipeline.build.produce: the engine's image, before it is verified
        artifacts.verify = _before(artifacts.verify, point, resume)  # type: ignore[method-assign]
    elif point == "publish":  # build files written in staging, before the publish
        artifacts.publish = _before(artifacts.publish, point, resume)  # type: ignore[method-assign]
    elif point == "published":  # published, before the history records it as finished
        history.History.finish = _before(  # type: ignore[method-assign]
            history.History.finish, point, resume, when=lambda _self, _build, status, **_kw: status == "ok")
    else:
        raise SystemExit(f"paused: POINT is one of {', '.join(POINTS)}, not {point!r}")


def main(argv: list[str]) -> None:
    point, rest = argv[0], argv[1:]
    resume = None
    if rest[:1] == ["--resume"]:
        resume, rest = rest[1], rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    hold(point, resume)
    from invoke.main import program

    program.run(["invoke", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
