"""Shared test helpers: run the real `invoke` CLI against a temporary output folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# Debian's nix-bin as root in a container (see MACHINE.md).
NIX_CONFIG = "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command flakes"


@pytest.fixture(scope="session", autouse=True)
def _nix_config() -> Iterator[None]:
    """nix in the tests (and in the imagepipe they start) reads NIX_CONFIG unless the caller set
    their own; set for the session only, never at import time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)
        yield


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked needs_root FAILS (never skips) for anyone else, saying why and how to
    deselect it; the non-root run (.ci/run-unprivileged) deselects them with -m 'not needs_root'."""
    marker = item.get_closest_marker("needs_root")
    if marker is not None and os.geteuid() != 0:
        why = marker.args[0] if marker.args else "it needs root"
        pytest.fail(f"needs root: {why}. Run it as root (CI does), or deselect it with -m 'not needs_root'",
                    pytrace=False)


def require_tool(name: str, package: str) -> str:
    """A tool the test needs; missing → the test FAILS with the install hint (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install it with `sudo apt-get install {package}` (.ci/run does)")
    return path


def write_config(path: Path, output_dir: Path, extra: dict | None = None) -> Path:
    """A runtime config (invoke -f) pointing output_dir at a temp folder."""
    data = {"defaults": {"output_dir": str(output_dir)}}
    for key, value in (extra or {}).items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def invoke(args: list[str], config: Path | None = None, *, timeout: float = 600, env: dict | None = None,
           cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m invoke [-f config] ARGS` in the project, capturing output."""
    argv = [sys.executable, "-m", "invoke"] + (["-f", str(config)] if config else []) + args
    full_env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, **(env or {})}
    res = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{argv} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


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
