"""Fixtures and hooks of the suite; the helpers live in tests/support (one set, imported from there)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NIX_CONFIG, invoke, require_tool, write_config


@pytest.fixture(scope="session", autouse=True)
def _nix_config() -> Iterator[None]:
    """nix in the tests (and in the imagepipe they start) reads NIX_CONFIG unless the caller set
    their own; set for the session only, never at import time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)
        yield


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked needs_root FAILS (never skips) for anyone else, saying why and how to
    deselect it; the non-root run (.ci/run-unprivileged) deselects them with -m 'not needs_root'.
    `unless=check`: the test runs for anyone when check() holds (e.g. a nix daemon to ask)."""
    marker = item.get_closest_marker("needs_root")
    unless = marker.kwargs.get("unless") if marker is not None else None
    if marker is not None and os.geteuid() != 0 and not (unless and unless()):
        why = marker.args[0] if marker.args else "it needs root"
        pytest.fail(f"needs root: {why}. Run it as root (CI does), or deselect it with -m 'not needs_root'",
                    pytrace=False)


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real `invoke build-demo` for the session: (config file, output dir)."""
    for tool, pkg in (("packer", "packer"), ("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        require_tool(tool, pkg)
    base = tmp_path_factory.mktemp("demo")
    out = base / "output"
    cfg = write_config(base / "test.yaml", out)
    res = invoke(["build-demo"], cfg, timeout=900)
    assert res.returncode == 0, f"demo build failed:\n{res.stdout}\n{res.stderr}"
    return cfg, out
