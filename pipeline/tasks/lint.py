"""Checks of the generated files: `invoke lint` and `invoke fmt`."""

from __future__ import annotations

from pathlib import Path

from invoke import Context

from pipeline.base.errors import ImagepipeError, UsageError
from pipeline.tasks.common import load_config, say, task


@task(help={"check": "run only this check (repeatable); default: all"}, iterable=["check"])
def lint(c: Context, check: list[str] | None = None) -> None:
    """Validate generated files: drift, hcl2, packer validate/fmt, kickstart, nix (lists every failure).

    The checks: drift against `invoke render`, the hcl2 parse, QEMU argument names, kickstarts
    with pykickstart (RHEL10), `packer validate`, `packer fmt`, nix's parse and a real
    evaluation (every configuration's toplevel and every package's drvPath, when the inputs of
    nixos/flake.lock can be had). A check that could not run is listed as `not checked: ...`,
    and then lint never says "clean".
    """
    import tempfile  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    from pipeline.committed import rendered_files  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.lint import checks  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    unknown = [n for n in (check or []) if n not in checks.CHECKS]
    if unknown:
        raise UsageError(f"unknown check {', '.join(unknown)}", "checks: " + ", ".join(checks.CHECKS))
    with tempfile.TemporaryDirectory(prefix="imagepipe-lint-") as tmp:
        ctx = checks.LintContext(cfg, rendered_files(cfg), Path(tmp))
        problems = checks.run_checks(ctx, check or None)
    for note in ctx.notes:
        say(f"note: {note}")
    ran = ", ".join(n for n in checks.CHECKS if not check or n in check)
    for what in ctx.unchecked:
        say(f"not checked: {what}")
    if problems:
        raise ImagepipeError(f"lint: {len(problems)} problem(s) ({ran}):\n" + "\n".join(f"  {p}" for p in problems))
    if ctx.unchecked:  # something could not run: never call that clean
        say(f"lint: no problems in what ran ({ran}; {len(ctx.files)} generated files), "
            f"but {len(ctx.unchecked)} check(s) could not run (above)")
        return
    say(f"lint: clean ({ran}; {len(ctx.files)} generated files)")


@task(help={"check": "only report files that are not formatted (exit 1), change nothing"})
def fmt(c: Context, check: bool = False) -> None:
    """Format the templates under packer/ with `packer fmt`."""
    from pipeline.base.run import run  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    files = sorted((cfg.root / "packer").rglob("*.pkr.hcl"))
    bad = []
    for path in files:
        argv = ["packer", "fmt", "-check", str(path)] if check else ["packer", "fmt", str(path)]
        res = run(argv, check=check is False, timeout=120)
        if check and not res.ok:
            bad.append(path)
        elif not check and res.stdout.strip():
            say(f"formatted {path.relative_to(cfg.root)}")
    if bad:
        listed = "\n".join(f"  {p.relative_to(cfg.root)}" for p in bad)
        raise ImagepipeError("not packer fmt clean:\n" + listed, "run: invoke fmt")
    say(f"{len(files)} template(s) {'checked' if check else 'formatted'}")
