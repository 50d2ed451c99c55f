"""Documentation task: `invoke docs` writes the generated parts of docs/ (pipeline.tasks.docgen)."""

from __future__ import annotations

from invoke import Context

from pipeline.base.errors import VerifyFailed
from pipeline.tasks.common import load_config, say, task


@task(help={"check": "write nothing: list the pages whose generated part is out of date (exit 1 if any)"})
def docs(c: Context, check: bool = False) -> None:
    """Regenerate the reference parts of docs/ (tasks, configuration keys, module map) from the code.

    Prose outside the `<!-- generated: ... -->` markers is left alone. `--check` is what the
    test suite does: it fails when a page no longer matches the code it documents.
    """
    from pipeline.committed import drift, write_all  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.tasks.docgen import pages  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    root = load_config(c).root
    generated = pages(root)
    if check:
        stale = drift(generated)
        if stale:
            raise VerifyFailed("out of date: " + ", ".join(str(p.relative_to(root)) for p in stale),
                              "run `invoke docs` and commit what it writes")
        say(f"all {len(generated)} generated pages up to date")
        return
    written = write_all(generated)
    for path in written:
        say(f"wrote {path.relative_to(root)}")
    say(f"{len(written)} of {len(generated)} generated pages changed" if written
        else f"all {len(generated)} generated pages up to date")
