"""`invoke lint`'s nix check: every .nix file parses; the project flake evaluates where it can."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.drivers.nix import nix_argv
from pipeline.drivers.nixlog import clean
from pipeline.run import run, which

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


def flake_show_problem(directory: Path, root: Path, on_note: Callable[[str], None]) -> str | None:
    """`nix flake show` offline: a problem if the flake does not evaluate, a note if only the
    network (an unfetched or unlocked input such as nixpkgs) stands in the way."""
    argv = nix_argv("flake", "show", "--offline", "--no-write-lock-file", str(directory))
    r = run(argv, check=False, timeout=300)
    rel = directory.relative_to(root) if directory.is_relative_to(root) else directory
    if r.ok:
        return None
    text = clean(r.stderr)
    if any(marker in text for marker in NETWORK_ERRORS):
        why = "no flake.lock yet" if not (directory / "flake.lock").exists() else "inputs not in the local store"
        on_note(f"{rel}: nix flake show needs the network here ({why}); "
                f"run `nix flake lock` in {rel} on a machine with network access and commit flake.lock")
        return None
    return f"{rel}: nix flake show failed: {' / '.join(text.splitlines()[-3:])}"


def lint_problems(root: Path, on_note: Callable[[str], None] | None = None) -> list[str]:
    """Lint check for `invoke lint`: every .nix file parses; nixos/ evaluates where it can offline.

    Returns problems (empty: clean). Checks that cannot run here for lack of network are not
    problems: they are reported through `on_note`.
    """
    which("nix-instantiate")
    note = on_note or (lambda _msg: None)
    problems = [p for p in (parse_problem(f, root) for f in nix_files(root)) if p]
    flake = root / "nixos"
    if (flake / "flake.nix").is_file() and not problems:
        which("nix")
        problem = flake_show_problem(flake, root, note)
        if problem:
            problems.append(problem)
    return problems
