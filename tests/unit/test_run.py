"""run()/stream() with real processes (sh, sleep): typed failures and no leftovers."""

import time

import pytest

from pipeline.base.errors import CommandFailed, ToolMissing
from pipeline.base.run import run, stream, which
from tests.support import process_gone, wait_until


def test_missing_tool_names_the_install_command():
    with pytest.raises(ToolMissing) as exc:
        which("packer-does-not-exist")
    assert "not found" in exc.value.message and "install" in exc.value.hint
    with pytest.raises(ToolMissing):
        run(["packer-does-not-exist", "version"])


def test_failure_carries_argv_code_and_tail():
    with pytest.raises(CommandFailed) as exc:
        run(["sh", "-c", "echo one; echo two >&2; exit 3"])
    err = exc.value
    assert err.returncode == 3 and err.argv[0] == "sh" and "two" in err.tail
    assert "sh -c 'echo one; echo two >&2; exit 3'" in err.message


def test_env_values_are_passed_but_argv_is_what_is_shown():
    res = run(["sh", "-c", 'echo "$SECRET_VALUE"'], env={"SECRET_VALUE": "s3cret"})
    assert res.stdout.strip() == "s3cret" and "s3cret" not in " ".join(res.argv)


def test_stream_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait"
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(CommandFailed) as exc:
        stream(["sh", "-c", script], on_line=lines.append, timeout=2, grace=1, log_path=tmp_path / "log")
    assert time.monotonic() - start < 20
    assert "timed out" in (exc.value.hint or "")
    assert lines == ["started"] and (tmp_path / "log").read_text() == "started\n"
    child = int(pidfile.read_text())
    wait_until(lambda: process_gone(child), 10, f"the backgrounded sleep (pid {child}) to be killed",
               lambda: f"/proc/{child} still running")
