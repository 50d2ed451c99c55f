"""Rebuild selection, outcome accounting and failure summaries (pure parts)."""

import json

import pytest
import yaml

from pipeline import distros, rebuild
from pipeline.base.errors import BuildFailed, CommandFailed, UsageError
from pipeline.base.events import Outcome
from pipeline.build import describe_failure
from pipeline.config import load
from tests.support import ROOT


def cfg(**demo):
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    raw["images"]["demo-x86_64"].update(demo)
    return load(raw, ROOT)


def test_select_all_named_and_default_schedule_only():
    c = cfg(schedule="daily")
    assert [i.name for i in rebuild.select(c, [], True, False)] == sorted(c.images)
    assert "demo-x86_64" not in [i.name for i in rebuild.select(c, [], True, True)]
    assert [i.name for i in rebuild.select(c, ["demo-x86_64"], False, False)] == ["demo-x86_64"]
    with pytest.raises(UsageError):
        rebuild.select(c, ["demo-x86_64"], True, False)
    with pytest.raises(UsageError):
        rebuild.select(c, [], False, False)
    with pytest.raises(UsageError, match="unknown image"):
        rebuild.select(c, ["demo"], False, False)


def test_only_failures_fail_the_run():
    ok = [Outcome("a", "built", ""), Outcome("b", "skipped", ""), Outcome("c", "up-to-date", "")]
    rebuild.check(ok)
    with pytest.raises(BuildFailed, match="1 of 4 image"):
        rebuild.check(ok + [Outcome("d", "failed", "boom")])


def test_json_events_are_one_object_per_line(capsys):
    emit = rebuild.make_emitter(True)
    emit("built", "demo", "published", build_id="x")
    emit("summary", "*", "1 built", built=1)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["built", "summary"]
    assert json.loads(lines[0])["build_id"] == "x"


def test_failure_summary_keeps_the_tool_error_not_the_argv():
    tail = "\n".join([
        "1795469519,,ui,say,==> qemu.demo: Starting VM%!(PACKER_COMMA) booting disk image",
        "1795469519,,ui,error,==> qemu.demo: Error launching VM: Qemu failed to start.",
        "1795469519,,error-count,1",
        "1795469519,qemu.demo,error,Build was halted.",
    ])
    exc = CommandFailed(["/usr/bin/packer", "build", "-var", "x=1", "t.pkr.hcl"], 1, tail)
    text = describe_failure(exc, distros.get("demo").driver)
    assert text == "packer exited 1: Error launching VM: Qemu failed to start.; Build was halted."
    assert describe_failure(BuildFailed("no image")) == "no image"
    assert describe_failure(ValueError("x")) == "ValueError: x"
