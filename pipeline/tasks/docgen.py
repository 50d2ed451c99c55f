"""The generated parts of docs/, drawn from the code: `invoke docs` writes them, `invoke docs
--check` (and tests/test_docs.py) reports a page whose generated part is out of date.

A page is hand-written prose with generated blocks between two marker lines:

    <!-- generated: NAME (invoke docs) -->
    ...
    <!-- end: NAME -->

Each NAME has one generator below: `short-flags` and `tasks` (docs/tasks.md) from the Invoke
collection itself, `config-*` (docs/configuration.md) from the key specs in pipeline.config,
and `layers` and `modules` (docs/architecture.md) from the package's source and its imports.
Prose outside the markers is never touched, so pages stay easy to extend by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from invoke import Task
from markdown.extensions.toc import slugify

from pipeline import config, distros, model
from pipeline.base.errors import UsageError
from pipeline.tasks import collection
from pipeline.tasks.cli import METAVARS, SHORT_FLAGS, flag_name, task_name, usage_line

MARKER = re.compile(r"(?ms)^<!-- generated: (?P<name>[a-z-]+) \(invoke docs\) -->\n(?P<body>.*?)"
                    r"^<!-- end: (?P=name) -->$")


# ---------------------------------------------------------------------------------------------
# Pages and blocks

def pages(root: Path) -> dict[Path, str]:
    """Every page that holds generated blocks, with those blocks as the code gives them now."""
    out = {}
    for page, names in PAGES.items():
        path = root / "docs" / page
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"docs/{page} is missing", "restore it from git: it holds prose around "
                             "generated blocks") from None
        found = {m.group("name") for m in MARKER.finditer(text)}
        missing = [n for n in names if n not in found]
        if missing:
            raise UsageError(f"docs/{page} has no generated block {', '.join(missing)}",
                             f"put '<!-- generated: NAME (invoke docs) -->' and '<!-- end: NAME -->' "
                             f"lines where it belongs (NAME: {', '.join(missing)})")
        out[path] = MARKER.sub(lambda m: _block(m.group("name"), root), text)
    return out


def _block(name: str, root: Path) -> str:
    body = BLOCKS[name](root).strip("\n")
    return f"<!-- generated: {name} (invoke docs) -->\n{body}\n<!-- end: {name} -->"


# ---------------------------------------------------------------------------------------------
# docs/tasks.md: the Invoke collection

# Task modules in the order the page shows them, with a title; a module not listed comes last,
# titled by its name.
TASK_SECTIONS = {
    "build": "Building", "render": "Rendered files and pins", "lint": "Lint", "doctor": "Doctor",
    "vm": "Running", "remote": "Remote builders", "history": "History, rebuilds and retention",
    "schedule": "Schedules", "contents": "What is inside", "docs": "Documentation",
    "lima": "Lima (macOS)",
}


def short_flags(_root: Path) -> str:
    """The project-wide short-flag table (pipeline.tasks.cli.SHORT_FLAGS), two flags a row."""
    cells = [(f"`-{letter}" + (f" {METAVARS[name]}`" if name in METAVARS else "`"), f"`{flag_name(name)}`")
             for name, letter in sorted(SHORT_FLAGS.items(), key=lambda kv: (kv[1].lower(), kv[1]))]
    half = (len(cells) + 1) // 2
    rows = ["| flag | option | | flag | option |", "|---|---|---|---|---|"]
    for i in range(half):
        right = cells[half + i] if half + i < len(cells) else ("", "")
        rows.append(f"| {cells[i][0]} | {cells[i][1]} | | {right[0]} | {right[1]} |")
    return "\n".join(rows)


def tasks(root: Path) -> str:
    """Every task of `pipeline.tasks.collection()`, by module: usage, docstring, options, aliases."""
    everything: dict[str, Task] = dict(collection().tasks)
    aliases: dict[str, list[Task]] = {}
    groups: dict[str, list[Task]] = {}
    for name in sorted(everything):
        made = everything[name]
        target = getattr(made, "alias_of", None)
        if target is not None:
            aliases.setdefault(target[0], []).append(made)
        else:
            groups.setdefault(made.body.__module__.rsplit(".", 1)[-1], []).append(made)
    order = [m for m in TASK_SECTIONS if m in groups] + sorted(m for m in groups if m not in TASK_SECTIONS)
    out = []
    for module in order:
        out.append(f"## {TASK_SECTIONS.get(module, module.capitalize())}\n")
        for made in groups[module]:
            out.append(_task(made, aliases.get(made.name or "", []), root))
    return "\n".join(out)


def _task(made: Any, aliases: list[Any], root: Path) -> str:
    name = task_name(made)
    first, rest = _docstring(made)
    arguments = made.get_arguments()
    usage = usage_line(made) or (f"invoke {name} [--options]" if arguments else f"invoke {name}")
    out = [f"### {name}\n", first + "\n", f"`{usage}`\n"]
    if rest:
        out.append(_linked(rest, root) + "\n")
    options = _options(arguments)
    if options:
        out.append(options + "\n")
    if aliases:
        out.append(f"Per image of invoke.yaml, `{name}` with the image given (named by the rule in "
                   f"pipeline/tasks/aliases.py):\n")
        out.append("| alias | runs | what it does |\n|---|---|---|")
        for alias in aliases:
            _target, bound = alias.alias_of
            given = " ".join(str(v) for v in bound.values())
            names = ", ".join(f"`{n}`" for n in (task_name(alias), *alias.aliases))
            out.append(f"| {names} | `{name} {given}` | {_cell(_docstring(alias)[0])} |")
        out.append("")
    return "\n".join(out)


def _docstring(made: Any) -> tuple[str, str]:
    """The first line and the rest of a task's docstring, without the `Usage:` line the task
    class appends (the page shows its own)."""
    doc = re.sub(r"\n\nUsage: [^\n]*\s*$", "", (made.__doc__ or "").strip())
    first, _, rest = doc.partition("\n")
    return first.strip(), _dedent(rest)


def _dedent(text: str) -> str:
    lines = text.strip("\n").split("\n")
    indent = min((len(x) - len(x.lstrip()) for x in lines if x.strip()), default=0)
    return "\n".join(x[indent:] for x in lines).strip()


def _linked(text: str, root: Path) -> str:
    """`docs/PAGE.md` and `docs/PAGE.md#anchor` in a docstring become links named by the page's
    title or the heading the anchor points at (`invoke --help` shows the plain path)."""

    def link(m: re.Match[str]) -> str:
        page, anchor = m.group(1), m.group(2) or ""
        return f"[{_heading(root / 'docs' / page, anchor.lstrip('#'))}]({page}{anchor})"

    return re.sub(r"docs/([a-z-]+\.md)(#[a-z0-9-]+)?", link, text)


def _heading(page: Path, anchor: str) -> str:
    """The text of the page's heading whose id is `anchor` (its title when `anchor` is empty)."""
    try:
        headings = re.findall(r"(?m)^(#+)\s+(.+)$", page.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"a task's docstring names docs/{page.name}, which does not exist") from None
    for level, text in headings:
        if (not anchor and level == "#") or (anchor and slugify(text.replace("`", ""), "-") == anchor):
            return text.replace("`", "")
    raise UsageError(f"a task's docstring names docs/{page.name}#{anchor}: no such heading there")


def _options(arguments: list[Any]) -> str:
    rows = []
    args = sorted(arguments, key=lambda a: (not a.positional, a.name or ""))
    for arg in args:
        long = arg.names[0]
        short = next((n for n in arg.names if len(n) == 1), "")
        if arg.positional:
            shown = f"`{arg.metavar}`"
        elif arg.kind is bool:
            shown = f"`--{long}`"
        else:
            shown = f"`--{long} {arg.metavar}`"
        text = arg.help or ""
        if arg.kind is list and "repeat" not in text:
            text += " (repeatable)"
        if (not arg.positional and arg.kind in (str, int) and arg.default not in (None, "")
                and "default" not in text):
            text += f" (default: `{arg.default}`)"
        rows.append(f"| {shown} | {f'`-{short}`' if short else ''} | {_cell(text)} |")
    if not rows:
        return ""
    return "| option | short | what it does |\n|---|---|---|\n" + "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# docs/configuration.md: the key specs

def config_section(section: str) -> Callable[[Path], str]:
    def generate(_root: Path) -> str:
        spec, record = {
            "defaults": (config.DEFAULTS_SPEC, model.Defaults),
            "images": (config.IMAGE_SPEC, model.Image),
            "users": (config.USER_SPEC, model.User),
            "builders": (config.BUILDER_SPEC, model.Builder),
        }[section]
        per_distro: dict[str, dict[str, Any]] = {}
        if section == "images":
            for name in distros.names():
                for key, value in distros.get(name).image_defaults.items():
                    per_distro.setdefault(key, {})[name] = value
        rows = ["| key | accepts | default | meaning |", "|---|---|---|---|"]
        for key, entry in spec.items():
            default = entry.default if entry.default is not None else _model_default(record, key)
            if key in per_distro:
                default += "; " + ", ".join(f"{d}: {_value(v)}" for d, v in sorted(per_distro[key].items()))
            rows.append(f"| `{key}` | {_cell(entry.accepts_text())} | {_cell(default)} | {_cell(entry.doc)} |")
        return "\n".join(rows)

    return generate


def _model_default(record: type, key: str) -> str:
    for f in dataclasses.fields(record):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return "—" if f.default in (None, ()) else _value(f.default)
            return "required"
    return "—"


def _value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, tuple):
        return "`[" + ", ".join(_value(v).strip("`") for v in value) + "]`"
    return f"`{value}`"


# ---------------------------------------------------------------------------------------------
# docs/architecture.md: the package, read from its source (nothing is imported)

def _package(root: Path) -> dict[str, Path]:
    """Every module of pipeline/ by dotted name; a package by its own name (its __init__.py, or
    its folder when it has none: a namespace package such as render/)."""
    base = root / "pipeline"
    out: dict[str, Path] = {}
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            out[".".join(parts[:-1])] = path
            continue
        out[".".join(parts)] = path
        package = ".".join(parts[:-1])
        out.setdefault(package, path.parent)
    return dict(sorted(out.items()))


def _first_line(path: Path) -> str:
    """The first sentence of a module's docstring (a folder without __init__.py has none)."""
    if path.is_dir():
        return ""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    para = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = re.split(r"(?<=\.)\s+(?=[A-Z`(])", para, maxsplit=1)[0]
    return first.rstrip(":") or "(no docstring)"


def _part(module: str) -> str:
    """What the layering is drawn between: a subpackage of pipeline/ or a top-level module."""
    return ".".join(module.split(".")[:2])


def _imports(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """part → the other parts it imports (at module level or in a function; not the imports
    under `if TYPE_CHECKING:`, which never run)."""
    edges: dict[str, set[str]] = {_part(m): set() for m in modules}
    for module, path in modules.items():
        if path.is_dir():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for target in _targets(node, package):
                hit = next((t for t in (target, target.rsplit(".", 1)[0]) if t in modules), None)
                if hit and _part(hit) != _part(module):
                    edges[_part(module)].add(_part(hit))
    return edges


def _targets(node: ast.AST, package: str) -> Iterable[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(up + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def _layers(edges: Mapping[str, set[str]]) -> tuple[dict[str, int], list[list[str]]]:
    """Each part's layer (1 + the highest layer it imports; 0 for what imports nothing of ours)
    and the import circles found (parts that reach each other), which share a layer."""
    reach: dict[str, set[str]] = {}

    def reachable(start: str) -> set[str]:
        if start not in reach:
            seen, todo = set(), [start]
            while todo:
                for nxt in edges.get(todo.pop(), ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            reach[start] = seen
        return reach[start]

    circles = sorted({tuple(sorted({p} | {q for q in reachable(p) if p in reachable(q)}))
                      for p in edges if p in reachable(p)})
    group = {p: c for c in circles for p in c}
    layer: dict[str, int] = {}

    def depth(part: str) -> int:
        if part not in layer:
            members = group.get(part, (part,))
            for m in members:
                layer[m] = 0  # a circle is one layer: break the recursion
            below = {q for m in members for q in edges[m]} - set(members)
            value = 1 + max((depth(q) for q in below), default=-1)
            for m in members:
                layer[m] = value
        return layer[part]

    for p in edges:
        depth(p)
    return layer, [list(c) for c in circles]


def layering(root: Path) -> tuple[dict[str, set[str]], dict[str, int], list[list[str]]]:
    """The package's parts (`pipeline.base`, `pipeline.build`, ...): what each imports, its
    layer, and the import circles (tests/unit/test_layers.py holds the layout to them)."""
    edges = _imports(_package(root))
    layer, circles = _layers(edges)
    return edges, layer, circles


def layers(root: Path) -> str:
    found = _package(root)
    packages = _packages(found)
    _edges, layer, circles = layering(root)
    files = [m for m in found if m not in packages]
    top = [m for m in files if m.count(".") == 1]
    rows = ["| layer | parts (each imports only parts of lower layers) |", "|---|---|"]
    for level in sorted(set(layer.values()), reverse=True):
        names = sorted(_shown(p, packages) for p, v in layer.items() if v == level and p != "pipeline")
        rows.append(f"| {level} | {', '.join(names)} |")
    where = (f"import circles: {'; '.join(' ↔ '.join(_shown(p, packages) for p in c) for c in circles)}"
             if circles else "no import circles")
    summary = (f"{len(files)} modules: {len(top)} at the top level of `pipeline/`, "
               f"{len(packages) - 1} subpackages; {where}.")
    return summary + "\n\n" + "\n".join(rows)


def _packages(found: Mapping[str, Path]) -> set[str]:
    return {m for m, path in found.items() if path.name == "__init__.py" or path.is_dir()}


def _shown(part: str, packages: set[str]) -> str:
    name = part.split(".", 1)[-1]
    return f"`{name}/`" if part in packages else f"`{name}`"


def modules(root: Path) -> str:
    found = _package(root)
    packages = _packages(found)
    out: list[str] = []
    for package in sorted(packages):
        rel = package.replace(".", "/")
        inside = [m for m in found if m.rsplit(".", 1)[0] == package and m not in packages]
        intro = _first_line(found[package])
        out += ["", f"### `{rel}/`\n", *([intro + "\n"] if intro else []), "| module | what it is |", "|---|---|"]
        out += [f"| `{m.rsplit('.', 1)[-1]}.py` | {_cell(_first_line(found[m]))} |" for m in inside]
    return "\n".join(out).strip("\n")


BLOCKS: dict[str, Callable[[Path], str]] = {
    "short-flags": short_flags,
    "tasks": tasks,
    "config-defaults": config_section("defaults"),
    "config-images": config_section("images"),
    "config-users": config_section("users"),
    "config-builders": config_section("builders"),
    "layers": layers,
    "modules": modules,
}
PAGES: dict[str, list[str]] = {
    "tasks.md": ["short-flags", "tasks"],
    "configuration.md": ["config-defaults", "config-images", "config-users", "config-builders"],
    "architecture.md": ["layers", "modules"],
}
