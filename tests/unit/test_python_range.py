"""The supported Python range is declared once and held together: requires-python, the
classifiers, ruff's and mypy's target, and the lanes that run the suite on the range's ends."""

from __future__ import annotations

import re
import sys
import tomllib

from tests.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NEWEST_TESTED = (3, 14)  # Debian's development suite (tests/lanes/current)


def lowest() -> tuple[int, int]:
    m = re.fullmatch(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert m, "requires-python is a lower bound only (no upper cap: a cap breaks resolvers)"
    return (3, int(m.group(1)))


def test_classifiers_name_every_minor_version_from_the_lowest_to_the_newest_tested():
    listed = {tuple(map(int, c.rsplit(":: ", 1)[1].split("."))) for c in PYPROJECT["project"]["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert listed == {(3, minor) for minor in range(lowest()[1], NEWEST_TESTED[1] + 1)}


def test_the_static_checks_target_the_lowest_version():
    low = lowest()
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{low[1]}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{low[1]}"


def test_this_python_is_in_the_declared_range():
    """Run on each lane's Python (3.11, 3.13, 3.14): a newer one fails here until it has been
    tested and added to the classifiers."""
    here = sys.version_info[:2]
    assert lowest() <= here, f"Python {sys.version.split()[0]} is older than requires-python"
    assert here <= NEWEST_TESTED, (f"Python {sys.version.split()[0]} is newer than the newest tested "
                                   f"({NEWEST_TESTED[0]}.{NEWEST_TESTED[1]}): run the suite on it, then add its classifier")
