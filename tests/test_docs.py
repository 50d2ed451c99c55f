"""The documentation: README.md stays a page, every link in it (and in CHANGELOG.md) resolves,
every page under docs/ is reachable from README, the generated parts of docs/ match the code
(`invoke docs --check`, as rendered files are checked for drift), and the site builds with
`mkdocs build --strict` (broken links, missing anchors and pages left out of mkdocs.yml's nav
all fail it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.base.errors import UsageError
from pipeline.tasks import docgen
from tests.support import ROOT, invoke

README_LIMIT = 10 * 1024
# [text](target) outside code: the target up to the first space or ')'
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (a link inside code is no link)."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """The heading ids mkdocs gives a page (the toc extension's slugify, as mkdocs.yml uses it)."""
    from markdown.extensions.toc import slugify

    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"(?m)^#+\s+(.+)$", _prose(page.read_text()))}


def _local_links(doc: Path) -> list[tuple[Path, str]]:
    links = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        links.append(((doc.parent / path).resolve(), anchor))
    return links


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md"])
def test_links_outside_the_site_resolve(name: str) -> None:
    """README.md and CHANGELOG.md are outside mkdocs' docs_dir: their links are checked here."""
    broken = []
    for path, anchor in _local_links(ROOT / name):
        if not path.exists():
            broken.append(f"{path.relative_to(ROOT)} (missing)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{path.relative_to(ROOT)}#{anchor} (no such heading)")
    assert not broken, f"{name} links to: " + ", ".join(broken)


def test_readme_is_one_page_and_reaches_every_topic() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/"
    linked = {path for path, _ in _local_links(ROOT / "README.md")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}
    assert pages - linked == set(), f"pages README does not link: {sorted(p.name for p in pages - linked)}"
    assert (ROOT / "CHANGELOG.md").resolve() in linked


def test_site_builds_strictly(tmp_path: Path) -> None:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs or mkdocs-material is missing: pip install -e '.[docs]' (the test extra has it)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stderr[-4000:]}"
    assert (tmp_path / "site" / "index.html").exists()


def test_generated_pages_match_the_code() -> None:
    res = invoke(["docs", "--check"])
    assert res.returncode == 0, f"{res.stderr}\n(run `invoke docs` and commit what it writes)"
    assert "generated pages up to date" in res.stderr


def _docs_copy(tmp_path: Path) -> Path:
    """A project whose docs/ can be changed: a copy of docs/, the real pipeline/ beside it."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "pipeline").symlink_to(ROOT / "pipeline")
    return tmp_path


def test_a_stale_block_is_drift_and_prose_is_kept(tmp_path: Path) -> None:
    root = _docs_copy(tmp_path)
    page = root / "docs" / "tasks.md"
    text = page.read_text()
    stale = text.replace("| `--dry-run` | `-n` |", "| `--dry-run` | `-d` |", 1).replace("# Tasks\n", "# Tasks\n\nNew prose.\n", 1)
    assert stale != text
    page.write_text(stale)
    from pipeline.committed import drift

    generated = docgen.pages(root)
    assert drift(generated) == [page]
    assert "| `--dry-run` | `-n` |" in generated[page] and "\nNew prose.\n" in generated[page]


def test_a_page_without_its_markers_is_refused(tmp_path: Path) -> None:
    root = _docs_copy(tmp_path)
    page = root / "docs" / "configuration.md"
    page.write_text(page.read_text().replace("<!-- end: config-users -->", ""))
    with pytest.raises(UsageError, match="config-users"):
        docgen.pages(root)
