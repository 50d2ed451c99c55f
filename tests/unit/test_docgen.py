"""pipeline.tasks.docgen: the layering drawn from imports, and the config page's defaults."""

from __future__ import annotations

from pathlib import Path

from pipeline.tasks import docgen


def test_layers_put_each_part_above_what_it_imports() -> None:
    layer, circles = docgen._layers({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": set()})
    assert layer == {"a": 2, "b": 1, "c": 0, "d": 0}
    assert circles == []


def test_a_circle_is_named_and_shares_one_layer() -> None:
    layer, circles = docgen._layers({"top": {"x"}, "x": {"y"}, "y": {"x", "base"}, "base": set()})
    assert circles == [["x", "y"]]
    assert layer["x"] == layer["y"] == 1 and layer["top"] == 2 and layer["base"] == 0


def test_imports_in_functions_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Top."""\n')
    (pkg / "low.py").write_text('"""Low. More."""\n')
    (pkg / "sub" / "__init__.py").write_text('"""A subpackage."""\n')
    (pkg / "sub" / "mod.py").write_text(
        '"""Uses low."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import high\n'
        "def f():\n    from ..low import x\n")
    (pkg / "high.py").write_text('"""High."""\nimport pipeline.sub.mod\n')
    edges = docgen._imports(docgen._package(tmp_path))
    assert edges["pipeline.sub"] == {"pipeline.low"}
    assert edges["pipeline.high"] == {"pipeline.sub"}
    assert docgen._first_line(pkg / "low.py") == "Low."


def test_config_defaults_come_from_the_model_and_the_distros() -> None:
    page = docgen.config_section("images")(Path("."))
    row = next(r for r in page.splitlines() if r.startswith("| `firmware` |"))
    assert "`uefi`; demo: `bios`" in row  # the model's default, then the demo profile's own
    assert "| `distro` |" in page and "required" in page.split("| `distro` |")[1].split("\n")[0]


def test_the_task_reference_lists_options_short_flags_and_aliases_under_their_task() -> None:
    from tests.support import ROOT

    page = docgen.tasks(ROOT)
    build = page.split("### build\n", 1)[1].split("\n### ", 1)[0]
    assert "`invoke build IMAGE [--options]`" in build
    assert "| `--dry-run` | `-n` | print what the build would do" in build
    assert "| `build-demo` | `build demo-x86_64` |" in build  # an alias, under the task it runs
    assert "\n### build-demo\n" not in page
    flags = docgen.short_flags(ROOT)
    assert "| `-a ACCEL` | `--accel` |" in flags and "`-h`" not in flags


def test_a_second_parse_of_a_task_keeps_its_help() -> None:
    """Invoke pops each help entry while it makes a task's arguments: the reference, made after an
    in-process parse of the same collection, must still carry the help."""
    from pipeline.tasks import collection

    build = collection().tasks["build"]
    first = {a.name: a.help for a in build.get_arguments()}
    second = {a.name: a.help for a in build.get_arguments()}
    assert first["dry_run"] and second == first
