"""Fixtures and hooks of the suite; the helpers live in tests/support (one set, imported from there)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import DEBIAN_TOOLS, NIX_CONFIG, invoke, require_tool, write_config

WITHOUT_ROOT = pytest.StashKey[dict[str, int]]()  # --without-root: reason → tests deselected


@pytest.fixture(scope="session", autouse=True)
def _nix_config() -> Iterator[None]:
    """nix in the tests (and in the imagepipe they start) reads NIX_CONFIG unless the caller set
    their own; set for the session only, never at import time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG") or NIX_CONFIG)
        yield


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background (`cmd &` in a script, some CI runners) inherits SIGINT
    ignored, and every imagepipe it starts would ignore ^C too; the ^C tests need what a terminal
    gives. A handler (not an ignore) is reset to the default by exec, so the children get it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--without-root", action="store_true",
                     help="deselect the tests that need root on this machine (needs_root, unless its "
                          "check holds here), and say which; for a run as an unprivileged user")


def root_needed(item: pytest.Item) -> str | None:
    """Why `item` needs root here (None: it does not). A needs_root marker with `unless=check`
    does not apply where check() holds (e.g. a nix daemon, membership of group tty)."""
    if os.geteuid() == 0:
        return None
    for marker in item.iter_markers("needs_root"):
        unless = marker.kwargs.get("unless")
        if not (unless and unless()):
            return marker.args[0] if marker.args else "it needs root"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--without-root: deselect what needs root here, and count it by reason for the summary."""
    if not config.getoption("--without-root"):
        return
    keep, dropped = [], []
    for item in items:
        (dropped if root_needed(item) else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    reasons: dict[str, int] = {}
    for item in dropped:
        why = root_needed(item) or ""
        reasons[why] = reasons.get(why, 0) + 1
    config.stash[WITHOUT_ROOT] = reasons


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for why, count in config.stash.get(WITHOUT_ROOT, {}).items():
        terminalreporter.write_line(f"--without-root: deselected {count} test(s) that need root here: {why}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that needs root here FAILS (never skips) for anyone else, saying why and how to
    deselect it (--without-root, which .ci/run-unprivileged uses)."""
    why = root_needed(item)
    if why is not None:
        pytest.fail(f"needs root: {why}. Run it as root (CI does), or deselect it with --without-root",
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


@pytest.fixture(scope="session")
def debian_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real `invoke build debian13-x86_64` for the session (mmdebstrap from the Debian mirror
    the host's apt sources name; the .deb cache outside the checkout makes it quick after the
    first run): (config file, output dir). Tests that boot, fetch or change it work on their own
    copies (tests.support.published_copy) or boot it with -snapshot."""
    for tool, pkg in DEBIAN_TOOLS:
        require_tool(tool, pkg)
    base = tmp_path_factory.mktemp("debian")
    out = base / "output"
    cfg = write_config(base / "test.yaml", out)
    res = invoke(["build", "debian13-x86_64"], cfg, timeout=2400)
    assert res.returncode == 0, f"debian13-x86_64 build failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    return cfg, out
