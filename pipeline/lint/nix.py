"""`invoke lint`'s nix check: every .nix file parses; the project flake is evaluated for real
(each configuration's toplevel and each package's drvPath) when its lock's inputs can be had."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.base.run import run, which
from pipeline.drivers.nixcli import clean, nix_argv, nix_error

SKIP_DIRS = {".git", "output", "node_modules", ".venv", "result"}
NETWORK_ERRORS = ("unable to download", "resolve host", "Network is unreachable", "cannot connect")


def nix_files(root: Path) -> list[Path]:
    """Every .nix file of the project (not under .git, output/ or virtualenvs, which are pruned)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        found += [Path(folder) / n for n in names if n.endswith(".nix")]
    return sorted(found)


def parse_problem(path: Path, root: Path) -> str | None:
    """`nix-instantiate --parse` of one file: None if it parses, else `file: error`."""
    r = run(["nix-instantiate", "--parse", str(path)], check=False, timeout=60)
    if r.ok:
        return None
    lines = [clean(line) for line in r.stderr.strip().splitlines() if line.strip()]
    return f"{path.relative_to(root)}: {' / '.join(lines[:3])}"


# Forcing each system's and each image's drvPath evaluates every module, option type and
# assertion, and every make-disk-image argument, without building (as `nix flake check --no-build`).
EVAL_APPLY = {
    "nixosConfigurations": "cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.drvPath) cs",
    "packages": "ss: builtins.mapAttrs (s: ps: builtins.mapAttrs (n: p: p.drvPath) ps) ss",
}


def flake_eval_problems(directory: Path, root: Path, on_unchecked: Callable[[str], None],
                        on_note: Callable[[str], None]) -> list[str]:
    """Evaluate the flake for real: every configuration's toplevel and every package's drvPath.

    It needs the inputs flake.lock pins (fetched from the network the first time, or already in
    the store). When they cannot be had, the check is reported through `on_unchecked` (the lint
    then does not say "clean"); an evaluation error is a problem. A flake without a lock is
    evaluated against whatever its inputs resolve to now, and a note says to commit a lock.
    """
    rel = directory.relative_to(root) if directory.is_relative_to(root) else directory
    locked = (directory / "flake.lock").is_file()
    errors: dict[str, list[str]] = {}  # nix's error -> the outputs that hit it (often the same one)
    for output, apply in EVAL_APPLY.items():
        argv = nix_argv("eval", "--json", "--no-write-lock-file", f"{directory}#{output}", "--apply", apply)
        r = run(argv, check=False, timeout=900)
        text = clean(r.stderr)
        if not r.ok and "does not provide attribute" in text:
            continue  # the flake has no such output: nothing to evaluate
        if not r.ok and any(marker in text for marker in NETWORK_ERRORS):
            why = ("it has no flake.lock and its inputs cannot be fetched (no network): run invoke update-flake "
                   "on a machine with network access and commit the lock") if not locked else (
                  "the inputs its flake.lock pins are not in the local store and cannot be fetched (no network)")
            on_unchecked(f"nix evaluation of {rel}: {why}")
            return []
        if not r.ok:  # the cause and where it is; each output's trace to it differs on newer nix
            errors.setdefault(nix_error(r.stderr), []).append(output)
        elif not locked and "lock file" in text:
            on_note(f"{rel} was evaluated against unpinned inputs (no flake.lock): run invoke update-flake and commit it")
    return [f"{rel}: {' and '.join(outputs)} do{'es' if len(outputs) == 1 else ''} not evaluate: {error}"
            for error, outputs in errors.items()]


def lint_problems(root: Path, on_note: Callable[[str], None] | None = None,
                  on_unchecked: Callable[[str], None] | None = None) -> list[str]:
    """Lint check for `invoke lint`: every .nix file parses; nixos/ evaluates for real when its
    lock's inputs can be had.

    Returns problems (empty: none found). A check that could not run is not a problem, but it
    is not a pass either: it is reported through `on_unchecked` (`on_note` is kept for callers
    that only take notes).
    """
    which("nix-instantiate")
    note = on_note or (lambda _msg: None)
    unchecked = on_unchecked or note
    problems = [p for p in (parse_problem(f, root) for f in nix_files(root)) if p]
    flake = root / "nixos"
    if (flake / "flake.nix").is_file() and not problems:
        which("nix")
        problems += flake_eval_problems(flake, root, unchecked, note)
    return problems
