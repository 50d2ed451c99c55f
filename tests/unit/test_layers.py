"""The package's folders are its layers (read from the source by pipeline.tasks.docgen, the way
`invoke docs` draws docs/architecture.md): no import circle, base/ on the ground, render/ a leaf
that asks no profile, a top level that stays small, and a first docstring line on every module
(the architecture page's map is drawn from it)."""

from __future__ import annotations

import ast
import functools

from pipeline.tasks.docgen import layering
from tests.support import ROOT

# A new module goes into the subpackage of its layer; the top level holds the commands and the
# few modules that sit between layers (config, plan, host, ...). Raise this only with a reason.
TOP_LEVEL_MODULES = 23


@functools.cache
def _graph() -> tuple[dict[str, set[str]], dict[str, int], list[list[str]]]:
    return layering(ROOT)


def test_no_import_circle() -> None:
    _edges, _layer, circles = _graph()
    assert circles == []


def test_base_imports_nothing_above_it() -> None:
    edges, _layer, _circles = _graph()
    assert edges["pipeline.base"] == set()


def test_render_asks_no_profile_and_drives_nothing() -> None:
    edges, _layer, _circles = _graph()
    above = {f"pipeline.{p}" for p in ("distros", "drivers", "committed", "build", "tasks", "vm", "builders", "output")}
    assert edges["pipeline.render"] & above == set()


def test_the_top_level_stays_small() -> None:
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_MODULES, top


def test_every_module_says_its_role_first() -> None:
    missing = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc or not doc.splitlines()[0].strip():
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
